"""The memory planner (``train.memory: auto``) on a GPU: predicted vs real peak, and emulated cards.

Two kinds of runs, each in its own process (fresh CUDA state), on a LLaMA-7B-shaped model with
random weights (hidden 4096, 32 layers, vocab 32000; written to /tmp/llama7b when absent):

* ``calibrate MODE``: the trainer's defaults (LoRA r8 all-linear, dropout 0.05, rows of 512,
  4 rows per step) built once with checkpointing, the fast path applied, then several plans
  (micro-batch x layers kept) run for 3 steps each: the real peak
  (``torch.cuda.max_memory_allocated``) next to the planner's prediction;
* ``card MODE GIB``: ``TrainSettings`` of MODE (lora, qlora, int8: config.load.MODE_NAMES) plus only the card (``gpu_memory_gib``), the
  allocator capped with ``torch.cuda.set_per_process_memory_fraction`` at GIB minus the 0.5 GiB
  a CUDA context takes on a real card; the planner's plan is built and run the way
  ``llama-pipe train`` runs it (plan_run, build_model, keep_layers, the fast path, make_optimizer,
  train_step), 2 warm-up + 5 timed steps: fits or not, tok/s, predicted vs real peak.
  GIB 0: the whole card, no cap.

Usage on the GPU machine::

    python bench/memory_plan.py all --out $OUT [--budget-s 540]
    python bench/memory_plan.py card qlora 8          # one JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
CKPT = "/tmp/llama7b"
GIB = 1024**3
WARMUP, TIMED = 2, 5
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# (mode, card GiB (0 = the whole card), extra TrainSettings fields; max_seq_len is chat.max_seq_len, default 512)
CARDS: list[tuple[str, float, dict[str, Any]]] = [
    ("qlora", 8, {}), ("int8", 16, {}), ("qlora", 16, {}), ("lora", 24, {}), ("qlora", 24, {}),
    ("qlora", 0, {"lora": {"r": 64, "alpha": 128, "dropout": 0.0}, "max_seq_len": 1024, "micro_batch_size": 8}),
    ("lora", 0, {"lora": {"r": 16, "alpha": 32, "dropout": 0.0}, "max_seq_len": 1024, "micro_batch_size": 8}),
]
CALIBRATE = [(4, 0), (4, 8), (4, 32), (1, 32), (2, 16)]  # (micro-batch, layers kept)
# unsloth's cases of the same shapes (its default, recomputing checkpointing) in bench/train_throughput.py:
# `--unsloth <its out>/peer/results.jsonl` from the same device call gives the ratio lines of the summary
UNSLOTH_CASE = {("qlora", 64): "unsloth_qlora_nf4_r64all_s1024_b8_ckpt", ("lora", 16): "unsloth_bf16_r16all_s1024_b8_ckpt"}


def make_7b() -> None:
    if Path(CKPT, "config.json").exists():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(CKPT, max_shard_size="4GB")


def settings_for(mode: str, gib: float, extra: dict[str, Any]) -> tuple[Any, int]:
    """The TrainSettings of one case, and its row length (chat.max_seq_len)."""
    from llama_pipe.config import LoraSettings, TrainSettings
    from llama_pipe.config.load import MODE_NAMES

    extra = dict(extra)
    lora = LoraSettings(**extra.pop("lora", {"r": 8, "alpha": 16}))  # r8: the card cases as measured (the default is now r16)
    seq = int(extra.pop("max_seq_len", 512))
    return TrainSettings(**MODE_NAMES[mode], lora=lora, gpu_memory_gib=gib or None, precision="bf16", device="cuda", lr=2e-5,
                         **extra), seq


def _batches(rows: int, seq: int, micro: int, vocab: int) -> list[dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (rows, seq), generator=g)
    pos = torch.arange(seq).expand(rows, seq).contiguous()
    return [{"input_ids": ids[i : i + micro], "labels": ids[i : i + micro].clone(), "position_ids": pos[i : i + micro]}
            for i in range(0, rows, micro)]


def _build(settings: Any, keep: int | None) -> tuple[Any, Any, Any]:
    """The trainer's build (``llama_pipe.train.session.build_session``) -> (acc, ctx, model)."""
    from llama_pipe.train.session import build_session, make_accelerator

    acc, precision = make_accelerator(settings)
    session = build_session(acc, CKPT, settings, precision, total=WARMUP + TIMED, keep=keep)
    return acc, session.ctx, session.model


