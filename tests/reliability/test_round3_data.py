"""Hostile and unlucky input, round 3 (issue 26): the data-and-config classes.

* Data lost while the stage says it succeeded: an output path (``-o``, ``--stats``, ``--rejects``,
  gather's ``--train``/``--val``) that names an input or another output, by any spelling; a
  directory output that holds the stage's inputs, another stage's products, or files nobody told
  llama-pipe about. Refused with exit 2 and one line, before anything is written.
* Silently wrong data: near-duplicates split across shards and across train/validation; NaN and
  infinite settings; seeds out of range; YAML alias bombs and deep nesting; a config value that
  starts with ``-``; an input path with braces; ``1e999`` written back as ``Infinity``; a torn last
  line of a live metrics file; split's time quadratic in the turns of one record.

Each test feeds the real command (in-process through ``llama_pipe.cli.main``, or Snakemake in a
subprocess) and checks what is on disk afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llama_pipe.core.settings import _leaf_fields
from tests.reliability import harness as h

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample" / "sharegpt_sample.json"
FLAGGED_STAGES = ("merge", "clean", "filter-lang", "split", "gather")  # the data stages with --stats/--rejects


def _conv(q: str, a: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def _records(n: int = 12, prefix: str = "r") -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "conversations": _conv(f"What is {i} plus {i}, please tell me?", f"{i} plus {i} is {2 * i}.")}
            for i in range(n)]


def _write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _strict_json(line: str) -> Any:
    """``json.loads`` that refuses NaN/Infinity (Python's json would accept them)."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")
    return json.loads(line, parse_constant=refuse)


def _one_error_line(err: str, stage: str) -> str:
    """The single line the stage printed for its error (nothing else on stderr)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"llama-pipe {stage}: error:"), err
    assert "Traceback" not in err, err
    return lines[0]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load_module(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ============================================================================= data lost silently


@pytest.mark.parametrize("flag", ["--stats", "--rejects"])
@pytest.mark.parametrize("stage", FLAGGED_STAGES)
def test_stats_or_rejects_naming_the_input_is_refused(stage: str, flag: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str], tokenizer_dir: Path) -> None:
    """``--stats IN`` / ``--rejects IN``: before, exit 0 and the input replaced by the stats or
    rejects. Now exit 2, one line naming the flag and the input; the input byte-identical, nothing
    written."""
    inp = _write_jsonl(tmp_path / "in" / "records.jsonl", _records())
    before_bytes = inp.read_bytes()
    argv, _, _ = h.stage_argv(stage, [inp], tmp_path / "out", tokenizer_dir)
    (tmp_path / "out").mkdir()
    before = h.files_under(tmp_path)
    rc, err = h.run_cli(argv + [flag, str(inp)], capsys)
    assert rc == 2, err
    line = _one_error_line(err, stage)
    assert flag in line and "input" in line and str(inp) in line, line
    assert inp.read_bytes() == before_bytes
    assert h.files_under(tmp_path) == before and not h.stray_temp_files(tmp_path)


def test_shard_output_directory_holding_its_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``shard DIR/in.jsonl -o DIR``: before, DIR was replaced by the shards and the input deleted."""
    d = tmp_path / "d"
    inp = _write_jsonl(d / "in.jsonl", _records())
    before = _tree(tmp_path)
    rc, err = h.run_cli(["shard", str(inp), "--n", "2", "-o", str(d)], capsys)
    assert rc == 2, err
    line = _one_error_line(err, "shard")
    assert "contains the stage's input" in line and str(inp) in line, line
    assert _tree(tmp_path) == before and not h.stray_temp_files(tmp_path)


# name -> (the output names an input by this spelling)
def _alias(kind: str, inp: Path, tmp_path: Path) -> Path:
    if kind == "same":
        return inp
    if kind == "dot_slash":  # ./x for x, and a detour through ..
        return inp.parent / "." / ".." / inp.parent.name / inp.name
    if kind == "symlink":
        link = tmp_path / "link.jsonl"
        link.symlink_to(inp)
        return link
    if kind == "hardlink":
        other = tmp_path / "hard.jsonl"
        os.link(inp, other)
        return other
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["same", "dot_slash", "symlink", "hardlink"])
@pytest.mark.parametrize(("stage", "flag"), [("clean", "-o"), ("merge", "--stats"), ("gather", "--val"), ("filter-lang", "--rejects")])
def test_output_aliasing_an_input_is_refused(stage: str, flag: str, kind: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str], tokenizer_dir: Path) -> None:
    """An output that is the input under another name (``./x``, a symbolic link, a hard link):
    exit 2 naming it, the input unchanged, nothing written."""
    inp = _write_jsonl(tmp_path / "in" / "records.jsonl", _records())
    data = inp.read_bytes()
    target = _alias(kind, inp, tmp_path)
    argv, _, _ = h.stage_argv(stage, [inp], tmp_path / "out", tokenizer_dir)
    (tmp_path / "out").mkdir()
    if flag in argv:  # replace the stage's own value of the flag (-o, --val)
        argv[argv.index(flag) + 1] = str(target)
    else:
        argv += [flag, str(target)]
    before = h.files_under(tmp_path)
    rc, err = h.run_cli(argv, capsys)
    assert rc == 2, err
    line = _one_error_line(err, stage)
    assert flag in line and "input" in line, line
    assert inp.read_bytes() == data
    assert h.files_under(tmp_path) == before and not h.stray_temp_files(tmp_path)


