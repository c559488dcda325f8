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


def test_data_weights_repeat_one_file_and_draw_a_share_of_another(tmp_path: Path) -> None:
    """data.weights as a user sets it: merge two files, gather with one weight per input."""
    small = write_jsonl(tmp_path / "identity.jsonl", [{"id": f"i{k}", "conversations": turns(f"who {k}?", "Llama Pipe")}
                                                      for k in range(12)])
    big = write_jsonl(tmp_path / "big.jsonl", _recs(60))
    merged = tmp_path / "m.jsonl"
    assert cli("merge", big, small, "-o", merged) == 0
    plain_t, plain_v = tmp_path / "p" / "train.jsonl", tmp_path / "p" / "val.jsonl"
    assert cli("gather", merged, "--train", plain_t, "--val", plain_v, "--val-fraction", "0.2") == 0
    train, val = tmp_path / "w" / "train.jsonl", tmp_path / "w" / "val.jsonl"
    assert cli("gather", merged, "--train", train, "--val", val, "--val-fraction", "0.2",
               "--inputs", f"{big},{small}", "--weights", "0.5,3") == 0
    plain, tr = read_jsonl(plain_t), read_jsonl(train)
    assert read_jsonl(val) == read_jsonl(plain_v)  # validation is never weighted
    small_ids = [r["id"] for r in plain if r["source"] == str(small)]
    big_ids = [r["id"] for r in plain if r["source"] == str(big)]
    assert len(small_ids) >= 8 and len(big_ids) >= 40
    # weight 3: every training conversation of the small file three times; the copies come in later
    # passes, after every first copy, so no two copies of one conversation sit side by side
    firsts = [r["id"] for r in tr if "#" not in r["id"]]
    assert [r["id"] for r in tr] == (firsts + [f"{i}#w2" for i in small_ids] + [f"{i}#w3" for i in small_ids])
    assert all(r["conversations"] == turns(f"who {r['id'][1:].split('#')[0]}?", "Llama Pipe")
               for r in tr if r["source"] == str(small))
    # weight 0.5: a seeded share of the big file, the rest in the rejects with their reason
    kept_big = [i for i in firsts if i in big_ids]
    stats = stats_of(train, "gather.stats.json")
    assert 0.3 * len(big_ids) < len(kept_big) < 0.7 * len(big_ids)
    assert stats["rejected"] == {"weight": len(big_ids) - len(kept_big)}
    rejected = {r["record"]["id"] for r in read_jsonl(train.with_name("gather.rejects.jsonl"))}
    assert rejected == set(big_ids) - set(kept_big)
    assert stats["weighted_copies"] == 2 * len(small_ids)
    assert stats["train_lines_by_input"] == {str(big): len(kept_big), str(small): 3 * len(small_ids)}


def test_data_weights_draw_whole_conversations(tmp_path: Path) -> None:
    """Every chunk of one conversation gets the same number of copies."""
    chunks = [{"id": f"c{i}_{k}", "source": "a.json", "conversations": turns(f"q{i}.{k}", "a")}
              for i in range(30) for k in range(3)]
    inp = write_jsonl(tmp_path / "s.jsonl", chunks)
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    assert cli("gather", inp, "--train", train, "--val", val, "--val-fraction", "0",
               "--inputs", "a.json", "--weights", "1.5") == 0
    per_conv: dict[str, int] = {}
    for r in read_jsonl(train):
        per_conv[base_id(r["id"].split("#")[0])] = per_conv.get(base_id(r["id"].split("#")[0]), 0) + 1
    assert set(per_conv.values()) == {3, 6} and len(per_conv) == 30  # 3 chunks, once or twice


def test_data_weights_errors_are_clear(tmp_path: Path, capsys) -> None:
    inp = write_jsonl(tmp_path / "s.jsonl", _recs(4))
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    assert cli("gather", inp, "--train", train, "--val", val, "--inputs", "a.json,b.json", "--weights", "2") != 0
    assert "one weight per entry of data.inputs (2), got 1" in capsys.readouterr().err
    # records without the source merge writes (an older merge's output) cannot be weighed
    assert cli("gather", inp, "--train", train, "--val", val, "--inputs", "a.json", "--weights", "2") != 0
    assert "has no 'source'" in capsys.readouterr().err and not train.exists()
    # all 1: nothing to weigh, the records need no source
    assert cli("gather", inp, "--train", train, "--val", val, "--inputs", "a.json", "--weights", "1") == 0
