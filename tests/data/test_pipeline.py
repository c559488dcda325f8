"""The data stages chained as the workflow runs them, on the bundled sample and the real samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llama_pipe.data.gather import base_id
from llama_pipe.data.markdown import fence_languages, html_tags_outside_code
from tests.data.conftest import cli, read_jsonl, stats_of


def test_merge_shard_clean_filter_split_gather(tmp_path: Path, sample: Path, shared_data: Path,
                                                tokenizer_dir: Path) -> None:
    inputs = [sample, *(shared_data / n for n in ("fastchat_dummy_conversation.json", "gitcloner_dummy_cn.json",
                                                  "gitcloner_dummy_en.json", "gitcloner_test.json"))]
    merged = tmp_path / "merge" / "merged.jsonl"
    assert cli("merge", *inputs, "-o", merged) == 0
    m = stats_of(merged)
    assert m["in"] == 106 + 500 + 910 + 910 + 1 and m["rejected"]["duplicate_id"] >= 1
    assert cli("shard", merged, "--n", 2, "-o", tmp_path / "shard") == 0
    s = stats_of(tmp_path / "shard" / "x", "shard.stats.json")
    assert s["in"] == m["out"]
    splits = []
    funnel: dict[str, int] = {"clean": 0, "filter_lang": 0}
    for k in range(2):
        shard = tmp_path / "shard" / f"shard-{k:03d}.jsonl"
        clean = tmp_path / "clean" / f"shard-{k:03d}.jsonl"
        lang = tmp_path / "filter_lang" / f"shard-{k:03d}.jsonl"
        split = tmp_path / "split" / f"shard-{k:03d}.jsonl"
        assert cli("clean", shard, "-o", clean) == 0
        assert cli("filter-lang", clean, "-o", lang) == 0
        assert cli("split", lang, "-o", split, "--tokenizer", tokenizer_dir, "--max-length", 1024) == 0
        c, f, sp = stats_of(clean), stats_of(lang), stats_of(split)
        assert c["in"] == len(read_jsonl(shard)) and f["in"] == c["out"] and sp["records_in"] == f["out"]
        funnel["clean"] += c["out"]
        funnel["filter_lang"] += f["out"]
        for rec in read_jsonl(clean):
            for t in rec["conversations"]:
                assert not html_tags_outside_code(t["value"]) and all(fence_languages(t["value"]))
        splits.append(split)
    train, val = tmp_path / "data" / "train.jsonl", tmp_path / "data" / "val.jsonl"
    assert cli("gather", *splits, "--train", train, "--val", val) == 0
    g = stats_of(train, "gather.stats.json")
    tr, va = read_jsonl(train), read_jsonl(val)
    assert g["in"] == sum(stats_of(p)["chunks_out"] for p in splits) == len(tr) + len(va)
    assert len(va) > 0.03 * g["in"] and {base_id(r["id"]) for r in tr}.isdisjoint({base_id(r["id"]) for r in va})
    langs: dict[str, Any] = {}
    for r in tr + va:
        langs[r["lang"]] = langs.get(r["lang"], 0) + 1
    # und: too short or too uncertain for a reliable guess, kept (filter_lang.undetermined: keep)
    assert set(langs) <= {"en", "zh-cn", "zh-tw", "und"} and langs["zh-cn"] > 400 and langs["en"] > 700
    assert langs.get("und", 0) < 0.05 * sum(langs.values())
    ids = [r["id"] for r in tr + va]
    assert len(ids) == len(set(ids))


def test_settings_come_from_config_file_and_flags_override(tmp_path: Path, sample: Path) -> None:
    import json

    cfg = tmp_path / "config.yaml"
    cfg.write_text("filter_lang:\n  keep: [de]\n  undetermined: drop\nclean:\n  min_chars: 0\n")
    clean = tmp_path / "c.jsonl"
    assert cli("clean", sample, "-o", clean, "--config", cfg) == 0
    out = tmp_path / "f.jsonl"
    assert cli("filter-lang", clean, "-o", out, "--config", cfg) == 0
    assert {r["lang"] for r in read_jsonl(out)} == {"de"}
    assert cli("filter-lang", clean, "-o", out, "--config", cfg, "--keep", "fr") == 0
    assert {r["lang"] for r in read_jsonl(out)} == {"fr"}
    assert json.loads((tmp_path / "c.stats.json").read_text())["rejected"].get("too_short") is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("clean:\n  min_turns: 0\n")
    assert cli("clean", sample, "-o", tmp_path / "x.jsonl", "--config", bad) == 2
    assert not (tmp_path / "x.jsonl").exists()


def test_sharded_clean_equals_unsharded_clean(tmp_path: Path, sample: Path) -> None:
    merged = tmp_path / "m.jsonl"
    assert cli("merge", sample, "-o", merged) == 0
    assert cli("clean", merged, "-o", tmp_path / "all.jsonl") == 0
    assert cli("shard", merged, "--n", 3, "-o", tmp_path / "shard") == 0
    kept: set[str] = set()
    for k in range(3):
        out = tmp_path / f"c{k}.jsonl"
        assert cli("clean", tmp_path / "shard" / f"shard-{k:03d}.jsonl", "-o", out) == 0
        kept |= {r["id"] for r in read_jsonl(out)}
    assert kept == {r["id"] for r in read_jsonl(tmp_path / "all.jsonl")}
