"""Print or write the JSON schema of config.yaml, its Markdown reference, or config.yaml's
comments; all three are generated from the settings dataclasses in ``llama_pipe.config``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llama_pipe.config import config_schema
from llama_pipe.config.annotated import rewrite
from llama_pipe.config.load import check_config_data, migrate, read_config_text
from llama_pipe.core.atomic import AtomicFile

SCHEMA_PATH = Path("workflow/schemas/config.schema.yaml")
REFERENCE_PATH = Path("docs/config.md")
CONFIG_FILE_PATH = Path("config.yaml")


def render_schema() -> str:
    import yaml

    header = "# Generated from src/llama_pipe/config/ by `llama-pipe schema --write`; do not edit.\n"
    return header + yaml.safe_dump(config_schema(), sort_keys=False, allow_unicode=True, width=100)


def _type_text(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return " \\| ".join(json.dumps(v) for v in schema["enum"])
    t = schema.get("type", "")
    if isinstance(t, list):
        t = " or ".join(t)
    if t == "array":
        t = f"list of {schema['items'].get('type', '')}"
    bounds = [f"{k} {schema[k]}" for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") if k in schema]
    return t + (f" ({', '.join(bounds)})" if bounds else "")


def render_reference() -> str:
    """docs/config.md: one table per section, every key with type, default and help."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `src/llama_pipe/config/` by `llama-pipe schema --reference`; do not edit.",
        "Every key is optional. Any key can also be given to its stage as a flag:",
        "`llama-pipe train --config config.yaml --lora.r 16` (flags override the file).",
        "Numbers must be finite (`.nan`, `.inf`, `1e999` are refused: NaN passes every bound), and",
        "YAML anchors and aliases (`&x`, `*x`) are refused (an alias can expand to billions of values).",
        "",
    ]

    def table(section: str, schema: dict[str, Any]) -> None:
        nested = []
        lines.extend([f"## `{section}`", "", schema.get("description", ""), "", "| key | type | default | meaning |", "|---|---|---|---|"])
        for key, prop in schema["properties"].items():
            if prop.get("type") == "object":
                nested.append((f"{section}.{key}", prop))
                continue
            default = json.dumps(prop.get("default"), ensure_ascii=False).replace("|", "\\|")
            lines.append(f"| `{key}` | {_type_text(prop)} | `{default}` | {prop['description'].replace('|', '/')} |")
        lines.append("")
        for name, prop in nested:
            table(name, prop)

    for section, prop in config_schema()["properties"].items():
        table(section, prop)
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--write", metavar="PATH", nargs="?", const=str(SCHEMA_PATH), help=f"write the schema (default {SCHEMA_PATH})")
    parser.add_argument(
        "--reference", metavar="PATH", nargs="?", const=str(REFERENCE_PATH), help=f"write the Markdown reference (default {REFERENCE_PATH})"
    )
    parser.add_argument(
        "--config-file", metavar="PATH", nargs="?", const=str(CONFIG_FILE_PATH),
        help=f"rewrite a config.yaml in place (default {CONFIG_FILE_PATH}): its values and its own notes kept, every key "
        "present, each key's comment its help text, keys of an older version moved to their new places",
    )


def run(args: argparse.Namespace) -> int:
    targets: list[tuple[str, Callable[[], str]]] = []
    if args.write:
        targets.append((args.write, render_schema))
    if args.reference:
        targets.append((args.reference, render_reference))
    if args.config_file:
        text, data = read_config_text(args.config_file)
        values, dropped = migrate(data)  # keys of an older config.yaml go to their new places
        check_config_data(values, args.config_file)  # then valid: an unknown key is an error, not dropped
        for line in dropped:
            print(f"{args.config_file}: {line}")
        targets.append((args.config_file, lambda: rewrite(text, values)))
    for target, render in targets:
        f = AtomicFile(target)
        f.fh.write(render())
        f.commit()
        print(f"wrote {target}")
    if not targets:
        print(render_schema(), end="")
    return 0
