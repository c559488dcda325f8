"""The report's retention section: what the tuned model kept of its base (eval's ``retention``,
``style`` and ``heldout_text``), and the checkpoint trade-off of the ``select`` stage.

* :func:`markdown` - tables: per retention set and category, base and tuned accuracy, the
  difference with its paired 95% interval and whether it stays within the bound; the style of each
  model's answers; the perplexity of both on the base's own answers; which checkpoint was kept and why;
* :func:`plot_tradeoff` - ``checkpoints.png``: every evaluation checkpoint's validation loss (the
  training goal) against its retention difference to the base, the bound drawn, the kept one marked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _ci(cell: dict[str, Any]) -> str:
    lo, hi = cell["ci95"]
    return f"{cell['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def retention_lines(ev: dict[str, Any]) -> list[str]:
    """Per set: overall and per category, base vs tuned accuracy and the paired difference."""
    retention = ev.get("retention") or {}
    if not retention:
        return []
    bound = next(iter(retention.values())).get("bound", 2.0)
    lines = ["## What the base knew: retention", "",
             "Multiple-choice items training never saw, scored by log-likelihood (no sampling), each model through its own "
             f"chat template. Difference in points, tuned - base, with its paired 95% interval; kept = the difference and the "
             f"interval's lower end are above -{bound:g}.", "",
             "| set | category | items | base | tuned | difference [95% CI] | kept |", "| --- | --- | ---: | ---: | ---: | --- | --- |"]
    for name, r in retention.items():
        for cat, cell in [("**overall**", r["overall"]), *sorted(r.get("categories", {}).items())]:
            lines.append(f"| {name} | {cat} | {cell['n']} | {cell['base']:.1f} | {cell['tuned']:.1f} | {_ci(cell)} | "
                         f"{'yes' if cell['holds'] else '**no**'} |")
    return lines + ["", "![retention](retention.png)", ""]


def style_lines(ev: dict[str, Any]) -> list[str]:
    """Style collapse and the held-out text perplexity, base vs tuned."""
    st, ht = ev.get("style") or {}, ev.get("heldout_text") or {}
    if not st:
        return []
    lines = ["## Style and held-out text", "",
             "Answers to the non-identity held-out questions: the most common three-word opening and its share (collapse "
             "shows as one opening on most answers), and distinct-2 (unique word pairs / all word pairs).", "",
             "| | base | tuned |", "| --- | --- | --- |"]
    b, t = st.get("base", {}), st.get("tuned", {})
    lines.append(f"| most common opening | \"{b.get('top_opening', '')}\" ({b.get('top_opening_share', 0):.0%}) | "
                 f"\"{t.get('top_opening', '')}\" ({t.get('top_opening_share', 0):.0%}) |")
    lines.append(f"| distinct-2 | {b.get('distinct_2', 0):.2f} | {t.get('distinct_2', 0):.2f} |")
    if ht.get("base_ppl") is not None:
        lines.append(f"| perplexity on {ht.get('what', 'held-out text')} ({ht.get('pairs')} answers) | "
                     f"{ht['base_ppl']:.3f} | {ht['tuned_ppl']:.3f} |")
    return lines + [""]


def selection_lines(selection: dict[str, Any] | None) -> list[str]:
    """Which checkpoint the run kept, every candidate, and why."""
    if not selection:
        return []
    lines = ["## Checkpoint kept", "",
             f"Kept step {selection['kept_step']} of {selection['last_step']}: {selection['reason']}.", "",
             *_scale_lines(selection),
             "| step | validation loss | retention (tuned vs base) | difference [95% CI] | within bound |",
             "| ---: | ---: | --- | --- | --- |"]
    for c in selection.get("candidates", []):
        r = c.get("retention")
        loss = f"{c['val_loss']:.4f}" if c.get("val_loss") is not None else "-"
        mark = " (kept)" if c["step"] == selection["kept_step"] else ""
        if r is None:
            lines.append(f"| {c['step']}{mark} | {loss} | not scored | - | - |")
        else:
            within = r.get("within", r.get("holds"))  # "holds": selection.json before select.scale
            lines.append(f"| {c['step']}{mark} | {loss} | {r['tuned']:.1f} vs {r['base']:.1f} | {_ci(r)} | {'yes' if within else 'no'} |")
    if any(c.get("retention") for c in selection.get("candidates", [])):
        lines += ["", "![checkpoints](checkpoints.png)"]
    return lines + [""]


def _scale_lines(selection: dict[str, Any]) -> list[str]:
    """The weight the kept adapter entered the product at (select.scale), when not 1 or not applied."""
    scale, why = selection.get("scale", 1.0), selection.get("scale_not_applied")
    if scale != 1:
        lines = [f"The product is base + {scale:g} x the kept step's update (`select.scale`: weight-space interpolation "
                 "between base and tuned, which keeps more of what the base knew; docs/evaluation.md)."]
        tried = selection.get("weights") or []
        if len(tried) > 1:
            lines[0] += (" Retention on the dev items at each weight tried: "
                         + ", ".join(f"{w['weight']:g}: {w['diff']:+.1f}{'' if w['within'] else ' (out of bound)'}" for w in tried)
                         + f"; the highest within {selection.get('bound', 2.0):g} points is kept"
                         + ("." if any(w["within"] for w in tried) else ", and none was: the lowest (`select.min_scale`) is kept."))
        return [*lines, ""]
    if why and selection.get("scale_asked", 1.0) != 1:
        return [f"`select.scale` {selection['scale_asked']:g} was not applied: {why}.", ""]
    return []


def markdown(ev: dict[str, Any], selection: dict[str, Any] | None) -> list[str]:
    return retention_lines(ev) + style_lines(ev) + selection_lines(selection)


def plot_retention(ev: dict[str, Any], out: Path) -> None:
    """Per set and category: the tuned - base difference with its 95% interval, the bound drawn."""
    import matplotlib.pyplot as plt

    rows = [(f"{name}: {cat}", cell) for name, r in (ev.get("retention") or {}).items()
            for cat, cell in [("overall", r["overall"]), *sorted(r.get("categories", {}).items())]]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.5), dpi=110)
    for y, (_, cell) in enumerate(rows):
        lo, hi = cell["ci95"]
        color = "#16a34a" if cell["holds"] else "#dc2626"
        ax.plot([lo, hi], [y, y], color=color, lw=2)
        ax.plot([cell["diff"]], [y], "o", color=color)
    sets: dict[str, Any] = ev.get("retention") or {}
    bound = float(next(iter(sets.values())).get("bound", 2.0)) if sets else 2.0
    ax.axvline(0, color="#6b7280", lw=1)
    ax.axvline(-bound, color="#dc2626", lw=1, ls="--")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("tuned - base accuracy (points), paired 95% interval")
    ax.set_title("Retention of the base's knowledge")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_tradeoff(selection: dict[str, Any], out: Path) -> None:
    """checkpoints.png: validation loss against retention difference, one point per checkpoint."""
    import matplotlib.pyplot as plt

    pts = [(c["retention"]["diff"], c["val_loss"], c["step"]) for c in selection.get("candidates", [])
           if c.get("retention") and c.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color="#9ca3af")
    for x, y, step in pts:
        kept = step == selection["kept_step"]
        ax.plot([x], [y], "o", color="#2563eb" if kept else "#9ca3af", ms=10 if kept else 6)
        ax.annotate(f"step {step}{' (kept)' if kept else ''}", (x, y), textcoords="offset points", xytext=(5, 5))
    ax.axvline(-selection.get("bound", 2.0), color="#dc2626", lw=1, ls="--", label="retention bound")
    ax.set_xlabel("retention: tuned - base accuracy (points)")
    ax.set_ylabel("validation loss (the training goal)")
    ax.set_title("Checkpoints: goal against retention")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