@pytest.mark.parametrize(("stage", "first", "second"), [
    ("clean", "-o", "--stats"), ("merge", "--rejects", "--stats"), ("gather", "--train", "--rejects"), ("split", "-o", "--rejects"),
])
def test_two_outputs_naming_one_file_are_refused(stage: str, first: str, second: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str], tokenizer_dir: Path) -> None:
    """Two outputs that are one file (``x`` and ``./x``; a symbolic link to the other): the later
    rename would silently replace the earlier output. Exit 2, nothing written."""
    inp = _write_jsonl(tmp_path / "in" / "records.jsonl", _records())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv, _, _ = h.stage_argv(stage, [inp], out_dir, tokenizer_dir)
    a = out_dir / "one.jsonl"
    for flag, path in ((first, a), (second, out_dir / "." / "one.jsonl")):
        if flag in argv:
            argv[argv.index(flag) + 1] = str(path)
        else:
            argv += [flag, str(path)]
    before = h.files_under(tmp_path)
    rc, err = h.run_cli(argv, capsys)
    assert rc == 2, err
    line = _one_error_line(err, stage)
    assert first in line and second in line and "same file" in line, line
    assert h.files_under(tmp_path) == before
    # a symbolic link to the other output is the same file too
    link = out_dir / "link.jsonl"
    link.symlink_to(a)
    argv[argv.index(second) + 1] = str(link)
    rc, err = h.run_cli(argv, capsys)
    assert rc == 2 and "same file" in err, err


def _report_inputs(run: Path, stats_dir: Path) -> list[str]:
    """A finished run's products (train metrics, eval) and a stats file: report's inputs."""
    (run / "train").mkdir(parents=True)
    (run / "train" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5, "val_loss": 1.7}\n')
    (run / "train" / "adapter_model.safetensors").write_bytes(b"adapter weights")
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text('{"base_ppl": 10.0, "tuned_ppl": 5.0}\n')
    stats_dir.mkdir(parents=True, exist_ok=True)
    stats = stats_dir / "merged.stats.json"
    stats.write_text('{"stage": "merge", "unit": "records", "in": 2, "out": 1, "rejected": {"duplicate_id": 1}}\n')
    return ["--train-metrics", str(run / "train" / "metrics.jsonl"), "--stats", str(stats),
            "--eval", str(run / "eval" / "metrics.json")]


def test_report_into_the_run_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``report -o results/<run>``: before, the run's adapter and eval were deleted and replaced by
    plots, exit 0. Now exit 2 naming the run's input it would delete; the run untouched."""
    run = tmp_path / "results" / "default"
    argv = ["report", *_report_inputs(run, tmp_path / "results" / "merge")]
    before = _tree(tmp_path)
    rc, err = h.run_cli([*argv, "-o", str(run)], capsys)
    assert rc == 2, err
    line = _one_error_line(err, "report")
    assert "contains the stage's input" in line, line
    assert _tree(tmp_path) == before and not h.stray_temp_files(tmp_path)
    # Its own directory is replaced on the next run, as before.
    rc, err = h.run_cli([*argv, "-o", str(run / "report")], capsys)
    assert rc == 0, err
    rc, err = h.run_cli([*argv, "-o", str(run / "report")], capsys)
    assert rc == 0, err
    assert (run / "report" / "report.md").is_file() and (run / "train" / "adapter_model.safetensors").is_file()


