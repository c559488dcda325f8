"""The errors a stage reports to its user as ``llama-pipe STAGE: error: ...`` with exit code 2
(:func:`llama_pipe.cli.main` catches them; anything else is a bug and shows its traceback).

* :class:`InputError` - a whole input is unusable (missing, not UTF-8, the wrong shape);
* :class:`OutputError` - an output could not be written (nothing of it is left behind);
* :class:`ConfigError` - a setting is invalid (the message names its key path).
"""

from __future__ import annotations


class InputError(Exception):
    """A whole input is unusable (the stage exits with code 2). The message names file and place."""


class OutputError(InputError):
    """An output could not be written (a directory in the way, a full disk): exit code 2, and
    nothing of the stage's outputs is left behind (the older versions, if any, stay as they were)."""


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the key path and what was expected."""
