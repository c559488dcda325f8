"""Damaged weights and tokenizers are detected and reported by name; nothing partial is written.

A Meta-layout base from ``llama-pipe make-base`` (two model-parallel shards plus
``checklist.chk``) is damaged one way per test and given to ``llama-pipe convert``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.reliability import harness as h


def _convert(meta_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[h.Run, set[Path]]:
    h.require_stage("convert")
    before = h.files_under(tmp_path)
    out = tmp_path / "hf"
    argv = ["convert", str(meta_dir), "-o", str(out)]
    rc, err = h.run_cli(argv, capsys)
    return h.Run("convert", argv, rc, err, [out]), before


def _expect_refused(case_name: str, meta_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    run, before = _convert(meta_dir, tmp_path, capsys)
    h.check_clean_failure(run, h.case(case_name)["message"], before, tmp_path)
    assert not (tmp_path / "hf").exists()
    return run.err


def test_convert_missing_shard(meta_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The last shard is gone: the file list in checklist.chk (or the shard count) must catch it."""
    (meta_base / "consolidated.01.pth").unlink()
    _expect_refused("base_missing_shard", meta_base, tmp_path, capsys)


def test_convert_missing_first_shard(meta_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (meta_base / "consolidated.00.pth").unlink()
    run, before = _convert(meta_base, tmp_path, capsys)
    h.check_clean_failure(run, ["consolidated.00.pth"], before, tmp_path)


def test_convert_truncated_shard(meta_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shard = meta_base / "consolidated.00.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    _expect_refused("base_truncated_shard", meta_base, tmp_path, capsys)


def test_convert_corrupted_shard_same_size(meta_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Bytes flipped inside the tensor data, size unchanged: only the checksum in
    checklist.chk can tell, and it must (a silently corrupted base would train garbage)."""
    shard = meta_base / "consolidated.01.pth"
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 64):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    run, before = _convert(meta_base, tmp_path, capsys)
    h.check_clean_failure(run, ["consolidated.01.pth"], before, tmp_path)


def test_convert_params_mismatch(meta_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = json.loads((meta_base / "params.json").read_text(encoding="utf-8"))
    params["dim"] = params["dim"] * 2
    (meta_base / "params.json").write_text(json.dumps(params), encoding="utf-8")
    _expect_refused("params_disagree_with_shapes", meta_base, tmp_path, capsys)


def test_convert_params_wrong_layers(meta_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = json.loads((meta_base / "params.json").read_text(encoding="utf-8"))
    params["n_layers"] += 1
    (meta_base / "params.json").write_text(json.dumps(params), encoding="utf-8")
    run, before = _convert(meta_base, tmp_path, capsys)
    h.check_clean_failure(run, ["layers"], before, tmp_path)


def test_convert_params_garbage(meta_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (meta_base / "params.json").write_text('{"dim": 64, "n_layers": ', encoding="utf-8")
    _expect_refused("params_not_json", meta_base, tmp_path, capsys)


def test_convert_tokenizer_missing(meta_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (meta_base / "tokenizer.model").unlink()
    run, before = _convert(meta_base, tmp_path, capsys)
    h.check_clean_failure(run, ["tokenizer.model"], before, tmp_path)


def test_tokenizer_dir_without_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``split --tokenizer EMPTY_DIR``: exit 2 naming the directory, before reading data."""
    h.require_stage("split")
    tok = tmp_path / "empty_tokenizer"
    tok.mkdir()
    data = tmp_path / "in.jsonl"
    data.write_text((h.CORPUS / "crlf.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    before = h.files_under(tmp_path)
    run = h.run_stage("split", [data], tmp_path / "out", capsys, tok)
    h.check_clean_failure(run, [*h.case("tokenizer_dir_empty")["message"], str(tok)], before, tmp_path)


def test_tokenizer_dir_with_garbage_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    h.require_stage("split")
    tok = tmp_path / "bad_tokenizer"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{not json", encoding="utf-8")
    (tok / "tokenizer.model").write_bytes(b"\x00garbage")
    data = tmp_path / "in.jsonl"
    data.write_text((h.CORPUS / "crlf.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    before = h.files_under(tmp_path)
    run = h.run_stage("split", [data], tmp_path / "out", capsys, tok)
    h.check_clean_failure(run, [str(tok)], before, tmp_path)
