"""The ``llama_pipe.json`` written beside a model or adapter directory, and what was recorded with a
model: that file first, then the trainer's ``train_config.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SIDECAR = "llama_pipe.json"


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The ``llama_pipe.json`` of a model or adapter directory ({} when absent or unreadable)."""
    f = Path(path) / SIDECAR
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def recorded(dirs: list[Path], key: str) -> tuple[bool, Any]:
    """(found, value) of ``key`` as recorded with a model/adapter: ``llama_pipe.json``, then the
    trainer's ``train_config.json`` (``chat.<key>``; ``train.<key>`` in runs from before the chat
    section); the last directory wins."""
    for d in reversed(dirs):
        side = read_sidecar(d)
        if key in side:
            return True, side[key]
        try:
            written = json.loads((Path(d) / "train_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for section in ("chat", "train"):
            part = written.get(section) if isinstance(written, dict) else None
            if isinstance(part, dict) and key in part:
                return True, part[key]
    return False, None
