"""Typed settings: dataclasses <-> JSON schema <-> command-line flags.

One source of truth for every option of every stage: the dataclasses in
:mod:`llama_pipe.config`. From them this module derives

* the JSON schema (``workflow/schemas/config.schema.yaml``) that Snakemake and the CLI both
  validate ``config.yaml`` against,
* argparse flags (``--lora.r 16``) so every setting can be given on the command line, and
* the flag list a Snakemake rule passes to ``llama-pipe <stage>`` (``settings_to_argv``), so a
  changed setting changes the rule's ``params`` and re-runs that rule.

A field documents itself with ``opt(default, "help text", minimum=..., ...)``.

Numbers must be finite: JSON schema cannot say so (``NaN`` passes every ``minimum``/``maximum``
comparison, since every comparison with it is false), so :func:`validate` refuses NaN and
infinities from a config file or ``--config`` (YAML's ``.nan``, ``.inf``, ``1e999``) and the flag
parser refuses them on the command line (``--request_timeout nan``). Seeds are bounded to
``0 .. SEED_MAX`` (what numpy, torch and langdetect all accept).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import shlex
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeGuard, TypeVar, cast, get_args, get_origin

from llama_pipe.core.errors import ConfigError

T = TypeVar("T")

#: The largest seed: every library a seed reaches (numpy's legacy seeding, torch, langdetect) takes it.
SEED_MAX = 2**32 - 1

_SCHEMA_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "pattern", "minLength")


def opt(default: Any, doc: str, performance: bool = False, **constraints: Any) -> Any:
    """A dataclass field with a default, a help text and optional JSON-schema constraints.
    ``performance``: a knob that changes how fast a stage runs, never what it writes (the workflow
    leaves it out of the stage's params, so changing it re-runs nothing: :func:`performance_keys`)."""
    unknown = set(constraints) - set(_SCHEMA_KEYS)
    if unknown:
        raise TypeError(f"unknown constraint(s) {sorted(unknown)}")
    meta = {"doc": doc, **constraints, **({"performance": True} if performance else {})}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=_copies_of(default), metadata=meta)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _copies_of(default: list[Any] | dict[str, Any]) -> Callable[[], Any]:
    """A default factory: a fresh copy of a list or dict default for each instance."""
    return lambda: json.loads(json.dumps(default))


def performance_keys(cls: type) -> tuple[str, ...]:
    """The fields of a settings class marked ``performance`` (:func:`opt`)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("performance"))


def _is_settings_class(tp: Any) -> TypeGuard[type[Any]]:
    """Whether a field's (non-optional) type is a nested settings dataclass."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a settings class (cached: looked up per field; not to be mutated)."""
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_schema(tp: Any) -> dict[str, Any]:
    inner, optional = _strip_optional(tp)
    if _is_settings_class(inner):
        schema: dict[str, Any] = dataclass_schema(inner)
    elif get_origin(inner) is Literal:
        schema = {"enum": list(get_args(inner))}
    elif get_origin(inner) is list:
        (item,) = get_args(inner)
        schema = {"type": "array", "items": _type_schema(item)}
    elif inner is bool:
        schema = {"type": "boolean"}
    elif inner is int:
        schema = {"type": "integer"}
    elif inner is float:
        schema = {"type": "number"}
    elif inner is str:
        schema = {"type": "string"}
    else:  # pragma: no cover - a programming error in config.py
        raise TypeError(f"unsupported settings type {tp!r}")
    if optional:
        if "enum" in schema:
            schema["enum"] = schema["enum"] + [None]
        else:
            schema["type"] = [schema["type"], "null"]
    return schema


