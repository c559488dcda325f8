"""Helpers for the reliability suite: the corpus manifest, running stages, checking outputs.

A stage is run in-process through ``llama_pipe.cli.main`` (the same code path as the
``llama-pipe`` command, minus interpreter start-up) unless a test needs a real process.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from llama_pipe.stages import BY_NAME, DATA_STAGES

CORPUS = Path(__file__).resolve().parent / "corpus"
MANIFEST_PATH = CORPUS / "manifest.yaml"
#: The record chain the corpus runs through: merge, then every per-shard data stage (shard and
#: gather only move records between files).
PIPELINE = tuple(s.name for s in DATA_STAGES if s.name == "merge" or s.per_shard)
ROLES = {"human", "gpt", "system"}


def manifest() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST_PATH.read_text(encoding="utf-8"))


def cases_for(test_name: str) -> list[dict[str, Any]]:
    """The manifest cases a test runs (``test: NAME``)."""
    return [c for c in manifest()["cases"] if c["test"] == test_name]


def case(name: str) -> dict[str, Any]:
    for c in manifest()["cases"]:
        if c["name"] == name:
            return c
    raise KeyError(name)


def stage_missing(stage: str) -> str | None:
    """Why ``stage`` cannot run yet (its module is not in the tree), or None."""
    module = BY_NAME[stage].module
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            return f"stage {stage!r}: module {module} is not in the tree yet"
        raise
    return None


def require_stage(*stages: str) -> None:
    for stage in stages:
        why = stage_missing(stage)
        if why:
            pytest.skip(why)


@dataclass
class Run:
    """One stage invocation: its command line, exit code, stderr and output paths."""

    stage: str
    argv: list[str]
    rc: int
    err: str
    outputs: list[Path] = field(default_factory=list)
    stats: list[Path] = field(default_factory=list)


def stage_argv(stage: str, inputs: list[Path], out_dir: Path, tokenizer_dir: Path | None,
               model_dir: Path | None = None) -> tuple[list[str], list[Path], list[Path]]:
    """The command line of a stage that reads records (per the stage contracts), its outputs and
    stats files. ``model_dir`` (train, eval): a tiny HF model used as base (and tuned model)."""
    ins = [str(p) for p in inputs]
    if stage == "train":
        assert model_dir is not None
        run = out_dir / "run"
        return ["train", "--base", str(model_dir), "--train-data", ins[0], "--val-data", ins[0], "-o", str(run),
                "--max-steps", "1", "--device", "cpu", "--max-seq-len", "128"], [run], []
    if stage == "eval":
        assert model_dir is not None
        ev = out_dir / "eval"
        return ["eval", "--base", str(model_dir), "--tuned", str(model_dir), "--val", ins[0], "-o", str(ev),
                "--device", "cpu", "--max-questions", "1", "--max-new-tokens", "4"], [ev], []
    if stage in ("report-stats", "report-metrics"):  # the bad file as one of report's inputs
        good_metrics, good_eval = out_dir / "good-metrics.jsonl", out_dir / "good-eval.json"
        good_metrics.parent.mkdir(parents=True, exist_ok=True)
        good_metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5, "val_loss": 1.7}\n', encoding="utf-8")
        good_eval.write_text('{"base_ppl": 10.0, "tuned_ppl": 5.0}\n', encoding="utf-8")
        metrics = ins[0] if stage == "report-metrics" else str(good_metrics)
        stats = [str(out_dir / "good.stats.json")] if stage == "report-metrics" else ins
        if stage == "report-metrics":
            (out_dir / "good.stats.json").write_text('{"stage": "merge", "unit": "records", "in": 2, "out": 1, '
                                                      '"rejected": {"duplicate_id": 1}}\n', encoding="utf-8")
        rep = out_dir / "report"
        return ["report", "--train-metrics", metrics, "--stats", *stats, "--eval", str(good_eval), "-o", str(rep)], [rep], []
    if stage == "eval-questions":  # the bad file as eval's MT-bench questions, with good validation data
        assert model_dir is not None
        ev = out_dir / "eval"
        return ["eval", "--base", str(model_dir), "--tuned", str(model_dir), "--val", str(CORPUS / "crlf.jsonl"),
                "--questions", ins[0], "-o", str(ev), "--device", "cpu", "--max-questions", "1",
                "--max-new-tokens", "4"], [ev], []
    st = BY_NAME[stage]  # a data stage: its command line from the registry (llama_pipe.stages.LAYOUTS)
    if st.layout == "records" and "convert" in st.reads and not st.tokenizer:
        raise ValueError(f"{stage} generates with a model: call it with its own arguments")
    if st.layout == "records":
        out = out_dir / f"{stage}.jsonl"
        flags = ["--tokenizer", str(tokenizer_dir)] if st.tokenizer else []
        if st.settings is not None and "workers" in {f.name for f in dataclasses.fields(st.settings)}:
            flags += ["--workers", "1"]
        ins = ins if st.records_from is None else ins[:1]  # merge reads every input, the others one file
        return [stage, *ins, "-o", str(out), *flags], [out], [out_dir / f"{stage}.stats.json"]
    if st.layout == "shards":
        d = out_dir / "shards"
        return [stage, ins[0], "--n", "2", "-o", str(d)], [d], [d / f"{stage}.stats.json"]
    if st.layout == "sets":
        tr, va = out_dir / "train.jsonl", out_dir / "val.jsonl"
        return [stage, *ins, "--train", str(tr), "--val", str(va)], [tr, va], [out_dir / f"{stage}.stats.json"]
    raise ValueError(stage)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``llama-pipe ARGV`` in-process: (exit code, stderr). argparse errors count as exit 2."""
    from llama_pipe.cli import main

    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code if isinstance(exc.code, int) else 1
    return rc, capsys.readouterr().err