def _foreign_argv(stage: str, out: Path, tmp_path: Path, meta_base: Path) -> list[str]:
    """A command line of ``stage`` writing directory ``out`` (inputs real enough for main to run)."""
    model = tmp_path / "no-model"
    data = _write_jsonl(tmp_path / "in" / "records.jsonl", _records())
    if stage == "make-base":
        return ["make-base", "--tokenizer_corpus", str(SAMPLE), str(out)]
    if stage == "download":
        return ["download", "--source", "org/not-a-model", str(out)]
    if stage == "convert":
        return ["convert", str(meta_base), "-o", str(out)]
    if stage == "merge-adapter":
        return ["merge-adapter", "--base", str(model), "--adapter", str(tmp_path / "no-adapter"), "-o", str(out)]
    if stage == "eval":
        return ["eval", "--base", str(model), "--tuned", str(model), "--val", str(data), "-o", str(out), "--device", "cpu"]
    if stage == "train":
        return ["train", "--base", str(model), "--train-data", str(data), "--val-data", str(data), "-o", str(out),
                "--device", "cpu", "--max-steps", "1"]
    if stage == "report":
        return ["report", *_report_inputs(tmp_path / "results" / "run", tmp_path / "results" / "merge"), "-o", str(out)]
    if stage == "shard":
        return ["shard", str(data), "--n", "2", "-o", str(out)]
    raise ValueError(stage)


DIR_STAGES = ("make-base", "download", "convert", "merge-adapter", "eval", "train", "report", "shard")


@pytest.mark.parametrize("stage", DIR_STAGES)
def test_every_directory_stage_keeps_a_directory_it_did_not_write(stage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  meta_base: Path) -> None:
    """``-o DIR`` where DIR holds a file llama-pipe did not write (notes, another tool's output):
    every stage that writes a directory refuses with exit 2 and one line before its work, and the
    file is still there. (Before, make-base, convert, report and shard deleted it with exit 0.)"""
    h.require_stage(stage)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes, not llama-pipe's\n")
    rc, err = h.run_cli(_foreign_argv(stage, out, tmp_path, meta_base), capsys)
    assert rc == 2, err[-2000:]
    line = _one_error_line(err, stage)
    assert str(out) in line and "did not write" in line, line
    assert (out / "notes.txt").read_text() == "my notes, not llama-pipe's\n"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and not h.stray_temp_files(tmp_path)