def dataclass_schema(cls: type) -> dict[str, Any]:
    """The JSON schema of a settings dataclass (recursively), with descriptions and defaults."""
    props: dict[str, Any] = {}
    hints = _hints(cls)
    default_obj = cls()
    for f in dataclasses.fields(cls):
        schema = _type_schema(hints[f.name])
        meta = dict(f.metadata)
        schema["description"] = meta.pop("doc", "")
        for key in _SCHEMA_KEYS:
            if key in meta:
                target = schema
                if schema.get("type") == "array":
                    target = schema["items"]
                target[key] = meta[key]
        value = getattr(default_obj, f.name)
        if not dataclasses.is_dataclass(value):
            schema["default"] = value
        props[f.name] = schema
    doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    return {"type": "object", "description": doc, "additionalProperties": False, "properties": props}


def _format_error(err: Any, root: str) -> str:
    path = ".".join([root, *[str(p) for p in err.absolute_path]] if root else [str(p) for p in err.absolute_path])
    where = path or "(top level)"
    if err.validator == "additionalProperties":
        return _unknown_keys(err, path)
    expected = {k: err.schema[k] for k in ("type", "enum", *_SCHEMA_KEYS) if k in err.schema}
    return f"{where}: {err.message}; expected {expected}"


def _unknown_keys(err: Any, path: str) -> str:
    """One line per unknown key: its full path and the closest valid key (or the valid keys)."""
    import difflib

    valid = sorted(err.schema.get("properties", {}))
    extra = [k for k in err.instance if k not in valid] if isinstance(err.instance, dict) else []
    lines = []
    for key in extra:
        where = f"{path}.{key}" if path else str(key)
        close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
        lines.append(f"{where}: unknown key; {hint}")
    return "\n  ".join(lines) or f"{path or '(top level)'}: {err.message}"


def nonfinite_numbers(data: Any, root: str = "") -> list[str]:
    """One message per NaN or infinity in plain data (a config section), naming its key path."""
    found: list[str] = []
    stack: list[tuple[Any, str]] = [(data, root)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k)) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node))
        elif isinstance(node, float) and not math.isfinite(node):
            found.append(f"{path or '(top level)'}: {node} is not a finite number (NaN and infinities pass no bound); give a number")
    return sorted(found)


def validate(data: Any, cls: type, root: str = "") -> None:
    """Validate plain data against the schema of ``cls``; raise ConfigError naming every bad key path.
    A NaN or infinity anywhere is an error too (the schema cannot express it)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(dataclass_schema(cls))
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    messages = [_format_error(e, root) for e in errors] + nonfinite_numbers(data, root)
    if messages:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(messages))


def from_dict(cls: type[T], data: dict[str, Any] | None, root: str = "") -> T:
    """Build a settings dataclass from (validated) plain data; missing keys take their defaults."""
    data = dict(data or {})
    validate(data, cls, root)
    return _build(cls, data)


def _build(cls: type[T], data: dict[str, Any]) -> T:
    hints = _hints(cast(type, cls))
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cast(Any, cls)):
        if f.name not in data:
            continue
        inner, _ = _strip_optional(hints[f.name])
        value = data[f.name]
        if _is_settings_class(inner) and isinstance(value, dict):
            value = _build(inner, value)
        elif inner is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-data form of a settings dataclass."""
    return dataclasses.asdict(obj)


# ---------------------------------------------------------------- command-line flags


def nested_settings(cls: type, name: str) -> type | None:
    """The settings class of field ``name`` of ``cls`` when that field is a nested block, else None."""
    inner, _ = _strip_optional(_hints(cls)[name])
    return inner if _is_settings_class(inner) else None


def _leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field[Any]]]:
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        sub = nested_settings(cls, f.name)
        if sub is not None:
            out.extend(_leaf_fields(sub, f"{prefix}{f.name}."))
        else:
            out.append((prefix + f.name, hints[f.name], f))
    return out


