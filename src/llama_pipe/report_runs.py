"""Comparison of runs for ``llama-pipe report --compare NAME=DIR``: one row per run; and the
reader of a trainer's losses (:func:`read_losses`), which the report of one run uses too.

A run directory is the workflow's ``results/<run>/``: ``train/metrics.jsonl`` (the trainer's
losses) and ``eval/metrics.json`` (base and tuned perplexity). The report of a run lists it and
every run given with ``--compare`` in a table of ``report.md`` and in ``runs.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_pipe.errors import InputError
from llama_pipe.records import iter_jsonl, read_json


@dataclass(frozen=True)
class RunSummary:
    """The numbers of one run the comparison shows."""

    name: str
    steps: int
    final_loss: float | None
    final_val_loss: float | None
    base_ppl: float
    tuned_ppl: float


def read_losses(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, val) as (step, loss) lists from a trainer's metrics.jsonl (a last line cut off by a
    kill while it was written is dropped with a warning)."""
    if not path.is_file():
        raise InputError(f"{path}: training metrics not found (written by `llama-pipe train` into its run directory)")
    train, val = [], []
    for row in iter_jsonl(path, torn_last_ok=True):
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            continue
        if isinstance(row.get("loss"), (int, float)) and not row.get("skipped"):
            train.append((row["step"], float(row["loss"])))
        if isinstance(row.get("val_loss"), (int, float)):
            val.append((row["step"], float(row["val_loss"])))
    if not train and not val:
        raise InputError(f"{path}: no rows with 'loss' or 'val_loss'; is this a llama-pipe metrics.jsonl?")
    return train, val


def parse_compare(text: str) -> tuple[str, Path]:
    """``NAME=DIR`` -> (name, directory); a clear error for anything else."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise InputError(f"--compare {text!r}: expected NAME=DIR (a run name and its results/<run> directory)")
    return name, Path(path)


def runs_under(directory: Path, current: str) -> list[str]:
    """``NAME=DIR`` of every finished run directly under ``directory`` (``train/metrics.jsonl`` and
    ``eval/metrics.json`` there), by name, except the run named ``current``.

    ``report --compare-under results`` (the workflow) finds the runs to compare with when the report
    is made, so a later run does not change an earlier run's inputs: re-running a finished run has
    nothing to do, and its report compares with the runs that were finished when it was made."""
    if not directory.is_dir():
        return []
    return [f"{path.name}={path}" for path in sorted(directory.iterdir())
            if path.name != current and (path / "train" / "metrics.jsonl").is_file() and (path / "eval" / "metrics.json").is_file()]


def summarise(name: str, train: list[tuple[int, float]], val: list[tuple[int, float]], ev: dict[str, Any]) -> RunSummary:
    """A run's summary from its losses and eval metrics (as ``report`` reads them)."""
    return RunSummary(
        name=name,
        steps=max((s for s, _ in train), default=0),
        final_loss=train[-1][1] if train else None,
        final_val_loss=val[-1][1] if val else None,
        base_ppl=float(ev["base_ppl"]),
        tuned_ppl=float(ev["tuned_ppl"]),
    )


def read_run(name: str, directory: Path) -> RunSummary:
    """The summary of the run in ``directory`` (``train/metrics.jsonl``, ``eval/metrics.json``)."""
    train, val = read_losses(directory / "train" / "metrics.jsonl")
    ev_path = directory / "eval" / "metrics.json"
    ev = read_json(ev_path, "eval metrics")
    if not isinstance(ev, dict) or not {"base_ppl", "tuned_ppl"} <= ev.keys():
        raise InputError(f"{ev_path}: no base_ppl/tuned_ppl; expected the metrics.json written by `llama-pipe eval`")
    return summarise(name, train, val, ev)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def markdown_table(runs: list[RunSummary], current: str) -> str:
    """The "Runs compared" section of report.md (the current run marked)."""
    lines = ["## Runs compared", "", "| run | steps | last loss | last val loss | base ppl | tuned ppl |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        label = f"**{r.name}** (this run)" if r.name == current else r.name
        lines.append(f"| {label} | {r.steps} | {_num(r.final_loss)} | {_num(r.final_val_loss)} | "
                     f"{r.base_ppl:.3f} | {r.tuned_ppl:.3f} |")
    return "\n".join(lines + ["", "![runs](runs.png)", ""])


def plot_runs(runs: list[RunSummary], current: str, out: Path) -> None:
    """Tuned perplexity and last validation loss per run, side by side."""
    import matplotlib.pyplot as plt

    names = [r.name for r in runs]
    colors = ["#2563eb" if r.name == current else "#9ca3af" for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(6, 1.2 * len(runs) + 3), 4), dpi=110)
    left.bar(names, [r.tuned_ppl for r in runs], color=colors)
    left.set_title("tuned perplexity (held-out)")
    right.bar(names, [r.final_val_loss if r.final_val_loss is not None else 0.0 for r in runs], color=colors)
    right.set_title("last validation loss")
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
