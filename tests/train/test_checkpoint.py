"""Checkpoint verification: a damaged, unfinished or foreign checkpoint is never resumed from."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from llama_pipe.train.checkpoint import TRAINER_STATE, find_latest_valid, verify_checkpoint, write_manifest


def _fake(root: Path, step: int, fp: str = "fp1") -> Path:
    d = root / "checkpoints" / f"step-{step:08d}"
    d.mkdir(parents=True)
    (d / "optimizer.bin").write_bytes(bytes(range(256)) * 8)
    (d / TRAINER_STATE).write_text(json.dumps({"step": step, "fingerprint": fp}))
    write_manifest(d)
    return d


def test_intact_checkpoint_verifies(tmp_path: Path) -> None:
    d = _fake(tmp_path, 4)
    assert verify_checkpoint(d, "fp1") is None


def test_newest_corrupt_checkpoint_is_skipped_for_the_previous_one(tmp_path: Path, caplog) -> None:
    old, new = _fake(tmp_path, 2), _fake(tmp_path, 4)
    data = bytearray((new / "optimizer.bin").read_bytes())
    data[100] ^= 0xFF  # same size, one flipped byte
    (new / "optimizer.bin").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert find_latest_valid(tmp_path, "fp1") == old
    assert "optimizer.bin does not match its sha256" in caplog.text


def test_truncated_missing_and_unfinished_checkpoints_are_rejected(tmp_path: Path) -> None:
    d = _fake(tmp_path, 6)
    with open(d / "optimizer.bin", "r+b") as fh:
        fh.truncate(10)
    assert "10 bytes" in verify_checkpoint(d, "fp1")
    d2 = _fake(tmp_path, 8)
    (d2 / "manifest.json").unlink()  # killed before the manifest was written
    assert verify_checkpoint(d2, "fp1") == "missing manifest.json"
    d3 = _fake(tmp_path, 10)
    (d3 / "optimizer.bin").unlink()
    assert verify_checkpoint(d3, "fp1") == "missing optimizer.bin"
    tmp = tmp_path / "checkpoints" / ".step-00000012.tmp"  # a save that never finished
    tmp.mkdir()
    assert find_latest_valid(tmp_path, "fp1") is None


def test_checkpoint_of_another_configuration_is_not_used(tmp_path: Path) -> None:
    d = _fake(tmp_path, 2, fp="other")
    assert "different configuration" in verify_checkpoint(d, "fp1")
    assert find_latest_valid(tmp_path, "fp1") is None