def _parse_value(text: str, tp: Any) -> Any:
    inner, optional = _strip_optional(tp)
    if optional and text.lower() in ("null", "none", "~"):
        return None
    if get_origin(inner) is list:
        stripped = text.strip()
        if stripped.startswith("["):
            return json.loads(stripped)
        (item,) = get_args(inner)  # each comma-separated item read as its type (1.5 is a number in a list[float])
        return [_parse_value(s.strip(), item) for s in stripped.split(",") if s.strip()] if stripped else []
    if inner is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    if inner is int:
        return int(text)
    if inner is float:
        value = float(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        return value
    if get_origin(inner) is Literal:
        choices = get_args(inner)
        for c in choices:
            if str(c) == text:
                return c
        raise argparse.ArgumentTypeError(f"expected one of {list(choices)}, got {text!r}")
    return text


def _parser_for(tp: Any) -> Callable[[str], Any]:
    """argparse's ``type=`` for a setting of type ``tp`` (a lambda, as argparse names it in errors)."""
    return lambda text: _parse_value(text, tp)


def add_settings_arguments(
    parser: argparse.ArgumentParser, cls: type, section: str, config_flag: bool = True, only: tuple[str, ...] | None = None
) -> None:
    """Add one ``--dotted.name VALUE`` flag per setting of ``cls`` plus ``--config FILE``.

    Flags default to "not given"; ``settings_from_args`` layers them over the config file section.
    A stage that reads a second section (the ``chat`` one) adds its flags with ``config_flag=False``;
    ``only`` limits the flags to those settings (the ones the stage reads).
    """
    group = parser.add_argument_group(f"settings (section '{section}' of config.yaml; flags override it)")
    if config_flag:
        group.add_argument(
            "--config",
            metavar="FILE",
            default=None,
            help="config.yaml to read this stage's sections from (validated against the schema)",
        )
    for name, tp, f in _leaf_fields(cls):
        if only is not None and name.split(".")[0] not in only:
            continue
        inner, _ = _strip_optional(tp)
        hint = ""
        if get_origin(inner) is Literal:
            hint = " {" + ",".join(str(c) for c in get_args(inner)) + "}"
        elif get_origin(inner) is list:
            hint = " (comma-separated or a JSON list)"
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        group.add_argument(
            *flags,
            dest=f"setting:{section}:{name}",
            metavar="V",
            default=argparse.SUPPRESS,
            type=_parser_for(tp),
            help=f"{f.metadata.get('doc', '')}{hint}".replace("%", "%%"),  # argparse formats help with %
        )


def settings_to_argv(data: dict[str, Any], cls: type, prefix: str = "") -> list[str]:
    """Flags that reproduce ``data`` (a config section) on a ``llama-pipe`` command line.

    ``--key value``, or ``--key=value`` when the value starts with ``-`` (a system prompt of
    ``-h``, a negative number): argparse would take a separate ``-h`` for an option."""
    argv: list[str] = []
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        sub = nested_settings(cls, f.name)
        if sub is not None and isinstance(value, dict):
            argv += settings_to_argv(value, sub, f"{prefix}{f.name}.")
            continue
        if value is None:
            text = "null"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, list):
            text = json.dumps(value, ensure_ascii=False)
        else:
            text = str(value)
        if text.startswith("-"):  # "--system_prompt -h" would read -h as an option: one argument instead
            argv.append(f"--{prefix}{f.name}={text}")
        else:
            argv += [f"--{prefix}{f.name}", text]
    return argv


def shell_args(data: dict[str, Any], cls: type) -> str:
    """``settings_to_argv`` joined for a shell command line, every value quoted."""
    return " ".join(shlex.quote(a) for a in settings_to_argv(data, cls))


def describe(obj: Any) -> str:
    """One line per resolved setting, for the start of a stage's log."""
    lines = []

    def walk(value: Any, prefix: str) -> None:
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, f"{prefix}{f.name}.")
            else:
                lines.append(f"  {prefix}{f.name} = {json.dumps(v, ensure_ascii=False)}")

    walk(obj, "")
    return "\n".join(lines)
