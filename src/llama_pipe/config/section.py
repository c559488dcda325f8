"""The ``config.yaml`` sections, as their settings classes declare them (:func:`section`).

A settings class becomes a section by its decorator alone: :mod:`llama_pipe.config.sections` builds
:class:`~llama_pipe.config.Config` (and so the schema, the docs and config.yaml's layout) from
:data:`SECTIONS`, in the order the classes are defined: the modules ``weights``, ``chat``, ``data``,
``train``, ``outputs``, each top to bottom.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: Each section's settings class, by section name, as declared (:data:`llama_pipe.config.SECTIONS`
#: puts them in config.yaml's order).
SECTIONS: dict[str, type] = {}
#: Each section's one-line help (the schema's description of the section).
SECTION_HELP: dict[str, str] = {}


def section(name: str, help: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: the settings dataclass below is the ``config.yaml`` section ``name``."""

    def register(cls: type[T]) -> type[T]:
        if name in SECTIONS and SECTIONS[name] is not cls:
            raise ValueError(f"config section {name!r} is declared twice ({SECTIONS[name].__name__}, {cls.__name__})")
        SECTIONS[name], SECTION_HELP[name] = cls, help
        return cls

    return register
