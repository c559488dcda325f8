"""The bad-input corpus (corpus/manifest.yaml) against every data stage it can reach.

* whole-file errors: exit 2, a one-line message naming the file and the place, nothing written;
* record-level errors: exit 0, the bad records in the stage's rejects file, the stats invariant
  ``in == out + sum(rejected)``, every kept record well formed, no temporary files left;
* the merge -> clean -> filter-lang -> split chain: which stage rejects which record.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.reliability import harness as h

FILE_CASES = [(c, s) for c in h.cases_for("test_file_level_case") for s in c["stages"]]
RECORD_CASES = h.cases_for("test_record_level_pipeline")
DIRECT_CASES = [(c, s) for c in RECORD_CASES for s in c["stages"]]
GENERATED = h.cases_for("test_generated_pipeline")
CONFIG_CASES = [(c, s) for c in h.cases_for("test_bad_config") for s in c["stages"]]


def _ids(pairs: list[tuple[dict[str, Any], str]]) -> list[str]:
    return [f"{c['name']}-{s}" for c, s in pairs]


def _inputs(c: dict[str, Any], dest: Path) -> list[Path]:
    """Copy a case's input file(s) into ``dest`` (or build a generated one) and return the paths."""
    dest.mkdir(parents=True, exist_ok=True)
    gen = c.get("generate")
    if gen == "missing_file":
        return [dest / "does-not-exist.json"]
    if gen == "directory_as_input":
        d = dest / "a-directory.json"
        d.mkdir()
        return [d]
    if gen in ("deep_json_list", "deep_json_line"):
        deep = '{"id": "deep-json", "conversations": ' + "[" * 100_000 + "]" * 100_000 + "}"
        if gen == "deep_json_list":
            path = dest / "deep_json.json"
            path.write_text("[" + deep + "]", encoding="utf-8")
        else:
            path = dest / "deep_json.jsonl"
            path.write_text(json.dumps(_small()) + "\n" + deep + "\n", encoding="utf-8")
        return [path]
    if gen == "fifo":
        path = dest / "a-fifo.jsonl"
        os.mkfifo(path)  # no writer ever opens it: a stage that opens it would block forever
        return [path]
    if gen == "symlink_loop":
        path = dest / "loop.jsonl"
        path.symlink_to(dest / "loop2.jsonl")
        (dest / "loop2.jsonl").symlink_to(path)
        return [path]
    if gen == "deep_value":
        rec = json.dumps({"id": "deep-value", "meta": "DEEP", "conversations": _small()["conversations"]})
        rec = rec.replace('"DEEP"', "[" * 987 + "]" * 987)  # 987 levels, built as text
        path = dest / "deep_value.json"
        path.write_text("[" + json.dumps(_small()) + ",\n" + rec + "]", encoding="utf-8")
        return [path]
    if gen == "huge_turn":
        return [_write(dest / "huge_turn.json", [_small(), _huge()])]
    if gen == "deep_html":
        return [_write(dest / "deep_html.json", [_small(), _deep()])]
    names = c["input"] if isinstance(c["input"], list) else [c["input"]]
    out = []
    for name in names:
        shutil.copy(h.CORPUS / name, dest / name)
        out.append(dest / name)
    return out


def _write(path: Path, records: list[Any]) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def _small() -> dict[str, Any]:
    return {"id": "small-1", "conversations": [
        {"from": "human", "value": "What is the capital city of France, please?"},
        {"from": "gpt", "value": "The capital of France is Paris, on the river Seine."}]}


