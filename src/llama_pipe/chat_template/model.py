"""A model's own Jinja chat template (``tokenizer.chat_template``) as a :class:`ChatTemplate`.

Rendering goes through :func:`llama_pipe.chat_template.jinja.render`: the environment and variables of
transformers' ``apply_chat_template(..., tokenize=False)`` (so the text is what Hugging Face, vLLM
and llama.cpp render for the same messages), sandboxed, with a time budget and size bounds. A
template that breaks them, reaches for Python's internals or is not valid Jinja is an
:class:`~llama_pipe.core.errors.InputError` naming the file it came from (``chat_template.jinja``,
``tokenizer_config.json``, a GGUF's ``tokenizer.chat_template``); ``raise_exception`` in the
template is a ``ValueError`` about that conversation. The loss mask
needs each assistant reply's character span: for the assistant message ``i`` the conversation
is rendered up to message ``i - 1`` with the generation prompt (``before``) and up to message
``i`` (``upto``); the reply's target is ``upto[len(before):]`` up to and including the first
end-of-turn marker (the tokenizer's EOS, e.g. ``<|im_end|>``) after the reply's content. Both
renderings must be prefixes of the whole conversation's text; a template that rewrites earlier
turns (some drop past reasoning) cannot be trained on this way, and the error says to name a
built-in template.

Message text is located in the rendering (:meth:`ModelTemplate.text_spans`, only for a conversation
whose text holds a control token's string) by rendering once more with each message's text
between two private-use marker characters; the marked rendering without its markers must be the
rendering itself.

BOS: when the tokenizer adds a BOS by itself (``add_special_tokens=True``) and the template
writes ``bos_token`` first, that leading BOS text is left out of ``render``'s text, so that
``tokenizer(text)`` and ``apply_chat_template(..., tokenize=True)`` give the same ids. A
tokenizer that adds a BOS the template does not write (or adds anything else), or whose ids for
the text differ from apply_chat_template's on a probe conversation, is refused with a message
saying to name a built-in template.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from llama_pipe.chat_template import jinja as chat_jinja
from llama_pipe.chat_template.base import MODEL, ChatTemplate, Message, adds_bos
from llama_pipe.core.errors import InputError

_MARKS = range(0x100000, 0x10FFFE)  # supplementary private use area B


def template_source(tokenizer: Any) -> str:
    """Where ``tokenizer``'s chat template was read from, for messages: ``DIR/chat_template.jinja``
    (which transformers prefers), else ``DIR/tokenizer_config.json``."""
    where = getattr(tokenizer, "name_or_path", None)
    d = Path(where) if isinstance(where, str) and where else None
    if d is not None and d.is_dir():
        for name in ("chat_template.jinja", "tokenizer_config.json"):
            if (d / name).is_file():
                return str(d / name)
    return "the tokenizer's chat_template"


@dataclass(frozen=True)
class ModelTemplate(ChatTemplate):
    """The tokenizer's own template; ``chat_template`` is its Jinja source."""

    tokenizer: Any = field(default=None, compare=False, repr=False)
    strip_bos: str = ""  # leading text left out of render() because the tokenizer adds it
    source: str = "the tokenizer's chat_template"  # the file it came from, for messages

    def jinja_for(self, tokenizer: Any) -> str:
        return self.chat_template

    def _apply(self, msgs: list[Message], generation_prompt: bool) -> str:
        """The template's text for ``msgs``, bounded (see :mod:`llama_pipe.chat_template.jinja`)."""
        from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError

        context = {**self.tokenizer.special_tokens_map, "messages": [dict(m) for m in msgs], "tools": None,
                   "documents": None, "add_generation_prompt": generation_prompt}
        chars = sum(len(m["content"]) for m in msgs)
        where = f"{self.source}: the chat template"
        try:
            return chat_jinja.render(self.chat_template, chars, **context)
        except chat_jinja.Refused as exc:
            raise ValueError(f"the model's chat template refuses this conversation: {exc}") from None
        except chat_jinja.TemplateLimit as exc:
            raise InputError(f"{where} is refused: {exc}") from None
        except SecurityError as exc:
            raise InputError(f"{where} tries to reach Python's internals ({exc}); it is refused") from None
        except TemplateSyntaxError as exc:
            raise InputError(f"{where} is not valid Jinja (line {exc.lineno}: {exc.message})") from None
        except UndefinedError as exc:
            raise InputError(f"{where} uses a variable llama-pipe does not give it ({exc.message})") from None
        except RecursionError:
            raise InputError(f"{where} is refused: it recurses too deeply") from None
        except MemoryError:
            raise InputError(f"{where} is refused: rendering ran out of memory") from None
        except Exception as exc:  # noqa: BLE001 - what a template's own operations raise (TypeError, ...)
            raise InputError(f"{where} fails: {type(exc).__name__}: {str(exc)[:200]}") from None

    def text_spans(
        self,
        messages: Sequence[Message],
        system: str | None,
        add_generation_prompt: bool,
        text: str,
    ) -> list[tuple[int, int]]:
        msgs = self._messages(messages, system)
        used = set(self.chat_template).union(*(m["content"] for m in msgs))
        marks = list(islice((chr(c) for c in _MARKS if chr(c) not in used), 2))
        if len(marks) < 2:
            raise ValueError("no free marker characters to locate message text with")
        open_, close = marks
        marked = []
        for m in msgs:  # marks inside the surrounding whitespace, so a template's trim still trims it
            core = m["content"].strip()
            lead = m["content"][: len(m["content"]) - len(m["content"].lstrip())]
            marked.append({**m, "content": lead + open_ + core + close + m["content"][len(lead) + len(core):]})
        rendered = self._apply(marked, add_generation_prompt)
        spans: list[tuple[int, int]] = []
        plain: list[str] = []
        at, start = 0, None
        for piece in re.split(f"([{open_}{close}])", rendered):
            if piece == open_:
                start = at
            elif piece == close:
                if start is not None and at > start:
                    spans.append((start, at))
                start = None
            else:
                plain.append(piece)
                at += len(piece)
        whole = "".join(plain)
        k = len(self.strip_bos) if self.strip_bos and whole.startswith(self.strip_bos) else 0
        if whole[k:] != text:
            raise ValueError(
                "the model's chat template changes message text, so the control tokens in it cannot be told from the "
                "template's own; name a built-in template (chat.template)"
            )
        return sorted((a - k, b - k) for a, b in spans if b > k)

    @staticmethod
    def _messages(messages: Sequence[Message], system: str | None) -> list[Message]:
        msgs = [dict(m) for m in messages]
        if system and not (msgs and msgs[0]["role"] == "system"):
            msgs.insert(0, {"role": "system", "content": system})
        for i, m in enumerate(msgs):
            if m["role"] not in ("system", "user", "assistant") or (m["role"] == "system" and i):
                raise ValueError(f"message {i}: role {m['role']!r} (only a leading system message is allowed)")
        return msgs

    def render_text(self, messages: Sequence[Message], system: str | None = None, add_generation_prompt: bool = False) -> str:
        """One ``apply_chat_template``, linear in the conversation: no spans are located (that renders
        every prefix), so a conversation the template renders, e.g. one opening with an assistant
        greeting, is a prompt even where its spans could not be located."""
        full = self._apply(self._messages(messages, system), add_generation_prompt)
        return full[len(self.strip_bos):] if self.strip_bos and full.startswith(self.strip_bos) else full

    def render(
        self,
        messages: Sequence[Message],
        system: str | None = None,
        add_generation_prompt: bool = False,
    ) -> tuple[str, list[tuple[int, int]]]:
        msgs = self._messages(messages, system)
        full = self._apply(msgs, add_generation_prompt)
        spans: list[tuple[int, int]] = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self._apply(msgs[:i], True) if i else self._apply([], True)
            upto = self._apply(msgs[: i + 1], False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ValueError(
                    f"the model's chat template does not render message {i} as a continuation of the earlier ones, so "
                    "its reply cannot be located for the loss mask; name a built-in template (train.template)"
                )
            start = len(before)
            at = upto.find(m["content"], start)
            after = at + len(m["content"]) if at >= 0 else start
            stop = upto.find(self.end_of_turn, after) if self.end_of_turn else -1
            end = stop + len(self.end_of_turn) if stop >= 0 else len(upto.rstrip())
            spans.append((start, end))
        if self.strip_bos and full.startswith(self.strip_bos):
            k = len(self.strip_bos)
            full = full[k:]
            spans = [(a - k, b - k) for a, b in spans]
        return full, spans


def model_template(tokenizer: Any, source: str | None = None) -> ModelTemplate:
    """The tokenizer's own chat template (ValueError if it has none or cannot be made consistent;
    InputError naming ``source``, default :func:`template_source`, if it breaks the renderer's bounds)."""
    jinja = getattr(tokenizer, "chat_template", None)
    if not isinstance(jinja, str) or not jinja.strip():
        raise ValueError("the model's tokenizer has no chat template (tokenizer.chat_template); name a built-in template")
    eos = tokenizer.eos_token or ""
    source = source or template_source(tokenizer)
    tpl = ModelTemplate(MODEL, "", eos, jinja, tokenizer, source=source)
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    text = tpl._apply(probe, False)
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    added = tokenizer("a", add_special_tokens=True)["input_ids"]
    if added != plain:
        bos = tokenizer.bos_token
        if not adds_bos(tokenizer):
            raise ValueError("the tokenizer adds special tokens other than a leading BOS; name a built-in template")
        if not (bos and text.startswith(bos)):
            raise ValueError(
                "the tokenizer adds a BOS but its chat template does not write one, so training and "
                "apply_chat_template would disagree; name a built-in template"
            )
        tpl = ModelTemplate(MODEL, "", eos, jinja, tokenizer, strip_bos=bos, source=source)
    # The ids training makes of render()'s text must be apply_chat_template's (a sentencepiece
    # tokenizer may put its word prefix after the BOS it adds but not after a "<s>" in the text).
    # (apply_chat_template(tokenize=True) tokenizes its text without adding special tokens.)
    rendered, _ = tpl.render(probe)
    if tokenizer(rendered, add_special_tokens=True)["input_ids"] != tokenizer(text, add_special_tokens=False)["input_ids"]:
        raise ValueError(
            "the tokenizer's own chat template gives other token ids through apply_chat_template than the "
            "tokenizer gives its text (e.g. a word-prefix space after the BOS); name a built-in template"
        )
    return tpl
