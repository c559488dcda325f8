"""What every chat template is: :class:`ChatTemplate` (a built-in's pieces in
:mod:`llama_pipe.chat_template.builtin`, a model's own Jinja in :mod:`llama_pipe.chat_template.model`), the message
type, the template names ``model`` / ``auto``, and whether a tokenizer adds a BOS. Both template
modules build on this one; :func:`llama_pipe.chat_template.builtin.get_template` chooses between them."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass(frozen=True)
class ChatTemplate:
    """One chat format: its default system prompt, the marker that ends an assistant turn, and the
    Jinja written with a model. :class:`~llama_pipe.chat_template.builtin.BuiltinTemplate` renders from its pieces,
    :class:`~llama_pipe.chat_template.model.ModelTemplate` through the tokenizer's own Jinja."""

    name: str
    default_system: str
    end_of_turn: str  # the string that ends an assistant turn (and generation)
    chat_template: str  # Jinja for tokenizer_config.json

    def jinja_for(self, tokenizer: Any) -> str:
        """The Jinja to store with ``tokenizer``, whose ``apply_chat_template(..., tokenize=True)``
        gives exactly the training ids (``tokenize_with_labels``: the text, BOS added by the tokenizer).

        No leading ``bos_token`` when the tokenizer adds no BOS (SmolLM2's BOS is ``<|im_start|>``,
        which would otherwise be rendered twice). A sentencepiece tokenizer puts its "▁" word
        prefix before the text when it adds the BOS itself but not after a ``<s>`` written in the
        text (transformers' non-legacy LlamaTokenizer), so there the Jinja writes ``bos_token + ' '``
        where the text starts with a word.
        """
        bos = "{{- bos_token -}}"
        body = self.chat_template[len(bos):] if self.chat_template.startswith(bos) else self.chat_template
        if not adds_bos(tokenizer):
            return body
        text, _ = self.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
        want = tokenizer(text, add_special_tokens=True)["input_ids"]
        for prefix, jinja in (("", bos), (" ", "{{- bos_token + ' ' -}}")):
            if tokenizer(tokenizer.bos_token + prefix + text, add_special_tokens=False)["input_ids"] == want:
                return jinja + body
        return self.chat_template

    def render(
        self,
        messages: Sequence[Message],
        system: str | None = None,
        add_generation_prompt: bool = False,
    ) -> tuple[str, list[tuple[int, int]]]:
        """Text of the conversation and the [start, end) character spans of assistant targets."""
        raise NotImplementedError

    def render_text(self, messages: Sequence[Message], system: str | None = None, add_generation_prompt: bool = False) -> str:
        """The text of :meth:`render` alone (a prompt to generate from needs no spans)."""
        return self.render(messages, system, add_generation_prompt)[0]

    def text_spans(
        self,
        messages: Sequence[Message],
        system: str | None,
        add_generation_prompt: bool,
        text: str,
    ) -> list[tuple[int, int]]:
        """The [start, end) character spans of message text (the system prompt's included) in
        ``text``, ``render``'s text for the same arguments: where a control token's string is
        text, not a marker (:mod:`llama_pipe.chat_template.control_tokens`)."""
        raise NotImplementedError


MODEL = "model"
AUTO = "auto"


_ADDS_BOS: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer(text)`` (add_special_tokens=True) puts a BOS in front (cached per tokenizer)."""
    try:
        return _ADDS_BOS[tokenizer]
    except (KeyError, TypeError):
        pass
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a", add_special_tokens=True)["input_ids"] if bos is not None else []
    found = bool(ids) and ids[0] == bos and ids[1:] == tokenizer("a", add_special_tokens=False)["input_ids"]
    try:
        _ADDS_BOS[tokenizer] = found
    except TypeError:
        pass
    return found