def _huge() -> dict[str, Any]:
    words = "the quick brown fox jumps over the lazy dog while the river keeps flowing north "
    text = (words * (10 * 1024 * 1024 // len(words) + 1))[: 10 * 1024 * 1024]
    return {"id": "huge-1", "conversations": [
        {"from": "human", "value": "Please write me a very, very long story about a fox."},
        {"from": "gpt", "value": text}]}


def _deep() -> dict[str, Any]:
    html = "<div>" * 10_000 + "<p>The answer is forty-two, said the deep thought computer.</p>" + "</div>" * 10_000
    return {"id": "deep-1", "conversations": [
        {"from": "human", "value": "What is the answer to life, the universe and everything?"},
        {"from": "gpt", "value": html}]}


# ----------------------------------------------------------------------------- whole-file errors


@pytest.mark.parametrize(("c", "stage"), FILE_CASES, ids=_ids(FILE_CASES))
def test_file_level_case(c: dict[str, Any], stage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path) -> None:
    h.require_stage(stage)
    inputs = _inputs(c, tmp_path / "in")
    before = h.files_under(tmp_path)
    run = h.run_stage(stage, inputs, tmp_path / "out", capsys, tokenizer_dir)
    h.check_clean_failure(run, c["message"], before, tmp_path)


MODEL_STAGES = [(c, s) for c in h.cases_for("test_file_level_case")
                for s in ("train", "eval", "eval-questions", "report-stats", "report-metrics")]


@pytest.fixture()
def _fresh_accelerate():  # noqa: PT004 - train builds an Accelerator per run
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.parametrize(("c", "stage"), MODEL_STAGES, ids=_ids(MODEL_STAGES))
def test_file_level_case_training_stages(c: dict[str, Any], stage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         tiny_hf_model_dir: Path, _fresh_accelerate: None) -> None:
    """train and eval read their data strictly (it is written by gather): a bad data file is
    exit 2 naming the file, not a traceback, and no run or eval directory appears. The same for
    a bad file given as eval's MT-bench questions (``eval-questions``) and as report's stats file
    or training metrics (``report-stats``, ``report-metrics``)."""
    h.require_stage(stage.split("-")[0])
    inputs = _inputs(c, tmp_path / "in")
    (tmp_path / "out").mkdir()
    argv_outs = h.stage_argv(stage, inputs, tmp_path / "out", None, tiny_hf_model_dir)  # writes report's good inputs
    del argv_outs
    before = h.files_under(tmp_path)
    run = h.run_stage(stage, inputs, tmp_path / "out", capsys, model_dir=tiny_hf_model_dir)
    h.check_clean_failure(run, [inputs[0].name], before, tmp_path)


# ----------------------------------------------------------------------------- record-level errors


@pytest.mark.parametrize(("c", "stage"), DIRECT_CASES, ids=_ids(DIRECT_CASES))
def test_record_level_direct(c: dict[str, Any], stage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path) -> None:
    """A stage run directly on a file with some bad records: rejects them or refuses the file
    clearly (exit 2); never a traceback, never a malformed record passed on, never a partial output."""
    h.require_stage(stage)
    inputs = _inputs(c, tmp_path / "in")
    before = h.files_under(tmp_path)
    run = h.run_stage(stage, inputs, tmp_path / "out", capsys, tokenizer_dir)
    if run.rc == 2:
        h.check_clean_failure(run, [inputs[0].name], before, tmp_path)
    else:
        h.check_success(run, strict=stage == "clean")


def _final_ids(records: list[dict[str, Any]]) -> set[str]:
    """Conversation ids of split's output: chunk ``k`` of ``ID`` is ``ID_k``."""
    out = set()
    for r in records:
        base, sep, k = r["id"].rpartition("_")
        assert sep and k.isdigit(), f"split output id {r['id']!r} has no _k chunk suffix"
        out.add(base)
    return out


def _run_pipeline(c: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path) -> dict[str, Any]:
    h.require_stage(*h.PIPELINE)
    inputs = _inputs(c, tmp_path / "in")
    result: dict[str, Any] = {"rejects": {}, "stats": {}, "outputs": {}}
    current = inputs
    for stage in h.PIPELINE:
        run = h.run_stage(stage, current, tmp_path / stage, capsys, tokenizer_dir)
        h.check_success(run, strict=stage != "merge")
        out = run.outputs[0]
        result["stats"][stage] = h.check_stats(run.stats[0])
        result["rejects"][stage] = h.rejects_of(out)
        result["outputs"][stage] = h.read_jsonl(out)
        current = [out]
    return result


def _check_pipeline(c: dict[str, Any], result: dict[str, Any]) -> None:
    spec = c.get("pipeline", {})
    final = _final_ids(result["outputs"]["split"])
    for rid in spec.get("kept", []):
        assert rid in final, f"{rid!r} should reach the end; rejects: {_where_rejected(result, rid)}"
    for rid, stages in spec.get("rejected", {}).items():
        stages = stages if isinstance(stages, list) else [stages]
        assert rid not in final, f"{rid!r} should have been rejected"
        where = _where_rejected(result, rid)
        assert where and where[0][0] in stages, f"{rid!r}: expected a reject in {stages}, got {where}"
        assert all(reason for _, reason in where), f"{rid!r}: reject without a reason: {where}"
        if rid in spec.get("reasons", {}):
            assert where[0][1] == spec["reasons"][rid], where
    for stage, n in spec.get("rejected_count", {}).items():
        got = sum(result["stats"][stage]["rejected"].values())
        assert got == n, f"{stage}: expected {n} rejected, stats say {result['stats'][stage]}"
    for stats in result["stats"].values():
        assert stats["in"] >= 0 and stats["out"] >= 0, stats
    # Each stage reads what the one before kept (no record appears or vanishes between stages).
    st = result["stats"]
    for prev, stage in zip(h.PIPELINE, h.PIPELINE[1:]):
        if st[stage]["unit"] == st[prev]["unit"]:
            assert st[stage]["in"] == st[prev]["lines_out"], (prev, st[prev], stage, st[stage])
        else:  # split counts pairs: every kept record's pairs come in
            pairs = sum(len(r["conversations"]) // 2 for r in result["outputs"][prev])
            assert st[stage]["in"] == pairs, (prev, st[prev], stage, st[stage])


def _where_rejected(result: dict[str, Any], rid: str) -> list[tuple[str, str]]:
    return [(stage, row.get("reason", "")) for stage in h.PIPELINE for row in result["rejects"][stage] if row.get("id") == rid]


def _turns(records: list[dict[str, Any]], rid: str) -> list[dict[str, Any]]:
    for r in records:
        if r["id"] == rid:
            return r["conversations"]
    raise AssertionError(f"{rid!r} not in output")


def _extra_checks(c: dict[str, Any], result: dict[str, Any], tmp_path: Path) -> None:
    outs = result["outputs"]
    for check in c.get("check", []):
        if check == "gpt_first_dropped":
            assert _turns(outs["clean"], "ro-gpt-first")[0]["from"] == "human"
        elif check == "duplicate_keeps_first":
            # dup-1 of file A keeps its id; file B's different dup-1 is kept as dup_b:dup-1; file C's
            # exact copy of file A's dup-1 is the one duplicate.
            assert "file A" in _turns(outs["merge"], "dup-1")[0]["value"]
            assert "file B" in _turns(outs["merge"], "dup_b:dup-1")[0]["value"]
            rows = [r for r in result["rejects"]["merge"] if r["id"] == "dup-1"]
            assert len(rows) == 1 and rows[0]["reason"] == "duplicate_id" and "dup_c.json" in rows[0]["detail"], rows
        elif check == "placeholder_text_kept":
            gpt = _turns(outs["clean"], "ph-literal")[1]["value"]
            assert "LLAMAPIPECODEBLOCK7X and LLAMAPIPECODEBLOCK0X are plain text" in gpt, gpt
            assert gpt.count("```") == 2 and 'print("hi")' in gpt, gpt
        elif check == "list_start_ascii":
            assert _turns(outs["clean"], "ol-sup")[1]["value"].startswith("1. red"), outs["clean"]
            assert _turns(outs["clean"], "ol-digits")[1]["value"].startswith("1. first"), outs["clean"]
            assert _turns(outs["clean"], "ol-ok")[1]["value"].startswith("3. boil"), outs["clean"]
        elif check == "zero_width_kept":
            for rid, ch in (("zw-200b", "\u200b"), ("zw-200f", "\u200f"), ("zw-feff", "\ufeff")):
                assert _turns(outs["clean"], rid)[0]["value"].startswith(ch), rid
        elif check == "rejects_are_json":  # strict JSON everywhere: no NaN/Infinity passed on
            for kind in ("rejects", "outputs"):
                for stage, rows in result[kind].items():
                    for row in rows:
                        json.loads(json.dumps(row), parse_constant=lambda c, stage=stage, kind=kind: pytest.fail(f"{stage} {kind}: {c}"))
        elif check == "no_script_or_style":
            text = json.dumps(outs["clean"], ensure_ascii=False)
            for bad in ("pwned-script", "pwned-cookie", "color:red", "<script", "<style"):
                assert bad not in text, f"{bad!r} survived clean: {text[:500]}"
            assert "hello" in _turns(outs["clean"], "ss-1")[1]["value"]
        elif check == "entities_decoded_no_nul":
            gpt = _turns(outs["clean"], "en-1")[1]["value"]
            for ent in ("&lt;", "&gt;", "&amp;", "&nbsp;"):
                assert ent not in gpt, f"entity {ent} left in the cleaned gpt turn: {gpt!r}"
            assert "3 < 5" in gpt and "Jerry" in gpt, gpt
            for stage in ("clean", "filter-lang", "split"):
                assert "\x00" not in json.dumps(outs[stage], ensure_ascii=False).replace("\\u0000", "\x00"), stage
        elif check == "auto_id":
            # merge names an id-less record by its content: auto-<16 hex>, the same on every run.
            auto = [r["id"] for r in outs["merge"] if r["id"] != "ni-1"]
            assert len(auto) == 1 and re.fullmatch(r"auto-[0-9a-f]{16}", auto[0]), auto
            assert auto[0] in _final_ids(outs["split"]), "the id-less record should reach the end under its new id"
        elif check == "one_language_label":
            (rec,) = [r for r in outs["filter-lang"] if r["id"] == "ml-1"]
            assert isinstance(rec.get("lang"), str) and rec["lang"], rec
        elif check == "code_survives_clean":
            value = _turns(outs["clean"], "cb-1")[1]["value"]
            assert "def f599(x):" in value and "```" in value, value[:300]
        elif check == "no_files_from_ids":
            assert not Path("/tmp/llama-pipe-abs-id").exists()
            names = {p.name for p in tmp_path.parent.rglob("*")}
            assert not {"escape-up", "windows-escape", "llama-pipe-abs-id"} & names, names
            assert not (tmp_path / "split" / "shard-000.jsonl").exists()
            kept = {r["id"] for r in outs["merge"]}
            assert {"../../escape-up", "/tmp/llama-pipe-abs-id", "..\\..\\windows-escape"} <= kept
        elif check == "deep_html_no_tags":
            rows = [r for r in outs["clean"] if r["id"] == "deep-1"]
            if rows:
                value = rows[0]["conversations"][1]["value"]
                assert "<div" not in value and "forty-two" in value, value[:300]
            else:
                assert _where_rejected(result, "deep-1"), "deep-1 neither kept nor rejected"
        else:  # pragma: no cover - a typo in the manifest
            raise AssertionError(f"unknown check {check!r}")


@pytest.mark.parametrize("c", RECORD_CASES, ids=[c["name"] for c in RECORD_CASES])
def test_record_level_pipeline(c: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path) -> None:
    result = _run_pipeline(c, tmp_path, capsys, tokenizer_dir)
    _check_pipeline(c, result)
    _extra_checks(c, result, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("c", GENERATED, ids=[c["name"] for c in GENERATED])
def test_generated_pipeline(c: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path) -> None:
    """10 MB turns and 10,000-level HTML are generated here, not committed."""
    result = _run_pipeline(c, tmp_path, capsys, tokenizer_dir)
    _check_pipeline(c, result)
    _extra_checks(c, result, tmp_path)


# ----------------------------------------------------------------------------- config.yaml


@pytest.mark.parametrize(("c", "stage"), CONFIG_CASES, ids=_ids(CONFIG_CASES))
def test_bad_config(c: dict[str, Any], stage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path) -> None:
    """A bad config.yaml stops the stage before it reads any data: exit 2 naming the key path."""
    h.require_stage(stage)
    good = tmp_path / "in" / "good.json"
    good.parent.mkdir(parents=True)
    shutil.copy(h.CORPUS / "bom.json", good)
    cfg = tmp_path / "in" / c["input"]
    shutil.copy(h.CORPUS / c["input"], cfg)
    before = h.files_under(tmp_path)
    run = h.run_stage(stage, [good], tmp_path / "out", capsys, tokenizer_dir, extra=["--config", str(cfg)])
    h.check_clean_failure(run, c["message"], before, tmp_path)


# ----------------------------------------------------------------------------- the manifest itself


def test_manifest_is_complete() -> None:
    """Every case names an existing input and a test that exists; at least 25 kinds."""
    import tests.reliability.test_hostile_data as hd
    import tests.reliability.test_security as sec
    import tests.reliability.test_weights_integrity as wi

    m = h.manifest()
    names = [c["name"] for c in m["cases"]]
    assert len(names) == len(set(names)), "duplicate case names"
    assert len(names) >= 25
    tests = {n for mod in (globals(), vars(sec), vars(wi), vars(hd)) for n in mod if n.startswith("test_")}
    for c in m["cases"]:
        assert c["test"] in tests, f"{c['name']}: test {c['test']} does not exist"
        assert c["level"] in ("file", "record", "ok"), c
        assert ("input" in c) != ("generate" in c), c
        for name in [c["input"]] if isinstance(c.get("input"), str) else c.get("input", []):
            assert (h.CORPUS / name).is_file(), name
        if c["level"] == "file":
            assert c.get("message"), c


def test_guarantees_doc_is_in_sync() -> None:
    """docs/guarantees.md lists every corpus case, and every test it names exists."""
    import ast
    import re as _re

    from tests.conftest import REPO

    doc = (REPO / "docs" / "guarantees.md").read_text(encoding="utf-8")
    for c in h.manifest()["cases"]:
        assert f"`{c['name']}`" in doc, f"docs/guarantees.md does not list corpus case {c['name']}"
    defined = set()
    for path in (REPO / "tests").rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
                defined.add(node.name)
    modules = {p.stem for p in (REPO / "tests").rglob("test_*.py")}
    named = set(_re.findall(r"\b(test_[a-z0-9_]+)\b", doc)) - modules
    missing = sorted(named - defined)
    assert not missing, f"docs/guarantees.md names tests that do not exist: {missing}"
