"""The whole ``config.yaml``: one field per section, in the order the sections are declared
(:func:`llama_pipe.config.section.section` on each settings class)."""

from __future__ import annotations

from dataclasses import make_dataclass
from typing import Any

import llama_pipe.config.chat  # noqa: F401  (declares its sections)
import llama_pipe.config.data  # noqa: F401  (declares its sections)
import llama_pipe.config.outputs  # noqa: F401  (declares its sections)
import llama_pipe.config.train  # noqa: F401  (declares its sections)
import llama_pipe.config.weights  # noqa: F401  (declares its sections)
from llama_pipe.config.section import SECTION_HELP
from llama_pipe.config.section import SECTIONS as DECLARED
from llama_pipe.core.settings import dataclass_schema, opt

#: The modules declaring sections, in the order config.yaml lists them (each top to bottom).
MODULES = tuple(f"llama_pipe.config.{name}" for name in ("weights", "chat", "data", "train", "outputs"))
#: Each section's settings class, by section name, in config.yaml's order.
SECTIONS: dict[str, type] = {name: cls for m in MODULES for name, cls in DECLARED.items() if cls.__module__ == m}
if set(SECTIONS) != set(DECLARED):
    raise ImportError(f"config sections declared outside {MODULES}: {sorted(set(DECLARED) - set(SECTIONS))}")

#: The whole ``config.yaml``: a dataclass with one field per section of :data:`SECTIONS`.
Config: Any = make_dataclass("Config", [(name, cls, opt(cls, SECTION_HELP[name])) for name, cls in SECTIONS.items()])
Config.__doc__ = "The whole ``config.yaml``."
Config.__module__ = __name__


def config_schema() -> dict[str, Any]:
    """The JSON schema of config.yaml (what ``workflow/schemas/config.schema.yaml`` holds)."""
    schema = dataclass_schema(Config)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "llama-pipe config.yaml"
    return schema
