"""``llama-pipe report``: the run at a glance - PNG plots plus ``report.md`` / ``report.html``.

* ``loss.png`` - training loss per step and validation loss (``metrics.jsonl`` rows with ``loss``
  and rows with ``val_loss``),
* ``funnel.png`` - per data stage: conversations (or pairs, for ``split``) in, kept, and
  rejected by reason, summed over the shards of each stage (``*.stats.json``),
* ``perplexity.png`` - base vs tuned perplexity on the held-out split (``metrics.json`` of eval),
* ``retention.png`` - what the tuned model kept of its base's knowledge, per set and category, and
  ``checkpoints.png`` - every evaluation checkpoint's goal against its retention, the kept one
  marked (``selection.json`` of ``select``; :mod:`llama_pipe.report.retention`).

``report.md`` holds the same numbers as tables, the rates of correct answers per question
category (e.g. the identity and general held-out questions) for base and tuned, and - when
``answers.jsonl`` lies beside the eval metrics - every question's base and tuned answers side by
side; ``report.html`` is the same page with the plots embedded, so it
can be mailed as one file. The output directory is written atomically.
"""

from __future__ import annotations

import argparse
import base64
import html
import re
from collections import Counter
from pathlib import Path
from typing import Any

from llama_pipe.core.atomic import atomic_dir, check_output_dir
from llama_pipe.core.errors import InputError
from llama_pipe.core.records import iter_jsonl, read_json
from llama_pipe.report import retention as report_retention
from llama_pipe.report.runs import markdown_table, parse_compare, plot_runs, read_losses, read_run, runs_under, summarise
from llama_pipe.stages import DATA_STAGES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train-metrics", required=True, metavar="JSONL", help="metrics.jsonl of the train run")
    parser.add_argument("--stats", nargs="+", required=True, metavar="JSON", help="*.stats.json files of the data stages (all shards)")
    parser.add_argument("--eval", required=True, metavar="JSON", help="metrics.json written by `llama-pipe eval`")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="report directory (PNGs, report.md, report.html)")
    parser.add_argument("--selection", default=None, metavar="JSON",
                        help="selection.json written by `llama-pipe select` (the checkpoint trade-off); optional")
    parser.add_argument("--name", default=None, help="this run's name in the runs comparison (default: the run directory's name)")
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=DIR",
                        help="an earlier run to compare with (results/<run>/ holding train/ and eval/); repeatable; "
                             "adds runs.png and a table to report.md")
    parser.add_argument("--compare-under", default=None, metavar="DIR",
                        help="also compare with every finished run under DIR (DIR/<run>/ holding train/metrics.jsonl and "
                             "eval/metrics.json), except this one; the workflow passes results")


# ----------------------------------------------------------------------------- inputs


def funnel(stats_paths: list[Path]) -> list[dict[str, Any]]:
    """One entry per stage (pipeline order: :data:`llama_pipe.stages.DATA_STAGES`), shards summed:
    stage, unit, in, out, rejected, files."""
    stages: dict[str, dict[str, Any]] = {}
    for p in stats_paths:
        s = read_json(p, "stats file")
        if not isinstance(s, dict) or not {"stage", "in", "out"} <= s.keys():
            raise InputError(f"{p}: not a stage stats file (needs 'stage', 'in', 'out')")
        e = stages.setdefault(s["stage"], {"stage": s["stage"], "unit": s.get("unit", "records"), "in": 0, "out": 0,
                                           "rejected": Counter(), "files": 0})
        e["in"] += int(s["in"])
        e["out"] += int(s["out"])
        e["rejected"].update({k: int(v) for k, v in (s.get("rejected") or {}).items()})
        e["files"] += 1
    rank = {st.rule: i for i, st in enumerate(DATA_STAGES)}
    return sorted(stages.values(), key=lambda e: rank.get(e["stage"], len(rank)))


# ----------------------------------------------------------------------------- plots