def test_a_stage_keeps_another_stages_output_and_replaces_its_own(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A directory records which stage wrote it and its files (``.llama-pipe-output.json``): shard
    replaces its own earlier output and an empty directory, but report refuses shard's output,
    and shard refuses its own output once someone added a file to it."""
    MARKER = ".llama-pipe-output.json"  # noqa: N806 - llama_pipe.core.atomic.MARKER
    data = _write_jsonl(tmp_path / "in" / "records.jsonl", _records())
    shards = tmp_path / "shards"
    shards.mkdir()  # empty: fine
    for _ in range(2):
        rc, err = h.run_cli(["shard", str(data), "--n", "2", "-o", str(shards)], capsys)
        assert rc == 0, err
    marker = json.loads((shards / MARKER).read_text())
    assert marker["stage"] == "shard" and marker["files"] == sorted(p.name for p in shards.iterdir() if p.name != MARKER)
    (shards / ".snakemake_timestamp").write_text("")  # Snakemake's bookkeeping of a directory() output
    rc, err = h.run_cli(["shard", str(data), "--n", "2", "-o", str(shards)], capsys)
    assert rc == 0, err
    before = _tree(shards)
    argv = ["report", *_report_inputs(tmp_path / "results" / "run", tmp_path / "results" / "merge"), "-o", str(shards)]
    rc, err = h.run_cli(argv, capsys)
    assert rc == 2 and "holds the output of `llama-pipe shard`" in _one_error_line(err, "report"), err
    (shards / "extra.txt").write_text("added by hand")
    rc, err = h.run_cli(["shard", str(data), "--n", "2", "-o", str(shards)], capsys)
    assert rc == 2 and "extra.txt" in _one_error_line(err, "shard"), err
    assert _tree(shards) == {**before, "extra.txt": b"added by hand"}


def test_export_onto_a_file_of_its_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_hf_model_dir: Path) -> None:
    """``export MODEL -o MODEL/model.safetensors``: before, the model's weights were replaced by
    the GGUF, exit 0. Now exit 2; the model unchanged."""
    h.require_stage("export")
    model = tmp_path / "model"
    shutil.copytree(tiny_hf_model_dir, model)
    before = _tree(model)
    rc, err = h.run_cli(["export", str(model), "-o", str(model / "model.safetensors"), "--type", "f32"], capsys)
    assert rc == 2, err[-2000:]
    assert "input directory" in _one_error_line(err, "export")
    assert _tree(model) == before


def test_train_refuses_a_checkpoint_directory_holding_its_data(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                tiny_hf_model_dir: Path) -> None:
    """``train -o RUN`` whose ``RUN.ckpt`` holds the training data: a fresh start removes
    ``RUN.ckpt`` (before: the data deleted). Now exit 2 before training; the data kept."""
    h.require_stage("train")
    data = _write_jsonl(tmp_path / "run.ckpt" / "train.jsonl", _records())
    rc, err = h.run_cli(["train", "--base", str(tiny_hf_model_dir), "--train-data", str(data), "--val-data", str(data),
                         "-o", str(tmp_path / "run"), "--device", "cpu", "--max-steps", "1", "--max-seq-len", "128"], capsys)
    assert rc == 2, err[-2000:]
    assert "checkpoint directory holds the input" in _one_error_line(err, "train")
    assert data.is_file() and not (tmp_path / "run").exists()


# ============================================================================= silently wrong data


def _twins(n: int) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """``n`` questions asked twice: plain, and wrapped in HTML with other whitespace (the same text
    once clean has converted it), with different ids and answers."""
    recs, pairs = [], []
    for i in range(n):
        q = f"How do I compute the sum of the numbers from {i} to {i * 7 + 3} quickly?"
        html_q = f"<div><p>How do I compute the sum of the numbers from <span>{i}</span> to\n  {i * 7 + 3} quickly?</p></div>"
        recs.append({"id": f"plain-{i}", "conversations": _conv(q, f"Use the formula for an arithmetic series ({i}).")})
        recs.append({"id": f"html-{i}", "conversations": _conv(html_q, f"Add them up one by one, or use n(n+1)/2 ({i}).")})
        pairs.append((f"plain-{i}", f"html-{i}"))
    return recs, pairs


def test_html_twins_meet_in_one_shard_and_one_side_of_the_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Twins that differ only in HTML: before, shard hashed the raw text, so most pairs landed in
    different shards, clean (which compares cleaned text per shard) kept both, and gather (keyed
    by id) put many pairs on both sides of the split. Now every pair shares a shard, and the pair
    (both kept, with dedup off) shares a side."""
    recs, pairs = _twins(24)
    inp = _write_jsonl(tmp_path / "in.jsonl", recs)
    shards = tmp_path / "shards"
    rc, err = h.run_cli(["shard", str(inp), "--n", "4", "-o", str(shards)], capsys)
    assert rc == 0, err
    where = {r["id"]: f.name for f in shards.glob("shard-*.jsonl") for r in h.read_jsonl(f)}
    apart = [(a, b) for a, b in pairs if where[a] != where[b]]
    assert not apart, f"{len(apart)} of {len(pairs)} twin pairs in different shards: {apart[:3]}"
    # clean drops the second of each pair as a duplicate first exchange... (answers equal here)
    same = _write_jsonl(tmp_path / "same.jsonl", [{**r, "conversations": _conv(r["conversations"][0]["value"], "Same answer.")}
                                                   for r in recs])
    rc, err = h.run_cli(["shard", str(same), "--n", "4", "-o", str(tmp_path / "same_shards")], capsys)
    assert rc == 0, err
    kept = 0
    for f in sorted((tmp_path / "same_shards").glob("shard-*.jsonl")):
        out = tmp_path / "clean" / f.name
        rc, err = h.run_cli(["clean", str(f), "-o", str(out), "--workers", "1"], capsys)
        assert rc == 0, err
        kept += len(h.read_jsonl(out))
    assert kept == len(pairs), f"clean kept {kept} of {len(recs)} records; each twin pair should leave one"
    # ... and with different answers both stay: gather puts both on one side.
    cleaned = []
    for f in sorted(shards.glob("shard-*.jsonl")):
        out = tmp_path / "clean2" / f.name
        rc, err = h.run_cli(["clean", str(f), "-o", str(out), "--workers", "1"], capsys)
        assert rc == 0, err
        cleaned.append(str(out))
    train, val = tmp_path / "data" / "train.jsonl", tmp_path / "data" / "val.jsonl"
    rc, err = h.run_cli(["gather", *cleaned, "--train", str(train), "--val", str(val), "--val_fraction", "0.4"], capsys)
    assert rc == 0, err
    side = {r["id"]: "val" for r in h.read_jsonl(val)} | {r["id"]: "train" for r in h.read_jsonl(train)}
    assert len(side) == len(recs) and "val" in side.values() and "train" in side.values()
    split_pairs = [(a, b) for a, b in pairs if side[a] != side[b]]
    assert not split_pairs, f"{len(split_pairs)} twin pairs on both sides of the split: {split_pairs[:3]}"


def test_gather_keeps_every_chunk_of_a_conversation_on_one_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The question key does not break what the id key gave: split's chunks ``ID_0``, ``ID_1`` of
    one conversation (each with its own first question) land on one side."""
    recs = []
    for i in range(40):
        recs += [{"id": f"c{i}_0", "conversations": _conv(f"First question number {i}?", "First answer.")},
                 {"id": f"c{i}_1", "conversations": _conv(f"A later question {i * 13}?", "Later answer.")}]
    inp = _write_jsonl(tmp_path / "split.jsonl", recs)
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    rc, err = h.run_cli(["gather", str(inp), "--train", str(train), "--val", str(val), "--val_fraction", "0.5"], capsys)
    assert rc == 0, err
    val_ids = {r["id"] for r in h.read_jsonl(val)}
    assert val_ids and len(val_ids) < len(recs)
    assert all((f"c{i}_0" in val_ids) == (f"c{i}_1" in val_ids) for i in range(40))


def _float_fields() -> list[tuple[str, str, type]]:
    from llama_pipe.config import SECTIONS
    from llama_pipe.core.settings import _strip_optional

    return [(section, name, cls) for section, cls in SECTIONS.items() for name, tp, _ in _leaf_fields(cls)
            if _strip_optional(tp)[0] is float]


def test_nan_and_infinity_are_refused_in_every_float_setting(tmp_path: Path) -> None:
    """NaN passes every minimum/maximum check (each comparison is false); infinity passes a
    minimum. In every float setting of every section, ``.nan``/``.inf``/``1e999`` in config.yaml
    and ``nan``/``inf`` as a flag are refused naming the key."""
    import argparse

    from llama_pipe.config import load_config, settings_from_args
    from llama_pipe.core.errors import ConfigError
    from llama_pipe.core.settings import add_settings_arguments

    fields = _float_fields()
    assert len(fields) >= 15, fields
    for section, name, cls in fields:
        *parents, leaf = name.split(".")
        for text in (".nan", ".inf", "-.inf", "1e999"):
            yaml_text = f"{section}:\n" + "".join(f"{'  ' * (i + 1)}{p}:\n" for i, p in enumerate(parents))
            yaml_text += f"{'  ' * (len(parents) + 1)}{leaf}: {text}\n"
            cfg = tmp_path / "config.yaml"
            cfg.write_text(yaml_text)
            with pytest.raises(ConfigError, match=rf"{section}\.{name}: .* not a finite number"):
                load_config(cfg)
        parser = argparse.ArgumentParser()
        add_settings_arguments(parser, cls, section)
        for text in ("nan", "inf", "-inf", "NaN"):
            with pytest.raises(SystemExit):
                settings_from_args(parser.parse_args([f"--{name}", text]), cls, section)


def test_nan_val_fraction_and_request_timeout_are_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The cases from the issue through the real commands: ``val_fraction: .nan`` (before: an empty
    validation set and NaN in the stats, exit 0) and ``serve --request_timeout nan`` (before: a
    server that answered nothing)."""
    inp = _write_jsonl(tmp_path / "in.jsonl", _records())
    cfg = tmp_path / "config.yaml"
    cfg.write_text("data:\n  val_fraction: .nan\n")
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    rc, err = h.run_cli(["gather", str(inp), "--train", str(train), "--val", str(val), "--config", str(cfg)], capsys)
    assert rc == 2 and "data.val_fraction" in err and "finite" in err, err
    rc, err = h.run_cli(["gather", str(inp), "--train", str(train), "--val", str(val), "--val_fraction", "nan"], capsys)
    assert rc == 2 and "finite" in err, err
    assert not train.exists() and not val.exists()
    rc, err = h.run_cli(["serve", str(tmp_path / "model"), "--request_timeout", "nan"], capsys)
    assert rc == 2 and "request_timeout" in err and "finite" in err, err


def test_seeds_are_bounded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every seed setting takes 0 .. 2**32-1 (what numpy, torch and langdetect accept); beyond it,
    or negative, is a config error naming the key. Before: ``make-base --tiny.seed 2**64`` trained
    a tokenizer and then died with an OverflowError traceback."""
    from llama_pipe.config import SECTIONS

    seeds = [(s, name, f) for s, cls in SECTIONS.items() for name, _, f in _leaf_fields(cls) if name.split(".")[-1] == "seed"]
    assert len(seeds) >= 5
    for section, name, f in seeds:
        assert (f.metadata.get("minimum"), f.metadata.get("maximum")) == (0, 2**32 - 1), f"{section}.{name}"
    for value in (str(2**64), "-1"):
        rc, err = h.run_cli(["make-base", str(tmp_path / "base"), "--tiny.seed", value], capsys)
        assert rc == 2 and "base.tiny.seed" in err and "Traceback" not in err, err
    assert not (tmp_path / "base").exists()


def _bomb(kind: str = "list") -> str:
    """A ~500-byte YAML 'billion laughs': 9 levels of 9 aliases (387 million leaves)."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'] if kind == "list" else \
        ["a: &a {" + ", ".join(f"k{i}: lol" for i in range(9)) + "}"]
    prev = "a"
    for name in "bcdefghi":
        if kind == "list":
            lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
        else:
            lines.append(f"{name}: &{name} {{" + ", ".join(f"k{i}: *{prev}" for i in range(9)) + "}")
        prev = name
    return "\n".join(lines) + "\n"


def _limited(cmd: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str] | None, float]:
    """Run ``cmd`` with its address space capped at 3 GiB (an expanding bomb dies, not the machine)."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    t = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, preexec_fn=cap,
                              env=env or h.set_env(PYTHONPATH=os.pathsep.join(sys.path)))
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - t
    return proc, time.monotonic() - t


def test_yaml_alias_bomb_in_a_stage_config_is_refused_at_once(tmp_path: Path) -> None:
    """A 500-byte alias bomb given as ``--config``: before, 51 s and a MemoryError traceback. Now
    exit 2 within seconds, naming aliases. Deep nesting and a 5,000-digit number: exit 2, not a
    RecursionError or ValueError traceback."""
    inp = _write_jsonl(tmp_path / "in.jsonl", _records())
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_bomb())
    assert len(bomb.read_bytes()) < 600
    base = [sys.executable, "-m", "llama_pipe.cli", "clean", str(inp), "-o", str(tmp_path / "out.jsonl")]
    proc, took = _limited([*base, "--config", str(bomb)], tmp_path, timeout=60)
    assert proc is not None, f"still running after {took:.0f} s"
    assert proc.returncode == 2 and "alias" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert took < 20, took
    for name, text in (("deep", "clean:\n  blocked_words: " + "[" * 5000 + "]" * 5000 + "\n"),
                       ("bigint", "clean:\n  min_turns: " + "7" * 5000 + "\n")):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(text)
        proc, took = _limited([*base, "--config", str(cfg)], tmp_path, timeout=60)
        assert proc is not None and proc.returncode == 2 and "Traceback" not in proc.stderr, (name, proc and proc.stderr[-2000:])
        assert str(cfg) in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()


@pytest.fixture(scope="module")
def workflow_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    helpers = _load_module(REPO / "tests" / "workflow" / "workflow_helpers.py")
    return Path(helpers.copy_workflow(tmp_path_factory.mktemp("round3-workflow") / "repo"))


def _snakemake(workdir: Path, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess[str] | None, float]:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = h.set_env(PATH=path, PYTHONPATH=os.pathsep.join(sys.path))
    return _limited([sys.executable, "-m", "snakemake", "-n", "--cores", "1", *args], workdir, timeout, env)


def test_yaml_alias_bomb_stops_the_workflow_at_once(workflow_copy: Path, tmp_path: Path) -> None:
    """The Snakefile reads config.yaml with llama-pipe's loader before Snakemake's ``configfile:``
    does (Snakemake's would expand a mapping bomb); a list bomb in a ``--configfile`` (read by
    Snakemake before the Snakefile) is found as a shared value. Both stop at once naming aliases;
    before, the workflow ran out of memory."""
    work = tmp_path / "wf"
    shutil.copytree(workflow_copy, work)
    config = work / "config.yaml"
    good = config.read_text()
    config.write_text(good + "\n" + _bomb("mapping").replace("a:", "x_a:", 1))
    proc, took = _snakemake(work)
    assert proc is not None, f"snakemake still running after {took:.0f} s"
    assert proc.returncode != 0 and "alias" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert took < 60, took
    config.write_text(good)
    extra = tmp_path / "extra.yaml"
    extra.write_text(_bomb("list"))
    proc, took = _snakemake(work, "--configfile", str(extra))
    assert proc is not None, f"snakemake still running after {took:.0f} s"
    assert proc.returncode != 0 and "alias" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]


def test_settings_that_start_with_a_dash_reach_the_stage_as_values() -> None:
    """A config value such as ``chat.system_prompt: "-h"``: the flags a rule renders (``--key value``)
    made argparse read ``-h`` as an option (help, or "expected one argument"). Now such a value is
    passed as ``--key=value``: every string setting of every section round-trips through its
    stage's parser."""
    import argparse

    from llama_pipe.config import SECTIONS
    from llama_pipe.core.settings import _strip_optional, add_settings_arguments, settings_to_argv, shell_args

    checked = 0
    for section, cls in SECTIONS.items():
        for name, tp, _ in _leaf_fields(cls):
            if _strip_optional(tp)[0] is not str or "." in name:
                continue
            for value in ("-h", "--help", "-", "-x -y"):
                parser = argparse.ArgumentParser()
                add_settings_arguments(parser, cls, section)
                argv = shlex.split(shell_args({name: value}, cls))
                assert argv == settings_to_argv({name: value}, cls)
                assert vars(parser.parse_args(argv))[f"setting:{section}:{name}"] == value, (section, name, value)
                checked += 1
    assert checked >= 40


