"""Print or write the JSON schema of config.yaml, generated from the settings dataclasses."""

from __future__ import annotations

import argparse
from pathlib import Path

SCHEMA_PATH = Path("workflow/schemas/config.schema.yaml")


def render_schema() -> str:
    import yaml

    from llama_pipe.config import config_schema

    header = "# Generated from src/llama_pipe/config.py by `llama-pipe schema --write`; do not edit.\n"
    return header + yaml.safe_dump(config_schema(), sort_keys=False, allow_unicode=True, width=100)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--write", metavar="PATH", nargs="?", const=str(SCHEMA_PATH), help=f"write it (default {SCHEMA_PATH})")


def run(args: argparse.Namespace) -> int:
    text = render_schema()
    if args.write:
        from llama_pipe.records import AtomicFile

        f = AtomicFile(args.write)
        f.fh.write(text)
        f.commit()
        print(f"wrote {args.write}")
    else:
        print(text, end="")
    return 0
