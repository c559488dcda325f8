"""File digests (sha256, md5, ...) of weights, wheels and data files."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(path: str | Path, algo: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file (``sha256``, ``md5``, ...), read in chunks."""
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
