"""Running one stage as a command: logging set up, and the errors a user can fix
(:class:`~llama_pipe.errors.InputError`, :class:`~llama_pipe.errors.ConfigError`) shown as one
line with exit status 2 (an interrupt: 130).

Used by ``llama-pipe STAGE`` (:mod:`llama_pipe.cli`, which routes) and by ``python -m
llama_pipe.train.loop`` (one process per rank under a launcher, which takes train's flags).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from llama_pipe.atomic import running_stage
from llama_pipe.errors import ConfigError, InputError
from llama_pipe.stages import BY_NAME


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_stage(name: str, runner: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """``runner(args)``'s exit status; a user's error is one line on stderr and status 2."""
    try:
        with running_stage(name):  # the stage every directory output records and is checked for
            return int(runner(args) or 0)
    except (InputError, ConfigError) as exc:
        print(f"llama-pipe {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llama-pipe {name}: interrupted", file=sys.stderr)
        return 130


def stage_main(name: str, argv: Sequence[str] | None = None) -> int:
    """One stage's own command line (its flags only), as ``llama-pipe NAME ARGV`` runs it."""
    st = BY_NAME[name]
    mod = importlib.import_module(st.module)
    parser = argparse.ArgumentParser(prog=f"llama-pipe {name}", description=st.help)
    mod.add_arguments(parser)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    setup_logging()
    return run_stage(name, mod.run, args)
