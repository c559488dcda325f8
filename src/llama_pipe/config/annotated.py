"""``config.yaml`` with its comments written from the settings' help texts.

``llama-pipe schema --config-file`` rewrites the file: every section and key in the order of
:class:`~llama_pipe.config.Config`, each value as the file had it (else its default), and after
each key ``# <help>`` from its ``opt(...)``, the same text as the schema, the flags' ``--help`` and
docs/config.md. Two kinds of lines are the file's own and are kept: the header (the comment lines
before the first blank line) and comment lines just above a key, the place for a note on why a
value differs from its default. The comment line right above a section or a nested block (``lora:``)
is its help text, written anew each time. A test checks the file is what this writes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from llama_pipe.config.sections import SECTIONS, Config
from llama_pipe.core.settings import nested_settings

_KEY = re.compile(r"^( *)([A-Za-z_][A-Za-z0-9_]*):")
INDENT = "  "


def _doc(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("doc", ""))


def _blocks(cls: type = Config, prefix: str = "") -> set[str]:
    """The dotted path of every block (a section or a nested block such as ``train.lora``)."""
    paths = set()
    for f in dataclasses.fields(cls):
        sub = nested_settings(cls, f.name)
        if sub is not None:
            paths |= {prefix + f.name, *_blocks(sub, f"{prefix}{f.name}.")}
    return paths


def read_layout(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """The file's own lines: its header, and the note lines above each key (by dotted path)."""
    lines = text.splitlines()
    header: list[str] = []
    while lines and lines[0].startswith("#"):
        header.append(lines.pop(0))
    blocks = _blocks()
    notes: dict[str, list[str]] = {}
    pending: list[str] = []
    path: list[str] = []
    above = ""  # the line right above the current one
    for line in lines:
        stripped, above_this = line.strip(), above
        above = stripped
        if stripped.startswith("#"):
            pending.append(stripped)
            continue
        match = _KEY.match(line)
        if match is None:
            continue
        depth = len(match.group(1)) // len(INDENT)
        path = [*path[:depth], match.group(2)]
        if ".".join(path) in blocks and above_this.startswith("#"):
            pending.pop()  # the block's help text: written anew
        if pending:
            notes[".".join(path)] = pending
            pending = []
    return header, notes


def _value(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _block(cls: type, values: dict[str, Any], path: str, depth: int, notes: dict[str, list[str]], out: list[str]) -> None:
    pad = INDENT * depth
    defaults = cls()
    for f in dataclasses.fields(cls):
        key = f"{path}.{f.name}"
        out.extend(pad + note for note in notes.get(key, []))
        sub = nested_settings(cls, f.name)
        given = values.get(f.name, getattr(defaults, f.name))
        if sub is not None:
            out += [f"{pad}# {_doc(f)}", f"{pad}{f.name}:"]
            _block(sub, given if isinstance(given, dict) else {}, key, depth + 1, notes, out)
        else:
            out.append(f"{pad}{f.name}: {_value(given)}  # {_doc(f)}")


def render_config_file(values: dict[str, Any], header: list[str], notes: dict[str, list[str]]) -> str:
    """The whole file: ``values`` (a config's raw data) in the layout of :class:`Config`."""
    out = list(header)
    for f in dataclasses.fields(Config):
        out.append("")
        out.extend(notes.get(f.name, []))
        out += [f"# {_doc(f)}", f"{f.name}:"]
        section = values.get(f.name)
        _block(SECTIONS[f.name], section if isinstance(section, dict) else {}, f.name, 1, notes, out)
    return "\n".join(out) + "\n"


def rewrite(text: str, values: dict[str, Any] | None = None) -> str:
    """``text`` (a valid config.yaml) with its keys completed and its comments regenerated;
    ``values``: the data to write instead of the text's own (its moved keys moved)."""
    import yaml

    from llama_pipe.config.load import yaml_loader

    if values is None:
        values = yaml.load(text, Loader=yaml_loader()) or {}  # noqa: S506 - a SafeLoader subclass
    header, notes = read_layout(text)
    return render_config_file(values, header, notes)
