"""Comparison of runs for ``llama-pipe report --compare NAME=DIR``: one row per run; and the
reader of a trainer's losses (:func:`read_losses`), which the report of one run uses too.

A run directory is the workflow's ``results/<run>/``: ``train/metrics.jsonl`` (the trainer's
losses) and ``eval/metrics.json`` (base and tuned perplexity). The report of a run lists it and
every run given with ``--compare`` in a table of ``report.md`` and in ``runs.png``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_pipe.core.errors import InputError
from llama_pipe.core.records import iter_jsonl, read_json


@dataclass(frozen=True)
class RunSummary:
    """The numbers of one run the comparison shows."""

    name: str
    steps: int
    final_loss: float | None
    final_val_loss: float | None
    base_ppl: float
    tuned_ppl: float
    #: retention set -> (tuned accuracy, difference to its base) in points (sets scored by eval).
    retention: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: held-out question category -> (correct, scored) of the tuned model.
    questions: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: the file the held-out questions came from (runs compare on questions only when it is the same).
    questions_file: str | None = None


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
    retention = {k: (float(v["overall"]["tuned"]), float(v["overall"]["diff"])) for k, v in (ev.get("retention") or {}).items()}
    questions = {c: (int(m["tuned"]["correct"]), int(m["tuned"]["scored"])) for c, m in (ev.get("scores") or {}).items() if "tuned" in m}
    return RunSummary(
        name=name,
        steps=max((s for s, _ in train), default=0),
        final_loss=train[-1][1] if train else None,
        final_val_loss=val[-1][1] if val else None,
        base_ppl=float(ev["base_ppl"]),
        tuned_ppl=float(ev["tuned_ppl"]),
        retention=retention,
        questions=questions,
        questions_file=ev.get("questions_file"),
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


def shared_sets(runs: list[RunSummary]) -> tuple[list[str], list[str]]:
    """The retention sets every run was scored on, and the held-out question categories every run
    answered from the same questions file: the only numbers runs are compared on."""
    sets = sorted(set.intersection(*(set(r.retention) for r in runs))) if runs else []
    same_questions = len({r.questions_file for r in runs}) == 1
    cats = sorted(set.intersection(*(set(r.questions) for r in runs))) if runs and same_questions else []
    return sets, cats


def ranked(runs: list[RunSummary]) -> list[RunSummary]:
    """Runs ordered by what they share: mean tuned retention over the shared sets, then the share of
    shared held-out questions answered right. Never by perplexity: each run's validation set is its own."""
    sets, cats = shared_sets(runs)

    def key(r: RunSummary) -> tuple[float, float]:
        ret = sum(r.retention[s][0] for s in sets) / len(sets) if sets else 0.0
        right = sum(r.questions[c][0] for c in cats) / max(sum(r.questions[c][1] for c in cats), 1)
        return (-ret, -right)

    return sorted(runs, key=key)


def markdown_table(runs: list[RunSummary], current: str) -> str:
    """The "Runs compared" section of report.md (the current run marked), ranked on shared sets."""
    sets, cats = shared_sets(runs)
    head = ["run", *(f"retention {s} (vs its base)" for s in sets), *(f"{c} questions" for c in cats), "steps",
            "tuned ppl on its own val set"]
    lines = ["## Runs compared", "",
             "Ranked on what every run was measured on: the retention sets "
             f"({', '.join(sets) or 'none shared'}) and the held-out questions ({', '.join(cats) or 'none shared'}). "
             "Perplexities are on each run's own validation set and are not comparable across runs with other data.", "",
             "| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for r in ranked(runs):
        label = f"**{r.name}** (this run)" if r.name == current else r.name
        cells = [f"{r.retention[s][0]:.1f} ({r.retention[s][1]:+.1f})" for s in sets]
        cells += [f"{r.questions[c][0]}/{r.questions[c][1]}" for c in cats]
        lines.append(f"| {label} | " + " | ".join([*cells, str(r.steps), f"{r.tuned_ppl:.3f}"]) + " |")
    return "\n".join(lines + ["", "![runs](runs.png)", ""])


def plot_runs(runs: list[RunSummary], current: str, out: Path) -> None:
    """Per run, on the shared sets: tuned retention accuracy per set, and held-out questions right."""
    import matplotlib.pyplot as plt

    runs = ranked(runs)
    sets, cats = shared_sets(runs)
    names = [r.name for r in runs]
    colors = ["#2563eb" if r.name == current else "#9ca3af" for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(6, 1.2 * len(runs) + 3), 4), dpi=110)
    width = 0.8 / max(len(sets), 1)
    for k, name in enumerate(sets):
        left.bar([i + k * width for i in range(len(runs))], [r.retention[name][0] for r in runs], width, label=name,
                 color=colors, alpha=1.0 - 0.35 * k)
    left.set_xticks([i + width * (len(sets) - 1) / 2 for i in range(len(runs))], names)
    left.set_title("retention accuracy (shared sets)" if sets else "no shared retention set")
    right.bar(names, [sum(r.questions[c][0] for c in cats) / max(sum(r.questions[c][1] for c in cats), 1) for r in runs],
              color=colors)
    right.set_title("held-out questions right (shared)" if cats else "no shared held-out questions")
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
