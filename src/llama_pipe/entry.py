"""Running one stage as a command: logging set up, and the errors a user can fix
(:class:`~llama_pipe.core.errors.InputError`, :class:`~llama_pipe.core.errors.ConfigError`) shown as one
line with exit status 2 (an interrupt: 130).

Used by ``llama-pipe STAGE`` and ``python -m llama_pipe STAGE`` (:mod:`llama_pipe.cli`, which routes).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from llama_pipe.core.atomic import running_stage
from llama_pipe.core.errors import ConfigError, InputError


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
