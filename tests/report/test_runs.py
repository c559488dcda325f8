"""report --compare: a run's report lists it beside earlier runs (results/<run>/ directories)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_pipe.cli import main
from llama_pipe.core.stage_writer import StageWriter


def _ev(tuned_ppl: float, retention: float | None, general: tuple[int, int] = (20, 30), base_ppl: float = 40.0,
        questions: str = "(bundled held-out set)") -> dict:
    """Eval metrics: perplexity on the run's own val set, retention on the bundled set, held-out questions."""
    ev: dict = {"base_ppl": base_ppl, "tuned_ppl": tuned_ppl, "tokens": 900, "questions_file": questions,
                "scores": {"general": {"base": {"correct": 25, "scored": 30, "rate": 25 / 30},
                                       "tuned": {"correct": general[0], "scored": general[1], "rate": general[0] / general[1]}}}}
    if retention is not None:
        ev["retention"] = {"llama_pipe": {"overall": {"n": 329, "base": 68.0, "tuned": retention, "diff": retention - 68.0,
                                                      "ci95": [retention - 70.0, retention - 66.0], "holds": retention >= 67.0}}}
    return ev


def inputs(tmp: Path, retention: float | None = 67.5) -> tuple[Path, list[Path], Path]:
    """This run's metrics.jsonl (last loss 5.0, last val loss 5.9), one stage's stats, eval metrics."""
    metrics = tmp / "metrics.jsonl"
    rows = [{"step": s, "loss": 7.0 - 0.05 * s} for s in range(1, 41)] + [{"step": 40, "val_loss": 5.9}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = tmp / "merged.stats.json"
    with StageWriter("merge", stats.with_suffix(".jsonl"), stats=stats) as w:
        w.count_in()
        w.keep({"id": "1"})
    ev = tmp / "eval" / "metrics.json"
    ev.parent.mkdir()
    ev.write_text(json.dumps(_ev(12.25, retention, (24, 30), base_ppl=40.5)))
    return metrics, [stats], ev


def run_dir(root: Path, name: str, val_loss: float, tuned_ppl: float, retention: float | None = 60.0,
            general: tuple[int, int] = (10, 30)) -> Path:
    """A results/<run>/ directory as the workflow leaves it: train/metrics.jsonl, eval/metrics.json."""
    (root / name / "train").mkdir(parents=True)
    (root / name / "eval").mkdir()
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "val_loss": val_loss}]
    (root / name / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / name / "eval" / "metrics.json").write_text(json.dumps(_ev(tuned_ppl, retention, general)))
    return root / name


def test_report_compares_runs_on_shared_sets_not_on_their_own_perplexities(tmp_path: Path) -> None:
    """Issue 28: a run whose perplexity on its own (easier) validation set is lowest but whose
    answers are worse ranks below the others; the table names the sets it ranks on."""
    from matplotlib.image import imread

    metrics, stats, ev = inputs(tmp_path)  # r16: retention 67.5, 24/30 general, ppl 12.25
    mydata = run_dir(tmp_path / "results", "mydata", 2.25, 1.86, retention=55.0, general=(8, 30))
    r4 = run_dir(tmp_path / "results", "r4", 2.75, 18.0, retention=66.0, general=(22, 30))
    out = tmp_path / "report"
    assert main(["report", f"--train-metrics={metrics}", f"--eval={ev}", "-o", str(out), "--name=r16",
                 f"--compare=mydata={mydata}", f"--compare=r4={r4}", "--stats", *map(str, stats)]) == 0
    md = (out / "report.md").read_text()
    section = md[md.index("## Runs compared"):]
    assert "retention sets (llama_pipe)" in section and "held-out questions (general)" in section
    assert "not comparable" in section
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith(("| run", "| ---"))]
    assert [r.split("|")[1].strip() for r in rows] == ["**r16** (this run)", "r4", "mydata"]
    assert rows[0].startswith("| **r16** (this run) | 67.5 (-0.5) | 24/30 | 40 | 12.250 |")
    assert rows[2].startswith("| mydata | 55.0 (-13.0) | 8/30 | 2 | 1.860 |")
    assert imread(out / "runs.png").shape[1] > 400


def test_runs_without_a_shared_set_are_not_ranked_on_perplexity(tmp_path: Path) -> None:
    """An older run without retention scores leaves no shared retention set: the table says so."""
    metrics, stats, ev = inputs(tmp_path)
    old = run_dir(tmp_path / "results", "old", 2.0, 1.5, retention=None)
    out = tmp_path / "report"
    assert main(["report", f"--train-metrics={metrics}", f"--eval={ev}", "-o", str(out), "--name=r16",
                 f"--compare=old={old}", "--stats", *map(str, stats)]) == 0
    section = (out / "report.md").read_text().split("## Runs compared")[1]
    assert "retention sets (none shared)" in section


def test_report_without_compare_has_no_runs_section(tmp_path: Path) -> None:
    metrics, stats, ev = inputs(tmp_path)
    out = tmp_path / "report"
    assert main(["report", f"--train-metrics={metrics}", f"--eval={ev}", "-o", str(out), "--stats", *map(str, stats)]) == 0
    assert "Runs compared" not in (out / "report.md").read_text()
    assert not (out / "runs.png").exists()


@pytest.mark.parametrize("bad", ["r8", "=x", "r8="])
def test_compare_needs_name_and_directory(tmp_path: Path, bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    metrics, stats, ev = inputs(tmp_path)
    rc = main(["report", f"--train-metrics={metrics}", f"--eval={ev}", "-o", str(tmp_path / "out"),
               f"--compare={bad}", "--stats", *map(str, stats)])
    assert rc == 2
    assert "expected NAME=DIR" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_compare_under_finds_the_finished_runs_but_this_one(tmp_path: Path) -> None:
    """--compare-under results (the workflow's): the runs are found when the report is made, so a
    later run is no input of an earlier run's report (re-running that run has nothing to do)."""
    metrics, stats, ev = inputs(tmp_path)
    results = tmp_path / "results"
    run_dir(results, "r8", 2.25, 15.5)
    run_dir(results, "r16", 2.0, 11.0)  # this run's own directory is not compared with itself
    (results / "unfinished" / "train").mkdir(parents=True)  # no eval yet
    (results / "data").mkdir()
    out = tmp_path / "report"
    assert main(["report", f"--train-metrics={metrics}", f"--eval={ev}", "-o", str(out), "--name=r16",
                 f"--compare-under={results}", "--stats", *map(str, stats)]) == 0
    md = (out / "report.md").read_text()
    assert "| r8 | 60.0 (-8.0) | 10/30 | 2 | 15.500 |" in md
    assert md.count("r16") == 1 and "unfinished" not in md and "| data" not in md
