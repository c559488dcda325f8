"""merge: formats, role normalisation, ids, malformed files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.data.conftest import cli, read_jsonl, stats_of, turns, write_jsonl


def test_formats_are_normalised(tmp_path: Path) -> None:
    share = write_jsonl(tmp_path / "a.jsonl", [
        {"id": "s1", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "USER", "value": "hi"},
                                       {"from": "ChatGPT", "value": "hello"}, {"from": "user", "value": "again"},
                                       {"from": "bard", "value": "yes"}], "model": "x"},
        {"id": 7, "conversations": [{"from": "human", "value": "q"}, {"from": "bing", "value": "a"}]},
    ])
    openai = write_jsonl(tmp_path / "b.jsonl", [
        {"messages": [{"role": "system", "content": "sys"},
                      {"role": "user", "content": [{"type": "text", "text": "part 1"}, {"type": "text", "text": "part 2"}]},
                      {"role": "assistant", "content": "ok"}]},
    ])
    alpaca = tmp_path / "c.json"
    alpaca.write_text(json.dumps([
        {"instruction": "Translate", "input": "Hallo", "output": "Hello"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
    ]))
    out = tmp_path / "m.jsonl"
    assert cli("merge", share, openai, alpaca, "-o", out) == 0
    recs = read_jsonl(out)
    assert [r["id"] for r in recs][:2] == ["s1", "7"]
    assert recs[0] == {"id": "s1", "source": str(share), "system": "Be brief.",
                       "conversations": turns("hi", "hello", "again", "yes")}
    # each record names the file it came from (gather weighs the files by it: data.weights)
    assert [r["source"] for r in recs] == [str(share)] * 2 + [str(openai)] + [str(alpaca)] * 2
    assert recs[1]["conversations"] == turns("q", "a")
    assert recs[2]["system"] == "sys" and recs[2]["conversations"] == turns("part 1\npart 2", "ok")
    assert recs[3]["conversations"] == turns("Translate\n\nHallo", "Hello")
    assert recs[4]["conversations"] == turns("Say hi", "hi")
    assert all(r["id"].startswith("auto-") for r in recs[2:])
    # auto ids are a function of content: a second run gives the same ids
    out2 = tmp_path / "m2.jsonl"
    assert cli("merge", share, openai, alpaca, "-o", out2) == 0
    assert read_jsonl(out2) == recs
    assert stats_of(out)["out"] == 5


def test_bad_records_are_rejected_with_reasons(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"id": "a", "conversations": turns("q", "a")}),
        "{not json",
        json.dumps({"id": "a", "conversations": turns("q2", "a2")}),
        json.dumps({"id": "b", "conversations": [{"from": "robot", "value": "x"}]}),
        json.dumps({"id": "c", "conversations": [{"from": "human", "value": 3}]}),
        json.dumps({"id": "d", "conversations": turns("q") + [{"from": "system", "value": "late"}]}),
        json.dumps({"id": "e", "text": "no conversations"}),
        json.dumps({"id": "f", "conversations": []}),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
        json.dumps(["a list"]),
    ]
    inp.write_text("\n".join(lines) + "\n")
    out = tmp_path / "m.jsonl"
    assert cli("merge", inp, "-o", out) == 0
    assert [r["id"] for r in read_jsonl(out)] == ["a"]
    stats = stats_of(out)
    assert stats["rejected"] == {"duplicate_id": 1, "invalid_json": 1, "unknown_role": 1, "bad_turn": 1,
                                 "misplaced_system_turn": 1, "unknown_format": 1, "no_turns": 1,
                                 "non_text_content": 1, "not_an_object": 1}
    rejects = read_jsonl(tmp_path / "m.rejects.jsonl")
    assert all(r["stage"] == "merge" and r["reason"] and "detail" in r and "record" in r for r in rejects)
    assert any("line 2" in r["detail"] for r in rejects)  # the place of the bad line is named


def test_reject_all_duplicates(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "conversations": turns("1", "2")},
                                              {"id": "a", "conversations": turns("3", "4")},
                                              {"id": "b", "conversations": turns("5", "6")}])
    out = tmp_path / "m.jsonl"
    assert cli("merge", inp, "-o", out, "--dedupe", "reject_all") == 0
    assert [r["id"] for r in read_jsonl(out)] == ["b"]
    assert stats_of(out)["rejected"] == {"duplicate_id": 2}


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("notjson.json", b'[{"id": "a", "conversations": []},\n {"id": oops}]', "not valid JSON"),
        ("trunc.json", b'[{"id": "a", "conversations": [{"from": "human", "val', "JSON"),
        ("trunc2.json", b'[{"id": "a", "conversations": []}, ', "truncated"),
        ("latin1.jsonl", '{"id": "caf\u00e9"}\n'.encode("latin-1"), "not UTF-8"),
        ("obj.json", b'{"id": "a", "conversations": []}', "expected a list"),
        ("trunc.jsonl", b'{"id": "a", "conversations": []}\n{"id": "b", "conv', "truncated"),
        ("empty.json", b"", "empty"),
    ],
)
def test_malformed_file_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   name: str, content: bytes, expected: str) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [{"id": "x", "conversations": turns("q", "a")}])
    bad = tmp_path / name
    bad.write_bytes(content)
    out = tmp_path / "out" / "m.jsonl"
    assert cli("merge", good, bad, "-o", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and expected in err[0]
    assert any(w in err[0] for w in ("line", "byte offset", "char", "empty", "expected a list"))
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_missing_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("merge", tmp_path / "nope.json", "-o", tmp_path / "m.jsonl") == 2
    assert "nope.json" in capsys.readouterr().err


def test_id_types(tmp_path: Path) -> None:
    """Integer ids become strings, missing/null/blank ids get an auto id, any other type is bad_id;
    a non-string system prompt is bad_record (never silently dropped or passed on)."""
    recs = [{"id": 7, "conversations": turns("q7", "a")},
            {"id": None, "conversations": turns("qn", "a")},
            {"id": " ", "conversations": turns("qb", "a")},
            {"id": ["x", "y"], "conversations": turns("ql", "a")},
            {"id": 1.5, "conversations": turns("qf", "a")},
            {"id": True, "conversations": turns("qt", "a")},
            {"id": {"k": 1}, "conversations": turns("qd", "a")},
            {"id": "s", "system": ["not", "text"], "conversations": turns("qs", "a")}]
    out = tmp_path / "m.jsonl"
    assert cli("merge", write_jsonl(tmp_path / "in.jsonl", recs), "-o", out) == 0
    ids = [r["id"] for r in read_jsonl(out)]
    assert ids[0] == "7" and len(ids) == 3 and all(i.startswith("auto-") for i in ids[1:])
    assert stats_of(out)["rejected"] == {"bad_id": 4, "bad_record": 1}
    rejects = read_jsonl(tmp_path / "m.rejects.jsonl")
    assert any("list" in r["detail"] for r in rejects) and any("'system'" in r["detail"] for r in rejects)


def test_workers_give_the_same_files(tmp_path: Path, sample: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records are normalised in worker processes; the files (renames, duplicates, rejects) are
    those of one process, byte for byte, with either dedupe rule."""
    from llama_pipe.data import merge as merge_mod

    monkeypatch.setattr(merge_mod, "BATCH", 16)  # several batches, so two processes run
    inputs = [sample, sample.with_name("identity_sample.json"), shared_data / "gitcloner_dummy_en.json",
              shared_data / "fastchat_dummy_conversation.json"]
    for dedupe in ("first", "reject_all"):
        outs = []
        for workers in ("1", "2"):
            out = tmp_path / f"{dedupe}{workers}" / "m.jsonl"
            assert cli("merge", *inputs, "-o", out, "--dedupe", dedupe, "--workers", workers) == 0
            stats_of(out)
            outs.append([(out.parent / f).read_bytes() for f in ("m.jsonl", "m.rejects.jsonl", "m.stats.json")])
        assert outs[0] == outs[1], dedupe
        assert b"gitcloner_dummy_en:identity_0" in outs[0][0] or b"fastchat_dummy_conversation:identity_0" in outs[0][0]
