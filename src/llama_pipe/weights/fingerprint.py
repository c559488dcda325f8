"""A model directory's weights named by one short digest: :func:`weights_fingerprint`.

Reads the safetensors headers and, of every tensor, its name, dtype, shape, byte count and a
sample of its bytes (``windows`` evenly spaced windows of ``window`` bytes, the first and the
last included; a tensor no larger than the sample is hashed whole), in tensor-name order. So it

* costs a few reads per tensor, not a pass over the file (about 37 MiB of a 13 GB 7B model,
  well under a second from a page cache, a few seconds from a cold disk);
* does not depend on how the weights are sharded into files, their file names, the file
  modification times, ``config.json``, the tokenizer or any sidecar;
* changes when a tensor is added, removed, renamed, reshaped or stored in another dtype, and when
  its values change anywhere a window sees: every element of a matrix that a merged LoRA adapter
  or a fine-tune touched changes, so any window of it does.

It is an identity for weights that llama-pipe and its users write, not a defence against a
crafted file: an edit of a few bytes between the windows goes unseen. ``windows=0`` hashes every
byte (a full read of the model) where that matters.

Used by merge-adapter and the trainer to record what an adapter was trained on
(:mod:`llama_pipe.models.lineage`); anything else that must tell two bases apart (a resumed checkpoint,
a cache) can call it the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from pathlib import Path
from typing import BinaryIO

from llama_pipe.weights.hf import safetensors_files
from llama_pipe.weights.validate import read_safetensors_header

VERSION = b"llama-pipe weights fingerprint v1"
WINDOWS = 32
WINDOW = 4096


def _offsets(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """(start of the data section, {tensor: (begin, end)}) of a safetensors file whose header
    :func:`read_safetensors_header` has already checked."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n).decode("utf-8"))
    return 8 + n, {k: (v["data_offsets"][0], v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"}


def _sample_starts(size: int, windows: int, window: int) -> list[int]:
    """Start offsets of the sampled windows of a ``size``-byte tensor ([0] and the whole tensor
    when it is no larger than the sample)."""
    if windows <= 0 or size <= windows * window:
        return [0]
    last = size - window
    return [round(i * last / (windows - 1)) for i in range(windows)]


def weights_fingerprint(model_dir: str | Path, windows: int = WINDOWS, window: int = WINDOW) -> str:
    """The sha256 hex digest that identifies the safetensors weights of ``model_dir`` (see the
    module docstring). Raises :class:`~llama_pipe.core.errors.InputError` for a directory without
    safetensors weights or with a header that lies."""
    model_dir = Path(model_dir)
    tensors: list[tuple[str, Path, str, tuple[int, ...], int, int]] = []
    for name in safetensors_files(model_dir):
        path = model_dir / name
        shapes = read_safetensors_header(path)  # checked: every byte belongs to one tensor
        data_start, spans = _offsets(path)
        for tensor, (dtype, shape) in shapes.items():
            begin, end = spans[tensor]
            tensors.append((tensor, path, dtype, shape, data_start + begin, end - begin))
    h = hashlib.sha256(VERSION)
    h.update(struct.pack("<qq", windows, window))
    with contextlib.ExitStack() as stack:
        handles: dict[Path, BinaryIO] = {}
        for tensor, path, dtype, shape, start, size in sorted(tensors):
            if path not in handles:
                handles[path] = stack.enter_context(open(path, "rb"))
            fh = handles[path]
            h.update(json.dumps([tensor, dtype, list(shape), size]).encode() + b"\0")
            whole = windows <= 0 or size <= windows * window
            for at in _sample_starts(size, windows, window):
                fh.seek(start + at)
                want = size if whole else window
                while want > 0:  # a whole tensor may be large (windows=0): read it in chunks
                    chunk = fh.read(min(want, 1 << 24))
                    if not chunk:
                        break
                    h.update(chunk)
                    want -= len(chunk)
    return h.hexdigest()


def short(fingerprint: str) -> str:
    """The first 12 hex digits, for messages."""
    return fingerprint[:12]
