"""A model's own Jinja chat template (``tokenizer.chat_template``) as a :class:`ChatTemplate`.

Rendering goes through the tokenizer's ``apply_chat_template(..., tokenize=False)``, so the text
is exactly what Hugging Face, vLLM and llama.cpp render for the same messages. The loss mask
needs each assistant reply's character span: for the assistant message ``i`` the conversation
is rendered up to message ``i - 1`` with the generation prompt (``before``) and up to message
``i`` (``upto``); the reply's target is ``upto[len(before):]`` up to and including the first
end-of-turn marker (the tokenizer's EOS, e.g. ``<|im_end|>``) after the reply's content. Both
renderings must be prefixes of the whole conversation's text; a template that rewrites earlier
turns (some drop past reasoning) cannot be trained on this way, and the error says to name a
built-in template.

BOS: when the tokenizer adds a BOS by itself (``add_special_tokens=True``) and the template
writes ``bos_token`` first, that leading BOS text is left out of ``render``'s text, so that
``tokenizer(text)`` and ``apply_chat_template(..., tokenize=True)`` give the same ids. A
tokenizer that adds a BOS the template does not write (or adds anything else), or whose ids for
the text differ from apply_chat_template's on a probe conversation, is refused with a message
saying to name a built-in template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llama_pipe.templates import MODEL, ChatTemplate, Message, adds_bos


@dataclass(frozen=True)
class ModelTemplate(ChatTemplate):
    """The tokenizer's own template; ``chat_template`` is its Jinja source."""

    tokenizer: Any = field(default=None, compare=False, repr=False)
    strip_bos: str = ""  # leading text left out of render() because the tokenizer adds it

    def jinja_for(self, tokenizer: Any) -> str:
        return self.chat_template

    def _apply(self, msgs: list[Message], generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        return str(text)

    def _messages(self, messages: Sequence[Message], system: str | None) -> list[Message]:
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


def model_template(tokenizer: Any) -> ModelTemplate:
    """The tokenizer's own chat template (ValueError if it has none or cannot be made consistent)."""
    jinja = getattr(tokenizer, "chat_template", None)
    if not isinstance(jinja, str) or not jinja.strip():
        raise ValueError("the model's tokenizer has no chat template (tokenizer.chat_template); name a built-in template")
    eos = tokenizer.eos_token or ""
    tpl = ModelTemplate(MODEL, "", eos, jinja, tokenizer)
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
        tpl = ModelTemplate(MODEL, "", eos, jinja, tokenizer, strip_bos=bos)
    # The ids training makes of render()'s text must be apply_chat_template's (a sentencepiece
    # tokenizer may put its word prefix after the BOS it adds but not after a "<s>" in the text).
    rendered, _ = tpl.render(probe)
    chat = tokenizer.apply_chat_template(probe, tokenize=True)
    chat_ids = list(chat["input_ids"] if hasattr(chat, "keys") else chat)
    if tokenizer(rendered, add_special_tokens=True)["input_ids"] != chat_ids:
        raise ValueError(
            "the tokenizer's own chat template gives other token ids through apply_chat_template than the "
            "tokenizer gives its text (e.g. a word-prefix space after the BOS); name a built-in template"
        )
    return tpl
