"""Reading ``config.yaml``: YAML that reads ``1e-5`` as a number, schema validation, and a stage's
settings layered as defaults < config file section < command-line flags.

Hostile YAML is refused before it can cost anything: an alias (``*name``, which lets a 500-byte
file stand for billions of values) and nesting deeper than :data:`MAX_YAML_DEPTH` are errors while
the file is parsed; a value YAML cannot convert (a 5,000-digit integer) is a ConfigError, not a
traceback. :func:`shared_value` finds aliases in data someone else parsed (Snakemake's config)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, TypeVar

from llama_pipe.config.sections import Config
from llama_pipe.core.errors import ConfigError
from llama_pipe.core.settings import from_dict, validate

T = TypeVar("T")

#: Keys that moved, and where to. A file that still uses one gets this, not "unknown key".
MOVED: dict[tuple[str, str], str] = {
    ("convert", "template"): "chat.template",
    ("split", "template"): "chat.template",
    ("split", "system_prompt"): "chat.system_prompt",
    ("train", "template"): "chat.template",
    ("train", "system_prompt"): "chat.system_prompt",
    ("train", "max_seq_len"): "chat.max_seq_len",
    ("merge_adapter", "template"): "chat.template",
    ("eval", "template"): "chat.template",
    ("serve", "template"): "chat.template",
}
#: The names train.mode gave four combinations of train.base_storage and train.method (the
#: benchmarks still label their cases with them): what an old ``mode`` is now.
MODE_NAMES: dict[str, dict[str, str]] = {
    "lora": {"base_storage": "float", "method": "lora"},
    "qlora": {"base_storage": "nf4", "method": "lora"},
    "int8": {"base_storage": "int8", "method": "lora"},
    "full": {"base_storage": "float", "method": "full"},
}


def moved_key_errors(data: dict[str, Any]) -> list[str]:
    """One message per key of ``data`` (a whole config) that has moved, naming its new place."""
    errors = []
    for (section, key), new in MOVED.items():
        part = data.get(section)
        if isinstance(part, dict) and key in part:
            errors.append(f"{section}.{key} has moved to {new} (one chat section for every stage)")
    train = data.get("train")
    if isinstance(train, dict) and "mode" in train:
        now = MODE_NAMES.get(str(train["mode"]))
        spelled = ", ".join(f"train.{k}: {v}" for k, v in now.items()) if now else "train.base_storage and train.method"
        errors.append(f"train.mode is now two settings: mode {train['mode']!r} is {spelled}")
    lora = train.get("lora") if isinstance(train, dict) else None
    if isinstance(lora, dict) and "dora" in lora:
        errors.append("train.lora.dora has moved: DoRA is train.method: dora")
    if errors:
        errors.append("`llama-pipe schema --config-file FILE` moves them (FILE rewritten in place)")
    return errors


def migrate(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``data`` (a whole config as read) with its moved keys in their new places, and one line per
    old value that was dropped because another old key already gave the new key a different value.

    Where several old keys meet in one new key, train's wins: it is what training used, and what the
    workflow passed to split. A null template (merge_adapter/eval/serve: "the recorded one") is
    chat.template's ``auto``, so it is dropped.
    """
    out: dict[str, Any] = json.loads(json.dumps(data))
    notes = []
    for (section, key), new in sorted(MOVED.items(), key=lambda item: item[0][0] != "train"):
        part = out.get(section)
        if not isinstance(part, dict) or key not in part:
            continue
        value = part.pop(key)
        new_section, new_key = new.split(".")
        target = out.setdefault(new_section, {})
        if value is None and new_key == "template":
            continue
        if new_key not in target:
            target[new_key] = value
        elif target[new_key] != value:
            notes.append(f"{section}.{key}: {value!r} dropped, {new} is {target[new_key]!r}")
    train = out.get("train")
    if isinstance(train, dict):
        mode = train.pop("mode", None)
        if mode is not None:
            for key, value in MODE_NAMES.get(str(mode), {}).items():
                train.setdefault(key, value)
        lora = train.get("lora")
        if isinstance(lora, dict) and lora.pop("dora", False) is True:
            if train.get("method", "lora") == "lora":
                train["method"] = "dora"
            else:
                notes.append(f"train.lora.dora: true dropped, train.method is {train['method']!r}")
    return out, notes


#: How deep a config file may nest (the deepest setting is 3 levels down).
MAX_YAML_DEPTH = 20


def yaml_loader() -> Any:
    """A safe YAML loader that also reads ``1e-5`` / ``2e-4`` as numbers (YAML 1.1 would not), and
    refuses aliases and nesting deeper than :data:`MAX_YAML_DEPTH` (a ``yaml.YAMLError``)."""
    import re

    import yaml
    from yaml.composer import ComposerError

    class Loader(yaml.SafeLoader):
        _depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                raise ComposerError(None, None, "found an alias (*name): YAML anchors and aliases are not allowed in a "
                                    "llama-pipe config (an alias can expand to billions of values); write the value out",
                                    self.peek_event().start_mark)
            if self._depth >= MAX_YAML_DEPTH:
                raise ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", self.peek_event().start_mark)
            self._depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return Loader


def read_config_text(path: str | Path) -> tuple[str, dict[str, Any]]:
    """A config.yaml's text and its data (a mapping), not validated yet."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.load(text, Loader=yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except (ValueError, OverflowError, RecursionError) as exc:  # a value YAML cannot convert (a 5,000-digit integer)
        raise ConfigError(f"{path}: a value cannot be read: {str(exc)[:200]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return text, data


def shared_value(data: Any, root: str = "") -> str | None:
    """The key path of the first mapping or list that ``data`` reaches twice (what a YAML alias
    makes), else None. Visits each object once, so an alias bomb costs its size on disk."""
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(data, root)]
    while stack:
        node, path = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        if id(node) in seen:
            return path or "(top level)"
        seen.add(id(node))
        items = node.items() if isinstance(node, dict) else enumerate(node)
        stack.extend((v, f"{path}.{k}" if path and isinstance(node, dict) else f"{path}[{k}]" if path else str(k))
                     for k, v in items)
    return None


def check_config_data(data: dict[str, Any], path: str | Path) -> None:
    """Refuse moved keys (naming their new places) and anything the schema does not allow."""
    moved = moved_key_errors(data)
    if moved:
        raise ConfigError(f"{path}: " + "; ".join(moved))
    try:
        validate(json.loads(json.dumps(data)), Config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_raw_config(path: str | Path) -> dict[str, Any]:
    """Read a config.yaml, validate it against the schema, and return the plain data."""
    _, data = read_config_text(path)
    check_config_data(data, path)
    return data


def load_config(path: str | Path) -> Config:
    """Read and validate a config.yaml into a :class:`Config`."""
    return from_dict(Config, load_raw_config(path))


def settings_from_args(args: argparse.Namespace, cls: type[T], section: str) -> T:
    """The settings for a stage: defaults < config file section < explicit flags; validated.

    The flags are those :func:`llama_pipe.core.settings.add_settings_arguments` added for ``section``
    (a stage may have the flags of two sections, e.g. train and chat)."""
    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        raw = load_raw_config(args.config)
        data = json.loads(json.dumps(raw.get(section) or {}))
    prefix = f"setting:{section}:"
    for key, value in vars(args).items():
        if not key.startswith(prefix):
            continue
        node = data
        parts = key[len(prefix) :].split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return from_dict(cls, data, root=section)