def run_stage(stage: str, inputs: list[Path], out_dir: Path, capsys: pytest.CaptureFixture[str],
              tokenizer_dir: Path | None = None, extra: list[str] | None = None, model_dir: Path | None = None) -> Run:
    out_dir.mkdir(parents=True, exist_ok=True)
    argv, outs, stats = stage_argv(stage, inputs, out_dir, tokenizer_dir, model_dir)
    rc, err = run_cli(argv + (extra or []), capsys)
    return Run(stage, argv, rc, err, outs, stats)


# ----------------------------------------------------------------------------- checks


def files_under(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def stray_temp_files(root: Path) -> list[Path]:
    """Temporary files a stage left behind (``.x.tmp`` from AtomicFile, ``OUT.tmp-*`` dirs)."""
    return sorted(p for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name or ".tmp." in p.name)


def check_stats(path: Path) -> dict[str, Any]:
    """The stats file exists and ``in == out + sum(rejected)``."""
    assert path.is_file(), f"no stats file {path}"
    stats = json.loads(path.read_text(encoding="utf-8"))
    total = stats["out"] + sum(stats["rejected"].values())
    assert stats["in"] == total, f"{path}: in={stats['in']} but out+rejected={total}: {stats}"
    return stats


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# Text is cleaned (empty turns dropped, NUL bytes removed) by clean: its output, and everything
# downstream of it in the pipeline, is held to the strict record check.


def check_record(rec: Any, where: str, strict: bool = True) -> None:
    """A record a stage passed on is well formed: a string id and string turns of known roles;
    ``strict`` (stages from clean on): every turn non-empty text without NUL bytes."""
    assert isinstance(rec, dict), f"{where}: output record is not an object: {rec!r:.200}"
    assert isinstance(rec.get("id"), str) and rec["id"], f"{where}: output record without a string id: {rec!r:.200}"
    if where.startswith("shard-"):
        return  # shard only scatters merge's output: it checks JSON and ids, the next stage the shape
    conv = rec.get("conversations")
    assert isinstance(conv, list) and conv, f"{where}: {rec['id']}: no conversations"
    for i, turn in enumerate(conv):
        assert isinstance(turn, dict), f"{where}: {rec['id']} turn {i} is not an object"
        assert turn.get("from") in ROLES, f"{where}: {rec['id']} turn {i} has role {turn.get('from')!r}"
        value = turn.get("value")
        assert isinstance(value, str), f"{where}: {rec['id']} turn {i} value is {type(value).__name__}"
        if not strict:
            continue
        assert value.strip(), f"{where}: {rec['id']} turn {i} is empty: {value!r:.80}"
        assert "\x00" not in value, f"{where}: {rec['id']} turn {i} contains a NUL byte"


def rejects_of(out: Path) -> list[dict[str, Any]]:
    from llama_pipe.core.records import rejects_path

    path = rejects_path(out)
    assert path.is_file(), f"no rejects file {path}"
    return read_jsonl(path)


def check_success(run: Run, strict: bool = False) -> None:
    """A stage that succeeded: outputs present, stats invariant, records well formed (``strict``:
    see :func:`check_record`), no temp files."""
    assert run.rc == 0, f"llama-pipe {' '.join(run.argv)} exited {run.rc}: {run.err[-2000:]}"
    for out in run.outputs:
        assert out.exists(), f"{run.stage}: output {out} missing after exit 0"
    for s in run.stats:
        stats = check_stats(s)
        if run.stage == "shard":
            assert sum(stats["shards"]) == stats["out"], stats
        if run.stage == "gather":
            assert stats["train"] + stats["val"] == stats["lines_out"], stats
    for out in run.outputs:
        for f in sorted(out.glob("*.jsonl")) if out.is_dir() else [out]:
            if f.name.endswith((".rejects.jsonl",)):
                continue
            for n, rec in enumerate(read_jsonl(f)):
                check_record(rec, f"{f.name}#{n}", strict=strict)
    assert not stray_temp_files(run.outputs[0].parent), stray_temp_files(run.outputs[0].parent)


def check_clean_failure(run: Run, message: list[str], before: set[Path], root: Path) -> None:
    """A stage that refused its input: exit 2, one clear line naming the file, nothing written."""
    assert run.rc == 2, f"llama-pipe {' '.join(run.argv)}: expected exit 2, got {run.rc}; stderr:\n{run.err[-3000:]}"
    assert "Traceback" not in run.err, run.err
    assert f"llama-pipe {run.argv[0]}: error:" in run.err, run.err
    for part in message:
        assert part in run.err, f"{run.stage}: message lacks {part!r}: {run.err.strip()}"
    after = files_under(root)
    assert after <= before, f"{run.stage} left files behind after failing: {sorted(map(str, after - before))}"


def set_env(**env: str) -> dict[str, str]:
    """A copy of os.environ with overrides (for subprocesses)."""
    out = dict(os.environ)
    out.update(env)
    return out