def test_dash_value_and_braced_input_through_the_workflow(workflow_copy: Path, tmp_path: Path) -> None:
    """Through Snakemake: ``chat.system_prompt: "-h"`` reaches split's parser as the value "-h",
    and an input file named ``{x}.json`` is read as that file, through a link with a plain name
    (before: a WildcardError stopped the workflow; Snakemake has no escape for braces in paths)."""
    from llama_pipe.cli import build_parser
    from llama_pipe.config import ChatSettings, settings_from_args

    work = tmp_path / "wf"
    shutil.copytree(workflow_copy, work)
    braced = work / "data" / "{x}.json"
    shutil.copy(SAMPLE, braced)
    proc, _ = _snakemake(work, "-p", "--config", 'chat={"system_prompt": "-h"}', 'data={"inputs": ["data/{x}.json"]}',
                         "--", "data")
    assert proc is not None
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    merge = next(line for line in out.splitlines() if "llama-pipe merge " in line)
    merge = merge[merge.index("llama-pipe merge ") :]
    given = shlex.split(merge)[shlex.split(merge).index("--") + 1]
    assert (work / given).resolve() == braced.resolve(), merge  # a plain-named link to the file
    split = next(line for line in out.splitlines() if "llama-pipe split " in line)
    argv = shlex.split(split[split.index("llama-pipe split ") :].split(" > ")[0])[1:]
    args = build_parser("split").parse_args(argv)
    assert settings_from_args(args, ChatSettings, "chat").system_prompt == "-h"