def _steps(ctx: Any, micro: list[dict[str, Any]], n: int, first: int) -> float:
    import torch

    from llama_pipe.train.step import train_step

    targets = sum(int(b["labels"][:, 1:].numel()) for b in micro)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for k in range(n):
        train_step(ctx, micro, targets, first + k)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def run_card(mode: str, gib: float, extra: dict[str, Any]) -> dict[str, Any]:
    import torch

    from llama_pipe.train.memory import plan_run

    total = torch.cuda.get_device_properties(0).total_memory
    if gib:
        torch.cuda.set_per_process_memory_fraction((gib * GIB - 0.5 * GIB) / total)
    settings, seq = settings_for(mode, gib, extra)
    planned = plan_run(settings, seq, Path(CKPT), "cuda", 1, False)
    s = planned.settings
    row: dict[str, Any] = {"kind": "card", "mode": mode, "card_gib": gib or round(total / GIB, 1), "r": s.lora.r,
                           "seq": seq, "rows_per_step": s.micro_batch_size * s.grad_accum,
                           "plan": planned.plan.describe(32) if planned.plan else "manual",
                           "predicted_gib": round(planned.prediction.peak / GIB, 2) if planned.prediction else None,
                           "prediction": planned.prediction.describe() if planned.prediction else None}
    try:
        acc, ctx, model = _build(s, planned.plan.keep_layers if planned.plan else None)
        acc.gradient_accumulation_steps = s.grad_accum
        vocab = acc.unwrap_model(model).config.vocab_size
        micro = _batches(s.micro_batch_size * s.grad_accum, seq, s.micro_batch_size, vocab)
        torch.cuda.reset_peak_memory_stats()
        _steps(ctx, micro, WARMUP, 1)
        dt = _steps(ctx, micro, TIMED, WARMUP + 1)
        tokens = s.micro_batch_size * s.grad_accum * seq * TIMED
        peak = torch.cuda.max_memory_allocated()
        row.update(fits=True, tok_per_s=round(tokens / dt), peak_gib=round(peak / GIB, 2),
                   reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 2))
        if planned.prediction:
            row["error_pct"] = round(100 * (planned.prediction.peak - peak) / peak, 1)
    except torch.cuda.OutOfMemoryError as exc:
        row.update(fits=False, error=str(exc).splitlines()[0][:300], peak_gib=round(torch.cuda.max_memory_allocated() / GIB, 2))
    return row


def run_calibrate(mode: str) -> list[dict[str, Any]]:
    import torch

    from llama_pipe.train import planner
    from llama_pipe.train.memory import run_shape

    s, seq = settings_for(mode, 0, {"gradient_checkpointing": True, "optimizer": "adamw", "optimizer_in_backward": False})
    acc, ctx, model = _build(s, 0)
    layers = [m for m in acc.unwrap_model(model).modules() if hasattr(m, "_gradient_checkpointing_func")]
    vocab = acc.unwrap_model(model).config.vocab_size
    rows = []
    for mb, keep in CALIBRATE:
        for i, m in enumerate(layers):
            m.gradient_checkpointing = i < len(layers) - keep
        run = run_shape(s, seq, Path(CKPT), "cuda", 1, True)
        run = planner.RunShape(**{**run.__dict__, "rows_per_step": mb})
        plan = planner.Plan(mb, 1, keep, keep < len(layers), "adamw", False)
        pred = planner.predict(run, plan)
        micro = _batches(mb, seq, mb, vocab)
        _steps(ctx, micro, 1, 1)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        dt = _steps(ctx, micro, 3, 2)
        peak = torch.cuda.max_memory_allocated()
        rows.append({"kind": "calibrate", "mode": mode, "micro_batch": mb, "keep_layers": keep, "tok_per_s": round(3 * mb * seq / dt),
                     "peak_gib": round(peak / GIB, 3), "predicted_gib": round(pred.peak / GIB, 3),
                     "error_pct": round(100 * (pred.peak - peak) / peak, 1), "prediction": pred.describe()})
    return rows


