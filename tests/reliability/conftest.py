"""Fixtures of the reliability suite: a tiny Meta-layout base built once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import SAMPLE


@pytest.fixture(scope="session")
def meta_base_session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``llama-pipe make-base`` output (2 model-parallel shards), built once; copy before editing."""
    from tests.reliability.harness import stage_missing

    why = stage_missing("make-base")
    if why:
        pytest.skip(why)
    from llama_pipe.cli import main

    out = tmp_path_factory.mktemp("meta_base") / "base"
    rc = main(["make-base", str(out), "--tokenizer-corpus", str(SAMPLE), "--tiny.n_shards", "2"])
    assert rc == 0
    return out


@pytest.fixture()
def meta_base(meta_base_session: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny Meta base this test may damage."""
    dst = tmp_path / "base"
    shutil.copytree(meta_base_session, dst)
    return dst
