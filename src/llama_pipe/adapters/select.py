"""``llama-pipe select``: which of a run's evaluation checkpoints becomes its product.

Training keeps the adapter of every evaluation step (``<run>/snapshots/step-N``; the last step's is
the run directory's own) and, with ``select.retention``, scores general knowledge before the first
step (the base) and at every evaluation step (``retention.jsonl``, see
:mod:`llama_pipe.train.retention_probe`). This stage reads those scores and the validation losses
(``metrics.jsonl``) and keeps:

* among the checkpoints whose retention stays within ``select.bound`` points of the base's (the
  accuracy difference on the dev split, :func:`llama_pipe.evaluation.retention.compare`), the one with the
  lowest validation loss (the training goal, on held-out data of the run's own kind). The paired
  95% interval is recorded beside it but does not decide: on a dev split of ~100 items it spans
  about +-4 points even for a checkpoint that changed a handful of answers, so requiring it would
  reject every checkpoint alike. Whether retention holds with confidence is judged by eval, on the
  test split and a public benchmark, which select never reads;
* when none stays within the bound, the one that loses least, with a warning in the log and in
  ``selection.json`` (``within_bound: false``);
* without retention scores (``select.retention: false``, several training processes, a run from an
  older version), the last step.

The kept adapter then enters the product at weight ``select.scale``, or lower: with
``select.min_scale`` below it, training also scored the step at ``scale``, ``min_scale`` and half-way
(:func:`llama_pipe.train.retention_probe.weights_to_try`), and select takes the highest of those
weights whose retention stays within the bound, else the lowest (:func:`weight_for`). Below 1 every LoRA ``B``
matrix is multiplied by the weight, so the merged model is base + scale x (tuned - base), a point on the
straight line between the two (WiSE-FT's weight-space interpolation, here for the low-rank update).
Fine-tuning moves far more answers than it means to (on the default run ~13 % of ARC-Easy's
answers change, in both directions); half-way along the line most of the new skill survives and
most of the unintended changes do not (docs/evaluation.md has the measured trade-off). DoRA and
full runs, and adapters with ``modules_to_save``, are not linear in a single matrix and keep 1.

No model is loaded: the stage reads JSON and copies (hard-links where it can) the chosen adapter
with the run's tokenizer and ``train_config.json`` (what merge-adapter, chat and serve read, the
lineage included) into ``OUT`` -- the adapter's tensors rewritten when scaled -- plus
``selection.json``: every candidate's step, validation loss and retention (base, tuned,
difference, interval, within bound), the choice and why, and the scale applied.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from llama_pipe.config import SelectSettings, settings_from_args
from llama_pipe.core.atomic import atomic_dir, write_json_atomic
from llama_pipe.core.errors import InputError
from llama_pipe.core.settings import add_settings_arguments
from llama_pipe.evaluation.retention import compare
from llama_pipe.report.runs import read_losses
from llama_pipe.train.retention_probe import FILE as PROBE_FILE
from llama_pipe.train.retention_probe import read_scores, read_weighted

log = logging.getLogger(__name__)

#: What an adapter directory holds (the rest of the run directory -- checkpoints, metrics -- stays behind).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
SELECTION = "selection.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, metavar="RUN_DIR", help="a finished training run (results/<run>/train)")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                        help="the kept adapter with its tokenizer and records, and selection.json (the workflow's results/<run>/select)")
    add_settings_arguments(parser, SelectSettings, "select")


def _steps(run: Path) -> tuple[int, dict[int, Path]]:
    """The run's last step and every evaluation step's adapter directory (the last one: the run's own)."""
    summary = run / "summary.json"
    try:
        last = int(json.loads(summary.read_text(encoding="utf-8"))["steps"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{summary}: cannot read the run's step count ({exc}); is {run} a finished `llama-pipe train` run?") from None
    found = {last: run}
    snaps = run / "snapshots"
    if snaps.is_dir():
        for d in snaps.iterdir():
            name = d.name.removeprefix("step-")
            if d.is_dir() and name.isdigit() and (d / "adapter_model.safetensors").is_file():
                found[int(name)] = d
    return last, found


def candidates(run: Path, settings: SelectSettings) -> tuple[list[dict[str, Any]], str | None]:
    """Every evaluation step with its validation loss and retention (None when not scored), and why
    retention cannot be used (None when it can)."""
    last, dirs = _steps(run)
    _, val = read_losses(run / "metrics.jsonl")
    val_at = dict(val)
    scores = read_scores(run / PROBE_FILE) if (run / PROBE_FILE).is_file() else {}
    why = None
    if not settings.retention:
        why = "select.retention is false"
    elif 0 not in scores:
        why = f"no retention scores before training in {run / PROBE_FILE} (retention off while training, or several processes)"
    rows = []
    for step in sorted(dirs):
        row: dict[str, Any] = {"step": step, "val_loss": val_at.get(step), "adapter": str(dirs[step]), "retention": None}
        if why is None and step in scores:
            cmp = compare(scores[0], scores[step], bound=settings.bound)
            row["retention"] = {k: cmp["overall"][k] for k in ("n", "base", "tuned", "diff", "ci95")}
            row["retention"]["within"] = cmp["overall"]["diff"] >= -settings.bound
            row["retention"]["categories"] = {c: {k: v[k] for k in ("n", "base", "tuned", "diff")} for c, v in cmp["categories"].items()}
        rows.append(row)
    return rows, why


def choose(rows: list[dict[str, Any]], why: str | None) -> tuple[dict[str, Any], str, bool]:
    """The kept row, the reason in words, and whether it is within the bound."""
    last = rows[-1]
    scored = [r for r in rows if r["retention"] is not None]
    if why is not None or not scored:
        return last, f"the last step ({why or 'no step was scored for retention'})", True
    within = [r for r in scored if r["retention"]["within"]]
    if within:
        best = min(within, key=lambda r: (r["val_loss"] if r["val_loss"] is not None else float("inf"), -r["step"]))
        return best, "the lowest validation loss among the checkpoints whose retention stays within the bound", True
    best = max(scored, key=lambda r: (r["retention"]["diff"], r["step"]))
    return best, "no checkpoint kept retention within the bound: the one that lost least", False


def weight_for(run: Path, step: int, settings: SelectSettings) -> tuple[float, list[dict[str, Any]]]:
    """The weight to give step ``step``'s adapter and every weight training scored it at (highest
    first: weight, diff, 95% interval, within). Without such scores: ``select.scale``."""
    path = run / PROBE_FILE
    scored = read_weighted(path) if settings.retention and path.is_file() else {}
    base, at = scored.get(0, {}).get(1.0), scored.get(step, {})
    # weight 1.0 is the step as trained: a candidate only when select.scale is 1 itself
    tried = sorted((w for w in at if w <= settings.scale and (w != 1.0 or settings.scale == 1.0)), reverse=True)
    if base is None or not tried:
        return settings.scale, []
    rows = []
    for w in tried:
        overall = compare(base, at[w], bound=settings.bound)["overall"]
        rows.append({"weight": w, "diff": overall["diff"], "ci95": overall["ci95"], "within": overall["diff"] >= -settings.bound})
    within = [r for r in rows if r["within"]]
    return (within[0] if within else rows[-1])["weight"], rows


def scale_of(adapter_dir: Path, wanted: float) -> tuple[float, str | None]:
    """The scale select can apply to ``adapter_dir`` (``wanted``, or 1 with the reason why not)."""
    if wanted == 1:
        return 1.0, None
    path = adapter_dir / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the adapter's config ({exc})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        return 1.0, f"a {cfg.get('peft_type') if isinstance(cfg, dict) else '?'} adapter is not scaled (LoRA only)"
    if cfg.get("use_dora"):
        return 1.0, "a DoRA adapter is not linear in its B matrix: not scaled"
    if cfg.get("modules_to_save"):
        return 1.0, f"modules_to_save {cfg['modules_to_save']} are whole trained copies, not a low-rank update: not scaled"
    return wanted, None


def write_scaled(src: Path, dst: Path, scale: float) -> int:
    """``src`` (an adapter_model.safetensors) written to ``dst`` with every LoRA B matrix and B bias
    times ``scale``; the number of tensors scaled."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors, scaled = {}, 0
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            t = f.get_tensor(key)
            if ".lora_B." in key or ".lora_embedding_B." in key:
                t, scaled = (t.float() * scale).to(t.dtype), scaled + 1
            tensors[key] = t
    if not scaled:
        raise InputError(f"{src}: no LoRA B tensor to scale (keys like '...lora_B.weight' expected)")
    save_file(tensors, str(dst), metadata=meta)
    return scaled


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, SelectSettings, "select")
    run_dir, out = Path(args.run), Path(args.output)
    if not (run_dir / "train_config.json").is_file():
        raise InputError(f"{run_dir}: not a finished training run (no train_config.json); give results/<run>/train")
    rows, why = candidates(run_dir, settings)
    kept, reason, within = choose(rows, why)
    full = not (run_dir / "adapter_config.json").is_file()  # train.method full: a whole model, no snapshots
    src = Path(kept["adapter"])
    scale, not_scaled = (1.0, "a full run has no adapter") if full else scale_of(src, settings.scale)
    weights: list[dict[str, Any]] = []
    if not full and not_scaled is None and why is None:
        chosen, weights = weight_for(run_dir, kept["step"], settings)
        scale, not_scaled = scale_of(src, chosen)
    selection = {"kept_step": kept["step"], "last_step": rows[-1]["step"], "reason": reason, "within_bound": within,
                 "bound": settings.bound, "retention_used": why is None, "candidates": rows, "run": str(run_dir),
                 "scale": scale, "scale_asked": settings.scale, "scale_not_applied": not_scaled, "weights": weights}
    with atomic_dir(out, stage="select", inputs=[run_dir]) as tmp:
        for f in sorted(run_dir.iterdir()):  # tokenizer, train_config.json (the lineage), the weights of a full run
            if f.is_file() and not f.name.startswith(".") and f.suffix != ".jsonl" and f.name != "summary.json" \
                    and (full or f.name not in ADAPTER_FILES):
                _link_or_copy(f, tmp / f.name)
        for name in () if full else ADAPTER_FILES:  # the kept step's adapter
            if name == "adapter_model.safetensors" and scale != 1:
                write_scaled(src / name, tmp / name, scale)
            else:
                _link_or_copy(src / name, tmp / name)
        write_json_atomic(tmp / SELECTION, selection)
    for r in rows:
        ret = r["retention"]
        desc = "not scored" if ret is None else f"{ret['tuned']:.1f} vs base {ret['base']:.1f} ({ret['diff']:+.1f}, 95% CI " \
            f"[{ret['ci95'][0]:+.1f}, {ret['ci95'][1]:+.1f}]){'' if ret['within'] else ' OUT OF BOUND'}"
        loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "?"
        print(f"select: step {r['step']}: val loss {loss}, retention {desc}{'  <- kept' if r is kept else ''}")
    if not within:
        log.warning("select: every checkpoint lost more than %.1f points of retention; kept step %d, which lost least; "
                    "lower train.lr or train.max_steps, or use distill", settings.bound, kept["step"])
    if not_scaled and settings.scale != 1:
        log.warning("select: select.scale %.2f not applied: %s", settings.scale, not_scaled)
    for w in weights:
        print(f"select: step {kept['step']} at weight {w['weight']:g}: retention {w['diff']:+.1f} against the base "
              f"(95% CI [{w['ci95'][0]:+.1f}, {w['ci95'][1]:+.1f}]){'' if w['within'] else ' OUT OF BOUND'}"
              f"{'  <- kept' if w['weight'] == scale else ''}")
    if weights and not any(w["within"] for w in weights):
        log.warning("select: even at weight %g (select.min_scale) the kept step's retention is out of bound", scale)
    weight = f", at weight {scale:g} (base + {scale:g} x the update)" if scale != 1 else ""
    print(f"select: kept step {kept['step']} of {rows[-1]['step']}{weight}: {reason} -> {out}")
    return 0