@pytest.mark.parametrize("stage", ["merge", "clean", "shard", "gather"])
def test_a_number_beyond_float_range_is_rejected_not_written_as_infinity(stage: str, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str], tokenizer_dir: Path) -> None:
    """``1e999`` is valid JSON, but Python reads it as inf and wrote it back as ``Infinity`` (not
    JSON) in clean, shard and gather. Now the record is rejected ``invalid_json`` with a reason
    naming the number, and every line every stage writes is strict JSON."""
    recs = _records(6)
    recs[2] = {**recs[2], "score": 1e308}  # the largest ordinary float passes
    lines = [json.dumps(r) for r in recs]
    lines[1] = lines[1][:-1] + ', "score": 1e999}'
    lines[4] = lines[4][:-1] + ', "weights": [-1.5E+400, 2]}'
    inp = tmp_path / "in" / "records.jsonl"
    inp.parent.mkdir()
    inp.write_text("\n".join(lines) + "\n")
    run = h.run_stage(stage, [inp], tmp_path / "out", capsys, tokenizer_dir)
    assert run.rc == 0, run.err
    written = [f for f in (tmp_path / "out").rglob("*") if f.is_file() and f.suffix in (".jsonl", ".json")]
    assert written
    kept = []
    for f in written:
        text = f.read_text()
        if f.suffix == ".jsonl":
            for line in text.splitlines():
                row = _strict_json(line)
                if "rejects" not in f.name:
                    kept.append(row["id"])
        else:
            _strict_json(text)
    assert sorted(kept) == ["r0", "r2", "r3", "r5"], kept
    rejects = [r for f in written if "rejects" in f.name for r in h.read_jsonl(f)]
    assert sorted(r["reason"] for r in rejects) == ["invalid_json", "invalid_json"]
    assert any("1e999" in r["detail"] and "too large" in r["detail"] for r in rejects), rejects