def table(rows: list[dict[str, Any]], unsloth: dict[str, dict[str, Any]] | None = None) -> str:
    """The docs table: one line per card run, then each whole-card row against unsloth's row of the
    same shape (``unsloth``: its results by case name, from the same device call)."""
    out = ["| mode | card GiB | plan (from `--mode` only) | fits | tok/s | predicted GiB | real peak GiB | error |",
           "|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("kind") != "card":
            continue
        shape = f" (r{r['r']}, {r['rows_per_step']} x {r['seq']})" if r["r"] != 8 else ""
        err = f"{r['error_pct']:+.1f}%" if r.get("error_pct") is not None else "-"
        tok = f"{r['tok_per_s']:,}" if r.get("tok_per_s") else "-"
        out.append(f"| {r['mode']}{shape} | {r['card_gib']} | {r['plan']} | {'yes' if r.get('fits') else '**OOM**'} | {tok} | "
                   f"{r.get('predicted_gib')} | {r.get('peak_gib')} | {err} |")
    for r in rows:
        ref = (unsloth or {}).get(UNSLOTH_CASE.get((r.get("mode"), r.get("r")), ""))
        if r.get("kind") == "card" and ref and ref.get("tok_per_s") and r.get("tok_per_s"):
            out.append(f"\n{r['mode']} r{r['r']} on the whole card: {r['tok_per_s']:,} tok/s, {r['peak_gib']} GiB = "
                       f"{r['tok_per_s'] / ref['tok_per_s']:.2f}x unsloth's {ref['tok_per_s']:,} tok/s ({ref['peak_gib']} GiB)")
    return "\n".join(out)


def load_unsloth(path: Path | None) -> dict[str, dict[str, Any]]:
    """unsloth's rows by case name from a ``peer/results.jsonl`` of bench/train_throughput.py (none without a path)."""
    if path is None:
        return {}
    rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return {r["case"]: r for r in rows if r.get("peer") == "unsloth"}


def orchestrate(out: Path, budget_s: float, what: list[str], only: list[int] | None = None, unsloth: Path | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    make_7b()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    jobs: list[list[str]] = []
    if "calibrate" in what:
        jobs += [["calibrate", m] for m in ("qlora", "lora", "int8")]
    if "cards" in what:
        jobs += [["card", str(i)] for i in (only if only is not None else range(len(CARDS)))]
    rows: list[dict[str, Any]] = []
    for job in jobs:
        left = budget_s - (time.time() - t0)
        if left < 45:
            print(f"SKIPPED {job}: {left:.0f} s left", flush=True)
            continue
        try:
            r = subprocess.run([sys.executable, __file__, *job], capture_output=True, text=True, timeout=min(left, 200), env=env, check=False)
            so, se, rc = r.stdout, r.stderr, r.returncode
        except subprocess.TimeoutExpired:
            so, se, rc = "", "timeout", 124
        got = [json.loads(ln) for ln in so.splitlines() if ln.startswith("{")]
        rows += got
        with open(out / "memory_plan.jsonl", "a") as f:
            f.writelines(json.dumps(g) + "\n" for g in got)
        print(f"== {job} rc={rc} {time.time() - t0:.0f}s", *[json.dumps(g) for g in got], sep="\n", flush=True)
        if rc:
            print(se[-2000:], flush=True)
    text = table(rows, load_unsloth(unsloth))
    (out / "summary.md").write_text(text + "\n")
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["all", "calibrate", "card", "cards"])
    ap.add_argument("arg", nargs="?")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--cards", default=None, help="comma-separated CARDS indices (default: all)")
    ap.add_argument("--unsloth", type=Path, default=None,
                    help="peer/results.jsonl of bench/train_throughput.py --groups unsloth from the same call: ratio lines")
    a = ap.parse_args()
    if a.what == "card":
        mode, gib, extra = CARDS[int(a.arg)]
        print(json.dumps(run_card(mode, gib, extra)), flush=True)
    elif a.what == "calibrate" and a.arg:
        for row in run_calibrate(a.arg):
            print(json.dumps(row), flush=True)
    else:
        only = [int(x) for x in a.cards.split(",")] if a.cards else None
        orchestrate(a.out, a.budget_s, ["calibrate", "cards"] if a.what == "all" else [a.what], only, a.unsloth)


if __name__ == "__main__":
    main()
