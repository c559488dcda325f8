"""Chat templates: render a conversation to text, and know which characters the model learns.

Four formats, each written out exactly:

* ``vicuna_v1.1`` - FastChat's: ``SYSTEM USER: hi ASSISTANT: hello</s>USER: ...``
* ``llama-2``     - Meta's: ``[INST] <<SYS>>\\nSYSTEM\\n<</SYS>>\\n\\nhi [/INST] hello </s><s>[INST] ...``
* ``chatml``      - ``<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\nhello<|im_end|>\\n``
* ``llama-3``     - Meta's: ``<|start_header_id|>user<|end_header_id|>\\n\\nhi<|eot_id|><|start_header_id|>
  assistant<|end_header_id|>\\n\\nhello<|eot_id|>`` (for a LLaMA-3 tokenizer, whose special tokens
  these are)

``render`` returns the text (without the leading BOS, which the tokenizer adds) and the
character spans the loss is computed on: every assistant reply plus its end-of-turn marker.
``tokenize_with_labels`` maps those spans onto tokens through the fast tokenizer's offset
mapping, so the label mask is exactly aligned with the tokens the model sees at inference
(no per-segment tokenisation, hence no "tokenization mismatch").

Each built-in template is one :class:`BuiltinTemplate` object (``VICUNA``, ``LLAMA2``, ``CHATML``,
``LLAMA3``) holding its default system prompt, its end-of-turn marker, its :class:`Pieces` (the
text around the system prompt, user messages and replies, the separators and the generation
prompt), from which one generic ``render`` writes the text, and its Jinja ``chat_template`` for
Hugging Face / vLLM, which produces the same text (a test checks both agree); written with a model
it is :meth:`ChatTemplate.jinja_for` that tokenizer (a leading ``bos_token`` only where the
tokenizer itself adds one, so ``apply_chat_template(..., tokenize=True)`` gives the training ids).

A model that ships its own Jinja template is rendered with it (``template: model``, or ``auto``
when the Jinja is none of the four): :mod:`llama_pipe.chat_template.model`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llama_pipe.chat_template.base import AUTO, MODEL, ChatTemplate, Message
from llama_pipe.chat_template.model import model_template
from llama_pipe.core.errors import ConfigError

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

IGNORE_INDEX = -100


def to_messages(record: dict[str, Any]) -> list[Message]:
    """HF-style messages from a llama-pipe record (``from`` human/gpt, optional ``system``)."""
    msgs: list[Message] = []
    if record.get("system"):
        msgs.append({"role": "system", "content": record["system"]})
    for turn in record["conversations"]:
        role = {"human": "user", "gpt": "assistant", "system": "system"}[turn["from"]]
        msgs.append({"role": role, "content": turn["value"]})
    return msgs


@dataclass(frozen=True)
class Pieces:
    """The text a built-in template writes around each part of a conversation.

    A conversation renders as: the system block (``system[0] + prompt + system[1]``, only for a
    non-empty prompt) before the first message, or inside the first user turn where
    ``system_in_first_user``; each user message as ``user[0] + content + user[1]``, preceded by
    ``later_user`` unless it is the first message; each assistant message as ``assistant``, then
    ``content + reply_end`` (the learned span), then ``after_reply``; with a generation prompt,
    ``generation_prompt`` at the end (after the system block when there are no messages and
    ``system_without_turns``).
    """

    system: tuple[str, str]
    user: tuple[str, str]
    assistant: str
    reply_end: str
    after_reply: str = ""
    later_user: str = ""
    generation_prompt: str = ""
    system_in_first_user: bool = False
    system_without_turns: bool = False


@dataclass(frozen=True)
class BuiltinTemplate(ChatTemplate):
    """A template written out in llama-pipe: its pieces render the text, its Jinja gives the same."""

    pieces: Pieces

    def render(
        self,
        messages: Sequence[Message],
        system: str | None = None,
        add_generation_prompt: bool = False,
    ) -> tuple[str, list[tuple[int, int]]]:
        text, targets, _ = self._render(messages, system, add_generation_prompt)
        return text, targets

    def text_spans(
        self,
        messages: Sequence[Message],
        system: str | None,
        add_generation_prompt: bool,
        text: str,
    ) -> list[tuple[int, int]]:
        rendered, _, texts = self._render(messages, system, add_generation_prompt)
        if rendered != text:
            raise ValueError("text_spans: the text is not this template's rendering of these messages")
        return texts

    def _render(
        self,
        messages: Sequence[Message],
        system: str | None,
        add_generation_prompt: bool,
    ) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
        """Text, assistant target spans, message-text spans."""
        msgs = list(messages)
        if msgs and msgs[0]["role"] == "system":
            system = msgs[0]["content"]
            msgs = msgs[1:]
        if system is None:
            system = self.default_system
        p = self.pieces
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        texts: list[tuple[int, int]] = []
        pos = 0

        def add(text: str, target: bool = False, is_text: bool = False) -> None:
            nonlocal pos
            if target:
                spans.append((pos, pos + len(text)))
            if is_text and text:
                texts.append((pos, pos + len(text)))
            parts.append(text)
            pos += len(text)

        def add_system() -> None:
            if system:
                add(p.system[0])
                add(system, is_text=True)
                add(p.system[1])

        for i, m in enumerate(msgs):
            role, content = m["role"], m["content"]
            if role not in ("user", "assistant"):
                raise ValueError(f"message {i}: role {role!r} (only a leading system message is allowed)")
            if i == 0 and not p.system_in_first_user:
                add_system()
            if role == "user":
                add((p.later_user if i else "") + p.user[0])
                if i == 0 and p.system_in_first_user:
                    add_system()
                add(content, is_text=True)
                add(p.user[1])
            else:
                add(p.assistant)
                start = pos
                add(content, is_text=True)
                add(p.reply_end)
                spans.append((start, pos))
                add(p.after_reply)
        if add_generation_prompt:
            if not msgs and p.system_without_turns:
                add_system()
            add(p.generation_prompt)
        return "".join(parts), spans, texts


def _leading_system(default: str) -> str:
    """Jinja: ``system`` is a leading system message's content (taken off ``messages``), else ``default``."""
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
        "{%- set messages = messages[1:] -%}{%- else -%}{%- set system = '" + default.replace("'", "\\'") + "' -%}{%- endif -%}"
    )


