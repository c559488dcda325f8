"""The one rule for ``chat.template``: which template a stage renders with (split, train,
merge-adapter, eval, chat, serve and distill all resolve ``auto`` here)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from llama_pipe.chat_template.builtin import AUTO, MODEL, TEMPLATES, ChatTemplate, builtin_named, get_template
from llama_pipe.core.errors import InputError
from llama_pipe.core.sidecar import recorded

log = logging.getLogger(__name__)


def read_chat_template(path: str | Path) -> str | None:
    """The chat template Jinja stored in a tokenizer directory, as transformers reads it:
    ``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template`` (None: none)."""
    path = Path(path)
    try:
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        pass
    try:
        cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    jinja = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(jinja, list):  # named templates: transformers uses "default"
        jinja = next((t.get("template") for t in jinja if isinstance(t, dict) and t.get("name") == "default"), None)
    return jinja if isinstance(jinja, str) else None


def _own_jinja(tokenizer: Any, dirs: list[Path]) -> str | None:
    """The tokenizer's own Jinja: its ``chat_template``; a bare ``tokenizers.Tokenizer`` (split's fast
    path) has none, so it is read from the first directory's files."""
    if hasattr(tokenizer, "chat_template"):
        jinja = tokenizer.chat_template
        return jinja if isinstance(jinja, str) else None
    return read_chat_template(dirs[0]) if dirs else None


def pick_template(explicit: str | None, dirs: list[Path], tokenizer: Any) -> str:
    """Template name for ``chat.template``: a built-in or ``model`` as given; ``auto`` (or None): the
    one recorded with the model (sidecar, train_config.json) > the built-in the tokenizer's Jinja is >
    the tokenizer's own Jinja (``model``) > vicuna_v1.1. :func:`resolve_template` gives the template:
    every stage resolves ``auto`` through these two (split, train, merge-adapter, eval, chat, serve)."""
    if explicit and explicit != AUTO:
        return explicit
    found, name = recorded(dirs, "template")
    if found and (name in TEMPLATES or name == MODEL):
        return str(name)
    jinja = _own_jinja(tokenizer, dirs)
    own = builtin_named(jinja)
    if own is not None:
        return own
    if jinja and jinja.strip():
        return MODEL
    log.warning("no chat template recorded with the model; using vicuna_v1.1 (pass --template to choose)")
    return "vicuna_v1.1"


def resolve_template(explicit: str | None, dirs: list[Path], tokenizer: Any) -> ChatTemplate:
    """The chat template every stage renders with (``chat.template`` resolved by :func:`pick_template`).
    A template that cannot be used (``model`` with none, one that rewrites earlier turns, a hostile
    one) is an :class:`InputError` naming the model directory or the template's file."""
    name = pick_template(explicit, dirs, tokenizer)
    try:
        return get_template(name, tokenizer)
    except ValueError as exc:
        where = dirs[0] if dirs else getattr(tokenizer, "name_or_path", "the tokenizer")
        raise InputError(f"{where}: chat template {name!r}: {exc}") from None


def recorded_system_prompt(dirs: list[Path]) -> str | None:
    """The system prompt the model was trained with (null: the template's default)."""
    found, value = recorded(dirs, "system_prompt")
    return value if found and isinstance(value, str) else None
