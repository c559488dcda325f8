"""report --compare: a run's report lists it beside earlier runs (results/<run>/ directories)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_pipe.cli import main
from llama_pipe.stage_writer import StageWriter


def inputs(tmp: Path) -> tuple[Path, list[Path], Path]:
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
    ev.write_text(json.dumps({"base_ppl": 40.5, "tuned_ppl": 12.25, "tokens": 900}))
    return metrics, [stats], ev


def run_dir(root: Path, name: str, val_loss: float, tuned_ppl: float) -> Path:
    """A results/<run>/ directory as the workflow leaves it: train/metrics.jsonl, eval/metrics.json."""
    (root / name / "train").mkdir(parents=True)
    (root / name / "eval").mkdir()
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "val_loss": val_loss}]
    (root / name / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / name / "eval" / "metrics.json").write_text(json.dumps({"base_ppl": 40.0, "tuned_ppl": tuned_ppl}))
    return root / name


def test_report_compares_runs(tmp_path: Path) -> None:
    from matplotlib.image import imread

    metrics, stats, ev = inputs(tmp_path)
    r8 = run_dir(tmp_path / "results", "r8", 2.25, 15.5)
    r4 = run_dir(tmp_path / "results", "r4", 2.75, 18.0)
    out = tmp_path / "report"
    assert main(["report", f"--train-metrics={metrics}", f"--eval={ev}", "-o", str(out), "--name=r16",
                 f"--compare=r8={r8}", f"--compare=r4={r4}", "--stats", *map(str, stats)]) == 0
    md = (out / "report.md").read_text()
    assert "## Runs compared" in md
    assert "| **r16** (this run) | 40 | 5.0000 | 5.9000 | 40.500 | 12.250 |" in md
    assert "| r8 | 2 | 2.5000 | 2.2500 | 40.000 | 15.500 |" in md
    assert "| r4 | 2 | 2.5000 | 2.7500 | 40.000 | 18.000 |" in md
    assert imread(out / "runs.png").shape[1] > 400


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
    assert "| r8 | 2 | 2.5000 | 2.2500 | 40.000 | 15.500 |" in md
    assert md.count("r16") == 1 and "unfinished" not in md and "| data" not in md