def _torn_metrics(path: Path) -> None:
    rows = [{"step": 0, "val_loss": 3.0}, {"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.8}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')


def test_torn_last_line_of_live_metrics_is_dropped_on_resume(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A run killed while appending a metrics row leaves a cut-off last line in the checkpoint's
    live ``metrics.jsonl``; resuming read it with json.loads and died with a traceback. Now the
    rows up to the checkpoint's step are kept, the torn line is dropped with a warning, and the
    file is valid JSON lines again."""
    from llama_pipe.train.runstate import Metrics

    path = tmp_path / "metrics.jsonl"
    _torn_metrics(path)
    caplog.set_level("WARNING", logger="llama_pipe")
    Metrics(path, True).restart_at(2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]
    assert any("cut off" in r.getMessage() for r in caplog.records), caplog.text
    # a row that is not a metrics row (a list, a string step) is dropped the same way
    path.write_text('{"step": 0, "val_loss": 3.0}\n[1, 2]\n{"step": "x"}\n{"step": 1, "loss": 2.5}\n')
    Metrics(path, True).restart_at(5)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1]


def test_report_reads_metrics_with_a_torn_last_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """report (and ``--compare``) read a metrics file whose last line was cut off: the row is
    dropped with a warning, the report is written. A bad line in the middle is still exit 2."""
    from llama_pipe.report.runs import read_losses

    path = tmp_path / "metrics.jsonl"
    _torn_metrics(path)
    train, val = read_losses(path)
    assert train == [(1, 2.5), (2, 2.0), (3, 1.8)] and val == [(0, 3.0)]
    argv = ["report", *_report_inputs(tmp_path / "results" / "run", tmp_path / "results" / "merge"), "-o", str(tmp_path / "rep")]
    argv[argv.index("--train-metrics") + 1] = str(path)
    rc, err = h.run_cli(argv, capsys)
    assert rc == 0, err
    path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo\n{"step": 3, "loss": 1.8}\n')
    rc, err = h.run_cli(argv, capsys)
    assert rc == 2 and "line 2" in err and "Traceback" not in err, err


# ----------------------------------------------------------------------------- split: linear time

MODEL_JINJA = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant: ' }}{% endif %}")


def _pairs_records(n_pairs: int, per_record: int) -> list[dict[str, Any]]:
    vocab = ["river", "garden", "window", "yellow", "quickly", "mountain", "question", "answer", "bread", "python"]

    def words(n: int, seed: int) -> str:
        return " ".join(vocab[(i * 7 + seed) % len(vocab)] for i in range(n))

    recs = []
    for r in range(n_pairs // per_record):
        conv: list[dict[str, str]] = []
        for j in range(per_record):
            k = r * per_record + j
            conv += _conv(words(3 + k % 11, k), words(8 + k % 23, k + 1))
        recs.append({"id": f"r{r}", "conversations": conv})
    return recs


def _best_time(fn: Callable[[], Any], reps: int = 2) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def test_split_time_is_linear_in_the_pairs_of_one_record(tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a model's own chat template, split rendered a record once per reply to find the reply
    spans: one record of N pairs cost ~N/20 times as much as N/20 records of 20 pairs (1,200 pairs:
    46 s against 9 s). Now one record of 480 pairs costs at most 2.5x what 24 records of 20 cost,
    and the chunks are the same as the span-finding path gives (forced here by raising the
    threshold), which obey the greedy rule."""
    import copy

    from llama_pipe.config import ChatSettings, SplitSettings
    from llama_pipe.data import split as split_mod
    from llama_pipe.data import split_plan

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = MODEL_JINJA
    chat = ChatSettings(template="model", max_seq_len=256)
    cfg = SplitSettings()
    one = _write_jsonl(tmp_path / "one.jsonl", _pairs_records(480, 480))
    many = _write_jsonl(tmp_path / "many.jsonl", _pairs_records(480, 20))
    mid = _write_jsonl(tmp_path / "mid.jsonl", _pairs_records(160, 80))

    def run(inp: Path, out: Path) -> None:
        split_mod.split_file(inp, out, tok, cfg, chat=chat)

    t_many = _best_time(lambda: run(many, tmp_path / "many.out.jsonl"))
    t_one = _best_time(lambda: run(one, tmp_path / "one.out.jsonl"))
    assert t_one < 2.5 * t_many + 0.2, f"one record of 480 pairs: {t_one:.2f} s; 24 records of 20: {t_many:.2f} s"
    # The chunks: what the span-finding path gives (the old code path, for every record size) ...
    run(mid, tmp_path / "mid.out.jsonl")
    monkeypatch.setattr(split_plan, "FEW_PAIRS", 10**9)
    for inp, out in ((mid, "mid"), (many, "many")):
        run(inp, tmp_path / f"{out}.spans.jsonl")
        assert (tmp_path / f"{out}.out.jsonl").read_bytes() == (tmp_path / f"{out}.spans.jsonl").read_bytes(), out
    # ... and the greedy rule: each chunk fits, and could not take the next pair.
    from llama_pipe.chat_template.builtin import get_template, to_messages

    template = get_template("model", tok)
    chunks = h.read_jsonl(tmp_path / "one.out.jsonl")
    assert len(chunks) > 5

    def n_tokens(conv: list[dict[str, str]]) -> int:
        text, _ = template.render(to_messages({"conversations": conv}))
        return len(tok(text)["input_ids"])

    for a, b in zip(chunks, chunks[1:]):
        assert n_tokens(a["conversations"]) <= 256 < n_tokens(a["conversations"] + b["conversations"][:2])


def test_marker_lists_exactly_what_the_stage_wrote(tmp_path: Path) -> None:
    """The record a directory output carries is deterministic (a re-run writes the same bytes, so
    a killed-and-rerun stage still ends byte-identical) and lists every file but itself."""
    from llama_pipe.core.atomic import MARKER, atomic_dir

    outs = []
    for name in ("a", "b"):
        with atomic_dir(tmp_path / name, stage="test") as tmp:
            (tmp / "x.txt").write_text("x")
            (tmp / "sub").mkdir()
            (tmp / "sub" / "y.txt").write_text("y")
        outs.append((tmp_path / name / MARKER).read_bytes())
    assert outs[0] == outs[1]
    assert json.loads(outs[0]) == {"written_by": "llama-pipe", "stage": "test", "files": ["sub/y.txt", "x.txt"]}