#: Jinja closing a message loop whose branches took user and assistant: any other role is refused.
_OTHER_ROLES_REFUSED = "{%- else -%}{{- raise_exception('only a leading system message is allowed') -}}{%- endif -%}{%- endfor -%}"


VICUNA = BuiltinTemplate(
    "vicuna_v1.1",
    VICUNA_SYSTEM,
    "</s>",
    "{{- bos_token -}}"
    + _leading_system(VICUNA_SYSTEM)
    + "{%- if system -%}{{- system + ' ' -}}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- 'USER: ' + m['content'] + ' ' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + m['content'] + '</s>' -}}"
    + _OTHER_ROLES_REFUSED
    + "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}",
    Pieces(
        system=("", " "),
        user=("USER: ", " "),
        assistant="ASSISTANT: ",
        reply_end="</s>",
        generation_prompt="ASSISTANT:",
        system_without_turns=True,
    ),
)

LLAMA2 = BuiltinTemplate(
    "llama-2",
    "",
    "</s>",
    "{{- bos_token -}}"
    + _leading_system("")
    + "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if loop.first and system -%}{{- '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + m['content'] + ' [/INST]' -}}"
    "{%- else -%}{{- ('' if loop.first else '<s>') + '[INST] ' + m['content'] + ' [/INST]' -}}{%- endif -%}"
    "{%- elif m['role'] == 'assistant' -%}{{- ' ' + m['content'] + ' </s>' -}}"
    + _OTHER_ROLES_REFUSED,
    Pieces(
        system=("<<SYS>>\n", "\n<</SYS>>\n\n"),
        user=("[INST] ", " [/INST]"),
        assistant=" ",
        reply_end=" </s>",
        later_user="<s>",
        system_in_first_user=True,
    ),
)

CHATML = BuiltinTemplate(
    "chatml",
    "",
    "<|im_end|>",
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
    Pieces(
        system=("<|im_start|>system\n", "<|im_end|>\n"),
        user=("<|im_start|>user\n", "<|im_end|>\n"),
        assistant="<|im_start|>assistant\n",
        reply_end="<|im_end|>",
        after_reply="\n",
        generation_prompt="<|im_start|>assistant\n",
    ),
)

