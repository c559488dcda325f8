"""shard: deterministic scatter, atomic outputs (gather: test_gather.py)."""

from __future__ import annotations

from pathlib import Path

from llama_pipe.data.shard import shard_key, shard_of
from tests.data.conftest import cli, read_jsonl, stats_of, turns, write_jsonl


def _recs(n: int) -> list[dict]:
    return [{"id": f"c{i}", "conversations": turns(f"question {i}", f"answer {i}")} for i in range(n)]


def test_shard_is_a_partition_by_id_hash(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "m.jsonl", _recs(50) + [_recs(1)[0], {"no": "id"}])
    out = tmp_path / "shard"
    assert cli("shard", inp, "--n", 3, "-o", out) == 0
    files = sorted(out.glob("shard-*.jsonl"))
    assert [f.name for f in files] == ["shard-000.jsonl", "shard-001.jsonl", "shard-002.jsonl"]
    parts = [read_jsonl(f) for f in files]
    assert sorted(r["id"] for p in parts for r in p) == sorted(f"c{i}" for i in range(50))
    for k, p in enumerate(parts):
        assert all(shard_of(shard_key(r), 3) == k for r in p)
    stats = stats_of(out / "shard.jsonl", "shard.stats.json")
    assert stats["rejected"] == {"duplicate_id": 1, "missing_id": 1} and stats["shards"] == [len(p) for p in parts]
    # adding records never moves existing ones; re-running replaces the directory
    inp2 = write_jsonl(tmp_path / "m2.jsonl", _recs(80))
    assert cli("shard", inp2, "--n", 3, "-o", out) == 0
    parts2 = [{r["id"] for r in read_jsonl(f)} for f in sorted(out.glob("shard-*.jsonl"))]
    assert all({r["id"] for r in p} <= p2 for p, p2 in zip(parts, parts2))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.jsonl", "m2.jsonl", "shard"]


def test_same_first_question_meets_in_one_shard(tmp_path: Path) -> None:
    """clean's first-exchange deduplication works per shard, so duplicates must share a shard."""
    recs = [{"id": f"d{i}", "conversations": turns("  What is entropy?", f"answer {i}")} for i in range(8)]
    recs += [{"id": "g", "conversations": [{"from": "gpt", "value": "hello"}] + turns("What is entropy?", "x")}]
    inp = write_jsonl(tmp_path / "m.jsonl", recs + _recs(30))
    assert cli("shard", inp, "--n", 4, "-o", tmp_path / "s") == 0
    homes = [{r["id"] for r in read_jsonl(f)} for f in sorted((tmp_path / "s").glob("shard-*.jsonl"))]
    assert sum(1 for h in homes if h & ({f"d{i}" for i in range(8)} | {"g"})) == 1
    assert sum(1 for h in homes if h) > 1


def test_shard_malformed_input_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"id": "a"}\n{"id": "b", "conv')
    assert cli("shard", bad, "--n", 2, "-o", tmp_path / "out") == 2
    assert not (tmp_path / "out").exists() and len(list(tmp_path.iterdir())) == 1


def test_shard_removes_directories_of_killed_runs(tmp_path: Path) -> None:
    """A SIGKILLed shard leaves ``DIR.tmp-<pid>-*``; the next run removes it (not a live process's)."""
    import os
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"out.tmp-{dead.pid}-abc123"
    (stale / "x").mkdir(parents=True)
    live = tmp_path / f"out.tmp-{os.getppid()}-def456"
    live.mkdir()
    inp = write_jsonl(tmp_path / "m.jsonl", _recs(4))
    assert cli("shard", inp, "--n", 2, "-o", tmp_path / "out") == 0
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.jsonl", "out", live.name])