def plot_loss(train: list[tuple[int, float]], val: list[tuple[int, float]], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="#2563eb", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="#dc2626", markersize=4)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("cross-entropy (nats / target token)")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_funnel(stages: list[dict[str, Any]], out: Path) -> None:
    """One bar per stage, as a share of what entered it: kept, then each rejection reason."""
    import matplotlib.pyplot as plt

    reasons = sorted({r for s in stages for r in s["rejected"]})
    palette = [c for i, c in enumerate(plt.get_cmap("tab20").colors) if i not in (4, 5)]  # type: ignore[attr-defined]
    colors = {r: palette[i % len(palette)] for i, r in enumerate(reasons)}
    kept_color = "#15803d"
    fig, ax = plt.subplots(figsize=(9, 0.7 * len(stages) + 1.5 + 0.2 * (len(reasons) + 1) / 3), dpi=110)
    for y, s in enumerate(stages[::-1]):
        total = max(s["in"], 1)
        ax.barh(y, 100 * s["out"] / total, color=kept_color)
        ax.text(1, y, f"{s['out']} kept", va="center", color="white", fontsize=8)
        left = 100 * s["out"] / total
        for r in reasons:
            n = s["rejected"].get(r, 0)
            if n:
                ax.barh(y, 100 * n / total, left=left, color=colors[r])
                left += 100 * n / total
    handles = [plt.Rectangle((0, 0), 1, 1, color=kept_color)] + [plt.Rectangle((0, 0), 1, 1, color=colors[r]) for r in reasons]
    ax.legend(handles, ["kept"] + [f"rejected: {r}" for r in reasons], fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    ax.set_yticks(range(len(stages)), [f"{s['stage']} ({s['unit']})\n{s['in']} in, {s['in'] - s['out']} dropped" for s in stages][::-1],
                  fontsize=9)
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of the stage's input (shards summed)")
    ax.set_title("Data funnel: what each stage kept and why it dropped the rest")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_perplexity(ev: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    vals = [float(ev["base_ppl"]), float(ev["tuned_ppl"])]
    fig, ax = plt.subplots(figsize=(5, 4), dpi=110)
    bars = ax.bar(["base", "tuned"], vals, color=["#9ca3af", "#2563eb"])
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}", ha="center", va="bottom")
    ax.set_ylabel("perplexity (assistant tokens)")
    ax.set_title(f"Held-out perplexity ({ev.get('tokens', '?')} tokens): x{vals[1] / vals[0]:.3f}")
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


# ----------------------------------------------------------------------------- text


def _cell(text: str, limit: int = 240) -> str:
    """One Markdown table cell: whitespace collapsed, pipes escaped, long text cut."""
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|") or "(empty)"


def score_lines(ev: dict[str, Any]) -> list[str]:
    """Result-table rows: per scored question category, base and tuned correct / scored (rate)."""
    lines = []
    for category, cell in sorted((ev.get("scores") or {}).items()):
        shown = [f"{c['correct']}/{c['scored']} ({100 * c['rate']:.0f} %)" if (c := cell.get(m)) else "-" for m in ("base", "tuned")]
        lines.append(f"| {category}: correct answers | {shown[0]} | {shown[1]} |")
    return lines


def side_by_side(answers: list[dict[str, Any]]) -> list[str]:
    """A table of every question both models answered: expected, base answer, tuned answer."""
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for a in answers:
        by_model.setdefault(str(a.get("model_id")), {})[str(a.get("question_id"))] = a
    base, tuned = by_model.get("base", {}), by_model.get("tuned", {})
    ids = [q for q in tuned if q in base]
    if not ids:
        return []

    def shown(a: dict[str, Any]) -> str:
        mark = {True: "✓ ", False: "✗ "}.get(a.get("correct"), "")  # type: ignore[arg-type]
        return mark + _cell(" → ".join(a["choices"][0]["turns"]))

    lines = ["## Held-out questions: base vs tuned", "",
             "Greedy answers of both models (✓ / ✗: the answer names an expected string, case-insensitive).", "",
             "| question | expected | base | tuned |", "| --- | --- | --- | --- |"]
    for qid in ids:
        t = tuned[qid]
        expected = ", ".join(t.get("expected") or []) or "-"
        lines.append(f"| {_cell(' → '.join(t['turns']))} | {_cell(expected)} | {shown(base[qid])} | {shown(t)} |")
    return lines + [""]


def markdown(train: list, val: list, stages: list[dict[str, Any]], ev: dict[str, Any], answers: list[dict[str, Any]],
             selection: dict[str, Any] | None = None) -> str:
    lines = ["# llama-pipe report", "", "## Result", ""]
    lines += ["| | base | tuned |", "| --- | ---: | ---: |",
              f"| perplexity | {ev['base_ppl']:.3f} | {ev['tuned_ppl']:.3f} |",
              f"| NLL / token | {ev.get('base_nll', float('nan')):.4f} | {ev.get('tuned_nll', float('nan')):.4f} |",
              *score_lines(ev), ""]
    lines.append(f"Scored on {ev.get('tokens', '?')} assistant tokens of {ev.get('records_scored', '?')} held-out records "
                 f"(template {ev.get('template', '?')}).")
    if train:
        lines.append(f"Training: {len(train)} steps, first loss {train[0][1]:.4f}, last loss {train[-1][1]:.4f}.")
    if val:
        lines.append(f"Validation loss: {val[0][1]:.4f} at step {val[0][0]} -> {val[-1][1]:.4f} at step {val[-1][0]}.")
    lines += ["", "![loss](loss.png)", "", "![perplexity](perplexity.png)", ""]
    lines += report_retention.markdown(ev, selection)
    lines += side_by_side(answers)
    lines += ["## Data funnel", "",
              "| stage | unit | files | in | kept | rejected (by reason) |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for s in stages:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(s["rejected"].items())) or "-"
        lines.append(f"| {s['stage']} | {s['unit']} | {s['files']} | {s['in']} | {s['out']} | {why} |")
    lines += ["", "![funnel](funnel.png)", ""]
    return "\n".join(lines) + "\n"


def to_html(md: str, out_dir: Path) -> str:
    """A small self-contained HTML rendering of ``md`` (tables, images inlined, paragraphs)."""
    body: list[str] = []
    rows: list[str] = []
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
            if not all(set(c) <= set("-: ") for c in cells):
                tag = "th" if not rows else "td"
                rows.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if rows:
            body.append("<table>" + "".join(rows) + "</table>")
            rows = []
        if line.startswith("!["):
            name = line[line.index("(") + 1 : -1]
            data = base64.b64encode((out_dir / name).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.strip():
            text = html.escape(line)
            while "**" in text:
                text = text.replace("**", "<b>", 1).replace("**", "</b>", 1)
            body.append(f"<p>{text}</p>")
    if rows:
        body.append("<table>" + "".join(rows) + "</table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#1d2939}"
             "table{border-collapse:collapse}td,th{border:1px solid #d0d5dd;padding:4px 8px}img{max-width:100%}")
    head = f"<meta charset='utf-8'><title>llama-pipe report</title><style>{style}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(body)}</body></html>\n"


def compare_runs(args: argparse.Namespace, train: list, val: list, ev: dict[str, Any], out_dir: Path) -> str:
    """runs.png and the report.md section comparing this run with ``--compare`` runs."""
    name = args.name or Path(args.train_metrics).parent.parent.name
    runs = [summarise(name, train, val, ev)] + [read_run(*parse_compare(c)) for c in args.compare]
    plot_runs(runs, name, out_dir / "runs.png")
    return "\n" + markdown_table(runs, name)


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    out = Path(args.output)
    ev_path = Path(args.eval)
    if args.compare_under:
        current = args.name or Path(args.train_metrics).parent.parent.name
        args.compare = [*args.compare, *runs_under(Path(args.compare_under), current)]
    # Everything the report reads; -o may hold none of it (`-o results/<run>` would delete the run).
    inputs = [Path(args.train_metrics), *map(Path, args.stats), ev_path, ev_path.with_name("answers.jsonl"),
              *(parse_compare(c)[1] for c in args.compare), *([Path(args.selection)] if args.selection else [])]
    check_output_dir(out, inputs, "report")
    train, val = read_losses(Path(args.train_metrics))
    stages = funnel([Path(p) for p in args.stats])
    ev = read_json(ev_path, "eval metrics")
    if not isinstance(ev, dict) or not {"base_ppl", "tuned_ppl"} <= ev.keys():
        raise InputError(f"{ev_path}: no base_ppl/tuned_ppl; expected the metrics.json written by `llama-pipe eval`")
    answers_path = ev_path.with_name("answers.jsonl")
    answers = list(iter_jsonl(answers_path)) if answers_path.is_file() else []
    selection = read_json(Path(args.selection), "selection") if args.selection else None
    if selection is not None and not (isinstance(selection, dict) and "kept_step" in selection):
        raise InputError(f"{args.selection}: no kept_step; expected the selection.json written by `llama-pipe select`")
    with atomic_dir(out, stage="report", inputs=inputs) as tmp:
        plot_loss(train, val, tmp / "loss.png")
        plot_funnel(stages, tmp / "funnel.png")
        plot_perplexity(ev, tmp / "perplexity.png")
        if ev.get("retention"):
            report_retention.plot_retention(ev, tmp / "retention.png")
        if selection and any(c.get("retention") for c in selection.get("candidates", [])):
            report_retention.plot_tradeoff(selection, tmp / "checkpoints.png")
        md = markdown(train, val, stages, ev, answers, selection)
        if args.compare:
            md += compare_runs(args, train, val, ev, tmp)
        (tmp / "report.md").write_text(md, encoding="utf-8")
        (tmp / "report.html").write_text(to_html(md, tmp), encoding="utf-8")
    print(f"report: loss ({len(train)} train / {len(val)} val points), funnel ({len(stages)} stages), "
          f"perplexity {ev['base_ppl']:.3f} -> {ev['tuned_ppl']:.3f} -> {out}")
    return 0
