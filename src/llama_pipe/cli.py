"""The ``llama-pipe`` command: one subcommand per pipeline stage.

Each stage lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
the stages, their modules and help texts are listed once, in :mod:`llama_pipe.stages`; this file
only routes (:mod:`llama_pipe.entry` sets up logging and turns a user's error into exit status
2). Heavy imports (torch, transformers) happen inside ``run`` so that
``llama-pipe --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from llama_pipe import __version__
from llama_pipe.entry import run_stage, setup_logging
from llama_pipe.stages import BY_NAME, STAGES


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``stage``'s module is imported (all of them when None)."""
    parser = argparse.ArgumentParser(
        prog="llama-pipe",
        description="Turn a LLaMA-family base model plus raw chat logs into a fine-tuned, merged, evaluated chat model.",
    )
    parser.add_argument("--version", action="version", version=f"llama-pipe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="STAGE", required=True)
    for st in STAGES:
        if stage is not None and st.name != stage:
            sub.add_parser(st.name, help=st.help, add_help=False)
            continue
        mod = importlib.import_module(st.module)
        p = sub.add_parser(st.name, help=st.help, description=st.help)
        mod.add_arguments(p)
        p.set_defaults(_module=st.module, _name=st.name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(stage if stage in BY_NAME else "")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    mod = importlib.import_module(args._module)
    return run_stage(args._name, mod.run, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
