"""gather: train/val by conversation (every chunk of one on the same side), rejects, a tiny set's validation."""

from __future__ import annotations

from pathlib import Path

from llama_pipe.data.gather import base_id
from tests.data.conftest import cli, read_jsonl, stats_of, turns, write_jsonl


def _recs(n: int) -> list[dict]:
    return [{"id": f"c{i}", "conversations": turns(f"question {i}", f"answer {i}")} for i in range(n)]


def test_gather_keeps_chunks_of_a_conversation_together(tmp_path: Path) -> None:
    chunks = [{"id": f"c{i}_{k}", "conversations": turns(f"q{i}.{k}", "a")} for i in range(40) for k in range(3)]
    a = write_jsonl(tmp_path / "s0.jsonl", chunks[:60])
    b = write_jsonl(tmp_path / "s1.jsonl", chunks[60:] + [chunks[0]])
    train, val = tmp_path / "data" / "train.jsonl", tmp_path / "data" / "val.jsonl"
    assert cli("gather", a, b, "--train", train, "--val", val, "--val-fraction", "0.25", "--seed", "3") == 0
    tr, va = read_jsonl(train), read_jsonl(val)
    stats = stats_of(train, "gather.stats.json")
    assert stats["rejected"] == {"duplicate_id": 1} and stats["train"] == len(tr) and stats["val"] == len(va)
    assert len(tr) + len(va) == 120 and 0 < len(va) < 60
    assert {base_id(r["id"]) for r in tr}.isdisjoint({base_id(r["id"]) for r in va})
    order = [c["id"] for c in chunks]
    for part in (tr, va):  # each file keeps the input order
        assert [r["id"] for r in part] == sorted((r["id"] for r in part), key=order.index)
    # deterministic; another seed gives another split
    assert cli("gather", a, b, "--train", tmp_path / "t2.jsonl", "--val", tmp_path / "v2.jsonl",
               "--val-fraction", "0.25", "--seed", "3") == 0
    assert read_jsonl(tmp_path / "v2.jsonl") == va
    assert cli("gather", a, b, "--train", tmp_path / "t3.jsonl", "--val", tmp_path / "v3.jsonl",
               "--val-fraction", "0.25", "--seed", "4") == 0
    assert read_jsonl(tmp_path / "v3.jsonl") != va


def test_gather_tiny_data_still_has_validation(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "s.jsonl", _recs(2))
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    assert cli("gather", inp, "--train", train, "--val", val, "--val-fraction", "0.01") == 0
    assert len(read_jsonl(train)) == 1 and len(read_jsonl(val)) == 1


def test_gather_rejects_records_without_turns(tmp_path: Path) -> None:
    recs = _recs(3) + [{"id": "empty", "conversations": []}, {"id": "none", "conversations": None}]
    inp = write_jsonl(tmp_path / "s.jsonl", recs)
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    assert cli("gather", inp, "--train", train, "--val", val) == 0
    assert len(read_jsonl(train)) + len(read_jsonl(val)) == 3
    assert stats_of(train, "gather.stats.json")["rejected"] == {"malformed_record": 2}