LLAMA3 = BuiltinTemplate(
    "llama-3",
    "",
    "<|eot_id|>",
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}",
    Pieces(
        system=("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
        user=("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n",
        reply_end="<|eot_id|>",
        generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
)

TEMPLATES: dict[str, BuiltinTemplate] = {t.name: t for t in (VICUNA, LLAMA2, CHATML, LLAMA3)}


#: Template choices beyond the built-ins: the model's own Jinja, or "own if any, else built-in".
def builtin_named(jinja: object) -> str | None:
    """The built-in template this Jinja is (any variant :meth:`ChatTemplate.jinja_for` writes), else None."""
    if not isinstance(jinja, str):
        return None
    bos = "{{- bos_token -}}"
    for name, tpl in TEMPLATES.items():
        body = tpl.chat_template[len(bos):] if tpl.chat_template.startswith(bos) else tpl.chat_template
        if jinja in (tpl.chat_template, body, "{{- bos_token + ' ' -}}" + body):
            return name
    return None


def builtin_for(tokenizer: Any) -> str | None:
    """The built-in template whose Jinja the tokenizer carries (any variant), else None."""
    return builtin_named(getattr(tokenizer, "chat_template", None))


def get_template(name: str, tokenizer: Any = None) -> ChatTemplate:
    """A built-in template by name; ``model``: the tokenizer's own Jinja; ``auto``: the
    tokenizer's own Jinja when it has one that is not a built-in's, else that built-in, else
    ``vicuna_v1.1``. ``model`` and ``auto`` need the tokenizer."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    if name not in (MODEL, AUTO):
        raise ValueError(f"unknown chat template {name!r}; choose one of {sorted(TEMPLATES)}, {MODEL!r} or {AUTO!r}")
    if tokenizer is None:
        raise ValueError(f"chat template {name!r} needs the model's tokenizer: call get_template(name, tokenizer)")
    if name == AUTO:
        own = builtin_for(tokenizer)
        if own is not None:
            return TEMPLATES[own]
        if not getattr(tokenizer, "chat_template", None):
            return TEMPLATES["vicuna_v1.1"]
    return model_template(tokenizer)


def template_for_bare_model(choice: str, where: object) -> ChatTemplate:
    """The template convert stores with a model that ships none (a Meta checkpoint; an HF or GGUF
    model without ``chat_template``): ``chat.template`` when it names a built-in, vicuna_v1.1 for
    ``auto``. ``model`` has nothing to use: a :class:`~llama_pipe.core.errors.ConfigError` naming ``where``."""
    if choice in TEMPLATES:
        return TEMPLATES[choice]
    if choice == AUTO:
        return TEMPLATES["vicuna_v1.1"]
    raise ConfigError(f"{where}: the model ships no chat template, so chat.template {choice!r} has nothing to use; "
                      f"name a built-in ({', '.join(sorted(TEMPLATES))}) or auto")


def tokenize_with_labels(
    tokenizer: Any, text: str, spans: Sequence[tuple[int, int]], texts: Sequence[tuple[int, int]] = ()
) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` (BOS added) and labels: the id inside a target span, else -100.

    A token is a target when it lies inside a span, or overlaps one on a non-space character
    (``▁Hello`` whose offsets include the separating space); a token that only covers the space
    before a span does not count. ``texts``: the spans of message text, where a control token's
    string is tokenized as text (:class:`llama_pipe.chat_template.control_tokens.ControlTokens`).
    """
    from llama_pipe.chat_template.control_tokens import control_tokens

    ids, offsets = control_tokens(tokenizer).encode(text, texts)
    labels = [IGNORE_INDEX] * len(ids)
    if not spans:
        return ids, labels
    k = 0
    for i, (start, end) in enumerate(offsets):
        if end <= start:  # special tokens added by the tokenizer (BOS) carry (0, 0)
            continue
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        if k == len(spans):
            break
        s, e = spans[k]
        if s <= start and end <= e:
            labels[i] = ids[i]
        elif start < e and end > s and text[max(start, s) : min(end, e)].strip():
            labels[i] = ids[i]
    return ids, labels


def message_texts(messages: Sequence[Message], system: str | None) -> list[str]:
    """Every string of a conversation that is text, not template: contents and the system prompt."""
    return [m["content"] for m in messages if isinstance(m.get("content"), str)] + ([system] if isinstance(system, str) else [])


def render_for_tokens(
    tokenizer: Any, template: ChatTemplate, messages: Sequence[Message], system: str | None = None,
    add_generation_prompt: bool = False,
) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """``template.render``'s text and target spans, and the spans of message text that holds a
    control token's string (empty when none does: the usual case costs nothing more)."""
    from llama_pipe.chat_template.control_tokens import control_tokens

    text, targets = template.render(messages, system=system, add_generation_prompt=add_generation_prompt)
    texts: list[tuple[int, int]] = []
    if control_tokens(tokenizer).in_any(message_texts(messages, system)):
        texts = template.text_spans(messages, system, add_generation_prompt, text)
    return text, targets, texts


def encode_conversation(
    tokenizer: Any, template: ChatTemplate, messages: Sequence[Message], system: str | None = None,
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[int]]:
    """Token ids (BOS added) and labels of a conversation, as every stage makes them (train, split,
    eval, chat, serve): only the template writes control tokens; message text is text."""
    text, targets, texts = render_for_tokens(tokenizer, template, messages, system, add_generation_prompt)
    return tokenize_with_labels(tokenizer, text, targets, texts)


def end_of_turn_ids(tokenizer: Any, template: ChatTemplate) -> list[int]:
    """Token ids that end generation for this template (eos, plus <|im_end|> / <|eot_id|> where a token)."""
    ids = {tokenizer.eos_token_id}
    tid = tokenizer.convert_tokens_to_ids(template.end_of_turn)
    if isinstance(tid, int) and tid != tokenizer.unk_token_id:
        ids.add(tid)
    return sorted(i for i in ids if i is not None)
