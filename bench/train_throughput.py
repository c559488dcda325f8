"""Training throughput and peak GPU memory of llama-pipe's trainer on a LLaMA-7B-shaped model.

Every "ours" case runs llama-pipe's own code path: the trainer's accelerate set-up
(``llama_pipe.train.session.make_accelerator``: bf16 autocast) and its build,
``llama_pipe.train.session.build_session`` (the base in lora/qlora/int8 mode + peft adapter,
gradient checkpointing, AdamW on the adapter, the schedule, the fast path unless ``kernels`` is
``none``), then one ``llama_pipe.train.step.train_step`` per step.
Weights are random (speed and memory do not depend on the values): the checkpoint is written
by the peer script's ``make`` step (same shape: hidden 4096, 32 layers, vocab 32000).

The peers run in the same call, each case in its own process: ``peer_lora_baseline.py`` (plain
transformers + peft + bitsandbytes) and ``peer_unsloth.py``, copied into ``.peer/`` (see
docs/benchmarks.md for how their wheels travel). Usage on the GPU machine::

    python bench/train_throughput.py all --out $OUT [--groups peers,unsloth,ours,real,tiny] [--budget-s 560]
    python bench/train_throughput.py case NAME          # one case, prints one JSON line

Timing: 2 warm-up steps, then 5 timed steps between CUDA synchronisations; tok/s counts every
token of the batch for the fixed-shape cases (as the peers do) and only real (non-pad) tokens
for the "real length distribution" cases. Peak memory is ``torch.cuda.max_memory_allocated``
from after the model is built to the end of the timed steps (the peers measure the same span).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PEER_DIR = REPO / ".peer"
CKPT = "/tmp/llama7b"  # where peer_lora_baseline.py's "make" writes the random 7B checkpoint
TINY = "/tmp/llama_tiny"
QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WARMUP, TIMED = 2, 5


@dataclass(frozen=True)
class Case:
    """One benchmark case of llama-pipe's trainer (or the pad-to-max plain baseline)."""

    mode: str  # lora | qlora | int8: the base storage float / nf4 / int8 under LoRA (config.load.MODE_NAMES); fp8: base_storage fp8
    r: int
    targets: tuple[str, ...]
    seq: int
    bs: int
    dropout: float = 0.05
    kernels: str = "auto"
    disable: tuple[str, ...] = ()  # fast-path levers turned off (ablation)
    enable: tuple[str, ...] = ()  # opt-in fast-path levers turned on
    data: str = "fixed"  # fixed | real (ShareGPT-like lengths, packed) | padmax (plain HF+peft, pad to max)
    model: str = "7b"  # 7b | tiny
    optimizer: str = "adamw"  # train.optimizer
    in_backward: bool = False  # train.optimizer_in_backward (with max_grad_norm 0)
    peer: str = ""  # the peer case this compares with ("" = none)
    unsloth: str = ""
    dgrad: str = ""  # fp8: the input-gradient variant (llama_pipe.train.fp8.Fp8Linear.dgrad); "" = the default
    card_gib: float = 0.0  # > 0: train.memory auto plans for a card of this size (layers kept, optimizer); 0: recompute every layer


# Peer case names are those of ../shared/bench/peer_lora_baseline.py and peer_unsloth.py.
P_BF16_QV = "fastchat_bf16_r8qv_s512_b14_ckpt"
P_INT8 = "seed000_int8_r8qv_s512_b14_ckpt"
P_BF16_ALL = "bf16_r16all_s1024_b8_ckpt"
P_NF4 = "qlora_nf4_r64all_s1024_b8_ckpt"
U_BF16, U_NF4 = "unsloth_bf16_r16all_s1024_b8_ckpt", "unsloth_qlora_nf4_r64all_s1024_b8_ckpt"

CASES: dict[str, Case] = {
    "bf16_r8qv_s512_b14": Case("lora", 8, tuple(QV), 512, 14, peer=P_BF16_QV),
    # kernels auto: the int8_dequant lever (bf16 GEMMs over per-layer dequantized weights) ...
    "int8_r8qv_s512_b14": Case("int8", 8, tuple(QV), 512, 14, peer=P_INT8),
    # ... and without it: bitsandbytes' LLM.int8 matmuls under the rest of the fast path.
    "int8_r8qv_s512_b14_llmint8": Case("int8", 8, tuple(QV), 512, 14, disable=("int8_dequant",), peer=P_INT8),
    "bf16_r16all_s1024_b8": Case("lora", 16, tuple(ALL), 1024, 8, peer=P_BF16_ALL, unsloth=U_BF16 + "_d05"),
    "bf16_r16all_s1024_b8_d0": Case("lora", 16, tuple(ALL), 1024, 8, dropout=0.0, peer=P_BF16_ALL, unsloth=U_BF16),
    "nf4_r64all_s1024_b8": Case("qlora", 64, tuple(ALL), 1024, 8, peer=P_NF4, unsloth=U_NF4 + "_d05"),
    "nf4_r64all_s1024_b8_d0": Case("qlora", 64, tuple(ALL), 1024, 8, dropout=0.0, peer=P_NF4, unsloth=U_NF4),
    "nf4_r64all_s2048_b1": Case("qlora", 64, tuple(ALL), 2048, 1),
    "nf4_r16all_s2048_b1": Case("qlora", 16, tuple(ALL), 2048, 1),
    # The same with 8-bit AdamW moments. Not the paged variant: it takes
    # CUDA managed memory, which the device machines ask us not to use.
    "nf4_r64all_s2048_b1_adam8bit": Case("qlora", 64, tuple(ALL), 2048, 1, optimizer="adamw_8bit"),
    # ... and updated in the backward pass, so all adapter gradients never exist at once.
    "nf4_r64all_s2048_b1_adam8bit_inbwd": Case("qlora", 64, tuple(ALL), 2048, 1, optimizer="adamw_8bit", in_backward=True),
    # Real length distribution: llama-pipe packing (+ fast path) vs FastChat's pad-to-max collation.
    "real_packed": Case("lora", 16, tuple(ALL), 2048, 4, data="real"),
    "real_packed_nokernels": Case("lora", 16, tuple(ALL), 2048, 4, data="real", kernels="none"),
    "real_padmax_plain": Case("lora", 16, tuple(ALL), 2048, 4, data="padmax"),
    # Issue 4: the trainer's defaults (LoRA r8 q,v, seq 512, micro-batch 4) on the tiny model.
    "tiny_lora": Case("lora", 8, tuple(QV), 512, 4, model="tiny"),
    "tiny_qlora": Case("qlora", 8, tuple(QV), 512, 4, model="tiny"),
    "tiny_int8": Case("int8", 8, tuple(QV), 512, 4, model="tiny"),
    # Ablation of the fast path's levers (bf16 r16 all-linear, dropout 0).
    "abl_none": Case("lora", 16, tuple(ALL), 1024, 8, dropout=0.0, kernels="none"),
    "abl_no_kernels": Case("lora", 16, tuple(ALL), 1024, 8, dropout=0.0, disable=("kernels",)),
    "abl_no_fused_loss": Case("lora", 16, tuple(ALL), 1024, 8, dropout=0.0, disable=("fused_loss",)),
    "abl_no_offload": Case("lora", 16, tuple(ALL), 1024, 8, dropout=0.0, disable=("offload_checkpoints",)),
    "abl_no_autocast": Case("lora", 16, tuple(ALL), 1024, 8, dropout=0.0, disable=("adapter_autocast",)),
    "abl_nf4_fp32_frozen": Case("qlora", 64, tuple(ALL), 1024, 8, dropout=0.0, disable=("bf16_frozen_weights",)),
    "abl_nf4_none": Case("qlora", 64, tuple(ALL), 1024, 8, dropout=0.0, kernels="none"),
    "abl_no_fused_lora": Case("lora", 16, tuple(ALL), 1024, 8, dropout=0.0, disable=("fused_lora",)),
    "abl_nf4_no_fused_lora": Case("qlora", 64, tuple(ALL), 1024, 8, dropout=0.0, disable=("fused_lora",)),
    # Issue 29: the frozen base in FP8 (e4m3, FP8 GEMMs for the forward and the input gradient).
    "fp8_r16all_s1024_b8_d0": Case("fp8", 16, tuple(ALL), 1024, 8, dropout=0.0, peer=P_BF16_ALL, unsloth=U_BF16),
    "fp8_r64all_s1024_b8_d0": Case("fp8", 64, tuple(ALL), 1024, 8, dropout=0.0, peer=P_NF4, unsloth=U_NF4),
    # ... planned by train.memory auto for a 16.5 GiB card: predicted peak <= (16.5 - 0.5 - 0.5) / 1.1 = 14.1 GiB,
    # under unsloth's 15.19 GiB (bf16 r16), the rest spent on layers kept from recompute
    "fp8_r16all_s1024_b8_d0_card16": Case("fp8", 16, tuple(ALL), 1024, 8, dropout=0.0, peer=P_BF16_ALL, unsloth=U_BF16, card_gib=16.5),
    # ... for a 17.5 GiB card: predicted peak <= (17.5 - 1) / 1.1 = 15.0 GiB, the most that stays under unsloth's 15.19
    "fp8_r16all_s1024_b8_d0_card17": Case("fp8", 16, tuple(ALL), 1024, 8, dropout=0.0, peer=P_BF16_ALL, unsloth=U_BF16, card_gib=17.5),
    # ... r64 with the smallest optimizer state (8-bit AdamW, updated in the backward pass)
    "fp8_r64all_s1024_b8_d0_8bit_inbwd": Case("fp8", 64, tuple(ALL), 1024, 8, dropout=0.0, optimizer="adamw_8bit", in_backward=True,
                                              peer=P_NF4, unsloth=U_NF4),
    # ... the other two input-gradient variants (bench/fp8_layer.py times them layer by layer)
    "fp8_r16all_s1024_b8_d0_dgcached": Case("fp8", 16, tuple(ALL), 1024, 8, dropout=0.0, unsloth=U_BF16, dgrad="cached"),
    "fp8_r16all_s1024_b8_d0_dgtiles": Case("fp8", 16, tuple(ALL), 1024, 8, dropout=0.0, unsloth=U_BF16, dgrad="tiles"),
    "fp8_r16all_s1024_b8_d0_dgdequant": Case("fp8", 16, tuple(ALL), 1024, 8, dropout=0.0, unsloth=U_BF16, dgrad="dequant"),
    "fp8_r16all_s1024_b8_d0_nofusedlora": Case("fp8", 16, tuple(ALL), 1024, 8, dropout=0.0, unsloth=U_BF16, disable=("fused_lora",)),
}
GROUPS = {
    "ours": ["bf16_r8qv_s512_b14", "int8_r8qv_s512_b14", "int8_r8qv_s512_b14_llmint8", "bf16_r16all_s1024_b8", "bf16_r16all_s1024_b8_d0",
             "nf4_r64all_s1024_b8", "nf4_r64all_s1024_b8_d0", "nf4_r64all_s2048_b1", "nf4_r16all_s2048_b1",
             "nf4_r64all_s2048_b1_adam8bit", "nf4_r64all_s2048_b1_adam8bit_inbwd"],
    "real": ["real_packed", "real_packed_nokernels", "real_padmax_plain"],
    "tiny": ["tiny_lora", "tiny_qlora", "tiny_int8"],
    "fp8": ["fp8_r16all_s1024_b8_d0", "fp8_r64all_s1024_b8_d0", "fp8_r16all_s1024_b8_d0_card16", "fp8_r16all_s1024_b8_d0_card17",
            "fp8_r64all_s1024_b8_d0_8bit_inbwd", "fp8_r16all_s1024_b8_d0_dgcached", "fp8_r16all_s1024_b8_d0_dgtiles",
            "fp8_r16all_s1024_b8_d0_dgdequant", "fp8_r16all_s1024_b8_d0_nofusedlora"],
    "ablation": ["abl_none", "abl_no_kernels", "abl_no_fused_loss", "abl_no_offload", "abl_no_autocast",
                 "abl_nf4_none", "abl_nf4_fp32_frozen", "abl_no_fused_lora", "abl_nf4_no_fused_lora"],
}
PEER_CASES = [P_BF16_QV, P_INT8, P_BF16_ALL, P_NF4]
UNSLOTH_CASES = [U_BF16, U_NF4, U_BF16 + "_d05", U_NF4 + "_d05"]


# ----------------------------------------------------------------------------- data


def real_lengths(n: int, seed: int = 0, median: float = 300.0, sigma: float = 0.9, cap: int = 2048) -> list[int]:
    """ShareGPT-like conversation lengths in tokens: log-normal (median 300, mean ~450), cut at 2048."""
    import random

    rng = random.Random(seed)
    return [max(16, min(cap, int(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


def real_examples(n: int, vocab: int) -> list[Any]:
    import random

    from llama_pipe.train.dataset import Example

    rng = random.Random(1)
    out = []
    for length in real_lengths(n):
        ids = [1] + [rng.randrange(3, vocab) for _ in range(length - 1)]
        out.append(Example(input_ids=ids, labels=[-100] + ids[1:]))
    return out


# ----------------------------------------------------------------------------- one case


def _settings(case: Case) -> Any:
    from llama_pipe.config import LoraSettings, TrainSettings
    from llama_pipe.config.load import MODE_NAMES

    return TrainSettings(
        **(MODE_NAMES.get(case.mode) or {"base_storage": case.mode, "method": "lora"}),
        lora=LoraSettings(r=case.r, alpha=2 * case.r, dropout=case.dropout, target_modules=list(case.targets)),
        micro_batch_size=case.bs,
        gradient_checkpointing=case.model == "7b",
        precision="bf16" if _cuda() else "fp32",
        lr=2e-5,
        optimizer=case.optimizer,
        optimizer_in_backward=case.in_backward,
        max_grad_norm=0.0 if case.in_backward else 1.0,
        device="cuda" if _cuda() else "cpu",  # CPU only for a smoke run of the tiny cases
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _memory() -> dict[str, float]:
    import torch

    if not torch.cuda.is_available():
        return {"peak_gib": float("nan"), "peak_reserved_gib": float("nan")}
    return {"peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def _fixed_batch(case: Case, vocab: int) -> tuple[dict[str, Any], int, int]:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (case.bs, case.seq), generator=g)
    pos = torch.arange(case.seq).expand(case.bs, case.seq).contiguous()
    n = case.bs * case.seq
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": pos}, n, case.bs * (case.seq - 1)


def run_ours(case: Case) -> dict[str, Any]:
    """llama-pipe's trainer (``llama_pipe.train.session.build_session`` + ``train_step``), fast path unless kernels=none."""
    from dataclasses import replace

    import torch

    from llama_pipe.train import fast
    from llama_pipe.train.dataset import collate, pack_examples
    from llama_pipe.train.session import build_session, make_accelerator
    from llama_pipe.train.step import train_step

    settings = _settings(case)
    base = CKPT if case.model == "7b" else TINY
    keep, plan_note, predicted = None, "recompute every layer (memory: manual)", None
    if case.card_gib:  # the planner's plan for a card of this size, as llama-pipe train would choose it
        from llama_pipe.train.memory import plan_run

        planned = plan_run(replace(settings, gpu_memory_gib=case.card_gib, gradient_checkpointing=None, optimizer=None,
                                   optimizer_in_backward=None), case.seq, Path(base), "cuda", 1, False)
        settings, keep = planned.settings, planned.plan.keep_layers if planned.plan else None
        plan_note = planned.plan.describe(planned.layers) if planned.plan else "manual"
        predicted = planned.prediction.peak if planned.prediction else None
    elif case.model == "7b" and _cuda():  # the planner's prediction of the manual plan: every layer recomputed, inputs offloaded
        from llama_pipe.train import planner
        from llama_pipe.train.memory import run_shape

        run = run_shape(settings, case.seq, Path(base), "cuda", 1, case.kernels != "none")
        plan = planner.Plan(case.bs, 1, 0, case.kernels != "none", settings.optimizer or "adamw", bool(settings.optimizer_in_backward))  # type: ignore[arg-type]
        predicted = planner.predict(run, plan).peak
    acc, precision = make_accelerator(settings)
    t0 = time.time()
    opts = None
    if case.kernels == "none":
        settings = replace(settings, kernels="none")
    else:
        opts = fast.replace(fast.FastOptions(), **{k: False for k in case.disable}, **{k: True for k in case.enable})
    session = build_session(acc, base, settings, precision, WARMUP + TIMED, keep=keep, fast_options=opts)
    model, optimizer, ctx = session.model, session.optimizer, session.ctx
    if case.dgrad:
        from llama_pipe.train import fp8

        fp8.set_dgrad(acc.unwrap_model(model), case.dgrad)  # type: ignore[arg-type]
    report = "kernels: none" if opts is None else fast.report(acc.unwrap_model(model)).describe()
    load_s = time.time() - t0
    vocab = acc.unwrap_model(model).config.vocab_size

    if case.data == "real":
        rows = pack_examples(real_examples(600, vocab), case.seq, packing=True)
        batches = []
        for i in range(WARMUP + TIMED):
            b = collate(rows[i * case.bs : (i + 1) * case.bs], pad_id=0)
            real = sum(len(r) for r in rows[i * case.bs : (i + 1) * case.bs])
            batches.append((b, real, int((b["labels"][:, 1:] != -100).sum())))
    else:
        b, n, targets = _fixed_batch(case, vocab)
        batches = [(b, n, targets)] * (WARMUP + TIMED)

    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    losses = []
    mb = settings.micro_batch_size  # a planned case may split the step's rows into micro-batches

    def micro(b: dict[str, Any]) -> list[dict[str, Any]]:
        rows = len(b["input_ids"])
        return [b] if mb >= rows else [{k: v[i : i + mb] for k, v in b.items()} for i in range(0, rows, mb)]

    for step, (b, _, targets) in enumerate(batches[:WARMUP], 1):
        losses.append(train_step(ctx, micro(b), targets, step).loss)
    _sync()
    t = time.perf_counter()
    tokens = 0
    for step, (b, n, targets) in enumerate(batches[WARMUP:], WARMUP + 1):
        losses.append(train_step(ctx, micro(b), targets, step).loss)
        tokens += n
    _sync()
    dt = time.perf_counter() - t
    mem = _memory()
    if os.environ.get("BENCH_PROFILE"):
        _profile(lambda: train_step(ctx, [batches[-1][0]], batches[-1][2], WARMUP + TIMED + 1), case)
    if os.environ.get("BENCH_MEMORY"):
        try:
            _memory_at_peak(lambda: train_step(ctx, [batches[-1][0]], batches[-1][2], WARMUP + TIMED + 1), case,
                            _tensor_labels(acc.unwrap_model(model), optimizer))
        except Exception as exc:  # a diagnostic: the measured row still counts
            with open(os.environ["BENCH_MEMORY"], "a") as f:
                f.write(f"==== {case}: memory report failed: {exc!r}\n")
    pred = {} if predicted is None else {"predicted_gib": round(predicted / 2**30, 2),
                                         "predicted_error_pct": round(100 * (predicted / 2**30 - mem["peak_gib"]) / mem["peak_gib"], 1)}
    return dict(
        tok_per_s=round(tokens / dt), s_per_step=round(dt / TIMED, 3), **mem, **pred,
        load_s=round(load_s, 1), loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4),
        tokens_per_step=round(tokens / TIMED), fast_path=report, plan=plan_note,
    )


def _profile(step: Any, case: Case) -> None:
    """One more step under torch.profiler; the top kernels by GPU time go to $BENCH_PROFILE."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=35, max_name_column_width=70)
    with open(os.environ["BENCH_PROFILE"], "a") as f:
        f.write(f"==== {case}\n{table}\n")


def _tensor_labels(model: Any, optimizer: Any) -> dict[int, str]:
    """data_ptr -> what it is, for the tensors that live across steps."""
    labels: dict[int, str] = {}
    for p in model.parameters():
        labels[p.data_ptr()] = "adapter weights" if p.requires_grad else "frozen weights"
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    for inner in getattr(opt, "inner", [opt]):  # train.optimizer_in_backward: one per tensor
        for state in inner.state.values():
            for v in state.values():
                if hasattr(v, "data_ptr") and getattr(v, "is_cuda", False):
                    labels[v.data_ptr()] = "optimizer state"
    return labels


def live_at_peak(snap: dict[str, Any], labels: dict[int, str]) -> tuple[int, int, int, list[tuple[str, list[int]]]]:
    """Replay a CUDA allocator snapshot (``torch.cuda.memory._snapshot()`` taken after recording one
    step): returns the peak bytes, the index of the alloc/free event where it was reached, the
    number of those events, and what was live then as ``(where, block sizes)`` groups, largest
    first. ``where`` is the allocating Python frames, or ``labels[address]`` for blocks that
    predate the recording (weights, optimizer state)."""
    events = [e for trace in snap["device_traces"] for e in trace if e["action"] in ("alloc", "free_completed")]
    # Blocks allocated before recording started have no alloc event: find them (alive at the end,
    # or freed during the step) to know what was live when the step began.
    in_trace: set[int] = set()
    live: dict[int, tuple[int, str]] = {}
    for e in events:
        if e["action"] == "alloc":
            in_trace.add(e["addr"])
        elif e["addr"] in in_trace:
            in_trace.discard(e["addr"])
        else:
            live[e["addr"]] = (e["size"], labels.get(e["addr"], "before the step, freed in it"))
    for seg in snap["segments"]:
        for blk in seg["blocks"]:
            if blk["state"] == "active_allocated" and blk["address"] not in in_trace:
                live[blk["address"]] = (blk["size"], labels.get(blk["address"], "before the step, kept"))
    cur = peak = sum(size for size, _ in live.values())
    peak_at, sizes = -1, {a: sz for a, (sz, _) in live.items()}
    for i, e in enumerate(events):  # first pass: when is the peak
        if e["action"] == "alloc":
            sizes[e["addr"]] = e["size"]
            cur += e["size"]
            if cur > peak:
                peak, peak_at = cur, i
        else:
            cur -= sizes.pop(e["addr"], 0)
    for e in events[: peak_at + 1]:  # second pass: what is live then
        if e["action"] == "alloc":
            frames = [f for f in e.get("frames", []) if f["filename"].endswith(".py") and "/torch/" not in f["filename"]]
            where = "; ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in frames[:4]) or "no Python frame"
            live[e["addr"]] = (e["size"], where)
        else:
            live.pop(e["addr"], None)
    by_site: dict[str, list[int]] = {}
    for size, where in live.values():
        by_site.setdefault(where, []).append(size)
    return peak, peak_at, len(events), sorted(by_site.items(), key=lambda kv: -sum(kv[1]))


def _memory_at_peak(step: Any, case: Case, labels: dict[int, str], top: int = 25) -> None:
    """One more step with CUDA's allocator history on; what was live at its peak (see
    :func:`live_at_peak`) is appended to $BENCH_MEMORY."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, peak_at, n_events, rows = live_at_peak(snap, labels)
    opt = case.optimizer + (" in-backward" if case.in_backward else "")
    lines = [f"==== {case.mode} r{case.r} {case.seq}x{case.bs} {opt}: peak {peak / 2**30:.3f} GiB "
             f"(max_memory_allocated {torch.cuda.max_memory_allocated() / 2**30:.3f}), event {peak_at} of {n_events}"]
    lines += [f"{sum(sz) / 2**20:10.1f} MiB  x{len(sz):<5} {where}" for where, sz in rows[:top]]
    with open(os.environ["BENCH_MEMORY"], "a") as f:
        f.write("\n".join(lines) + "\n")


def run_padmax_plain(case: Case) -> dict[str, Any]:
    """FastChat's collation on the plain path: one conversation per row, padded to max length,
    plain transformers + peft (the peer baseline's set-up: bf16 base, checkpointing, AdamW)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    t0 = time.time()
    m = LlamaForCausalLM.from_pretrained(CKPT, dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": 0})
    m.config.use_cache = False
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.enable_input_require_grads()
    m = get_peft_model(m, LoraConfig(r=case.r, lora_alpha=2 * case.r, lora_dropout=case.dropout, target_modules=list(case.targets), task_type="CAUSAL_LM"))
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-5)
    load_s = time.time() - t0
    lengths = real_lengths(600)
    g = torch.Generator().manual_seed(1)

    def batch(i: int) -> tuple[dict[str, Any], int]:
        ls = lengths[i * case.bs : (i + 1) * case.bs]
        ids = torch.randint(3, 32000, (case.bs, case.seq), generator=g)
        mask = torch.zeros(case.bs, case.seq, dtype=torch.long)
        for j, n in enumerate(ls):
            mask[j, :n] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "labels": labels.cuda()}, sum(ls)

    batches = [batch(i) for i in range(WARMUP + TIMED)]
    torch.cuda.reset_peak_memory_stats()

    def step(b: dict[str, Any]) -> float:
        loss = m(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    losses = [step(b) for b, _ in batches[:WARMUP]]
    torch.cuda.synchronize()
    t = time.perf_counter()
    tokens = 0
    for b, n in batches[WARMUP:]:
        losses.append(step(b))
        tokens += n
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return {
        "tok_per_s": round(tokens / dt), "s_per_step": round(dt / TIMED, 3), **_memory(),
        "load_s": round(load_s, 1), "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
        "tokens_per_step": round(tokens / TIMED), "fast_path": "plain transformers+peft, pad to max",
    }


def run_case(name: str) -> dict[str, Any]:
    case = CASES[name]
    res = run_padmax_plain(case) if case.data == "padmax" else run_ours(case)
    return {"case": name, **asdict(case), **res}


# ----------------------------------------------------------------------------- orchestration


def make_tiny() -> None:
    if Path(TINY, "config.json").exists():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # The shape of config.yaml's base.tiny (dim 64, 2 layers, 4 heads, 2 kv heads, vocab 2000).
    cfg = LlamaConfig(vocab_size=2000, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    LlamaForCausalLM(cfg).save_pretrained(TINY)


def versions() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    v: dict[str, Any] = {}
    for p in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel", "triton"):
        try:
            v[p] = md.version(p)
        except md.PackageNotFoundError:
            v[p] = None
    v["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    v["cuda"] = torch.version.cuda
    try:
        v["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=20, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        v["driver"] = None
    return v


def _sub(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    try:
        r = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True, env=env, check=False)
        return r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        return 124, str(e.stdout or ""), f"timeout after {timeout:.0f} s"


def orchestrate(out: Path, groups: list[str], budget_s: float, only: list[str]) -> None:
    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    def left() -> float:
        return budget_s - (time.time() - t_start)

    def note(msg: str) -> None:
        print(msg, flush=True)
        with open(out / "bench.log", "a") as log:
            log.write(msg + "\n")

    env = dict(os.environ, OUT=str(out / "peer"), PYTHONUNBUFFERED="1")
    (out / "peer").mkdir(exist_ok=True)
    vers = versions()
    (out / "versions.json").write_text(json.dumps(vers, indent=1))
    note(f"versions: {json.dumps(vers)}")
    peer_script = PEER_DIR / "peer_lora_baseline.py"
    if not Path(CKPT, "config.json").exists():
        rc, so, se = _sub([sys.executable, str(peer_script), "make"], 300, env)
        note(f"make 7B checkpoint rc={rc} {so.strip()} {se[-800:] if rc else ''}")
    make_tiny()
    plan: list[tuple[str, str]] = []
    for g in groups:
        if g == "peers":
            plan += [("peer", c) for c in PEER_CASES]
        elif g == "unsloth":
            plan += [("unsloth", c) for c in UNSLOTH_CASES]
        else:
            plan += [("ours", c) for c in GROUPS[g]]
    if only:
        plan = [p for p in plan if p[1] in only]
    if any(k == "unsloth" for k, _ in plan):
        rc, so, se = _sub([sys.executable, str(PEER_DIR / "peer_unsloth.py"), "tok"], 120, env)
        note(f"unsloth tokenizer step rc={rc} {so.strip()[-200:]} {se[-800:] if rc else ''}")
    for kind, name in plan:
        need = 150 if kind == "unsloth" else 75
        if left() < need:
            note(f"SKIPPED {kind} {name}: {left():.0f} s of budget left")
            continue
        t = time.time()
        if kind == "peer":
            rc, so, se = _sub([sys.executable, str(peer_script), name], min(150, left()), env)
        elif kind == "unsloth":
            uenv = dict(env, PYTHONPATH=os.pathsep.join(p for p in ("/tmp/site_unsloth", env.get("PYTHONPATH", "")) if p))
            rc, so, se = _sub([sys.executable, str(PEER_DIR / "peer_unsloth.py"), name], min(200, left()), uenv)
        else:
            rc, so, se = _sub([sys.executable, __file__, "case", name], min(200, left()), env)
            if rc == 0:
                with open(out / "ours.jsonl", "a") as f:
                    f.write(so.strip().splitlines()[-1] + "\n")
        note(f"== {kind} {name} rc={rc} {time.time() - t:.0f}s\n{so.strip()[-700:]}")
        if rc != 0:
            note(f"FAILED {kind} {name}:\n{se[-2500:]}")
    table = summarize(out, vers)
    (out / "summary.md").write_text(table)
    note(table)


def _load(path: Path) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[r["case"]] = r
    return rows


def summarize(out: Path, vers: dict[str, Any]) -> str:
    ours, peers = _load(out / "ours.jsonl"), _load(out / "peer" / "results.jsonl")
    lines = [(f"GPU {vers.get('gpu')}, driver {vers.get('driver')}, torch {vers.get('torch')}, transformers "
              f"{vers.get('transformers')}, peft {vers.get('peft')}, bitsandbytes {vers.get('bitsandbytes')}, "
              f"liger-kernel {vers.get('liger-kernel')}"), "",
             "| case | dropout | ours tok/s | ours peak GiB (planner) | HF+peft tok/s (GiB) | x HF+peft | unsloth tok/s (GiB) | x unsloth |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in ours.items():
        c = CASES.get(name)
        p = peers.get(c.peer) if c and c.peer else None
        u = peers.get(c.unsloth) if c and c.unsloth else None
        pf = f"{p['tok_per_s']:,} ({p['peak_gib']})" if p else "-"
        uf = f"{u['tok_per_s']:,} ({u['peak_gib']})" if u else "-"
        px = f"{r['tok_per_s'] / p['tok_per_s']:.2f}x" if p else "-"
        ux = f"{r['tok_per_s'] / u['tok_per_s']:.2f}x" if u else "-"
        pk = f"{r['peak_gib']} ({r['predicted_gib']}, {r['predicted_error_pct']:+.1f}%)" if r.get("predicted_gib") else f"{r['peak_gib']}"
        lines.append(f"| {name} | {r['dropout']} | {r['tok_per_s']:,} | {pk} | {pf} | {px} | {uf} | {ux} |")
    if "real_packed" in ours and "real_padmax_plain" in ours:
        a, b = ours["real_packed"], ours["real_padmax_plain"]
        lines += ["", (f"real lengths: packed+fast {a['tok_per_s']:,} useful tok/s vs pad-to-max plain "
                       f"{b['tok_per_s']:,}: {a['tok_per_s'] / b['tok_per_s']:.2f}x")]
    lines += ["", "peers:"] + [f"- {k}: {v['tok_per_s']:,} tok/s, {v['peak_gib']} GiB, loss {v.get('loss')}" for k, v in peers.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("all", help="run groups of cases (peers first) and print the table")
    a.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/bench")))
    a.add_argument("--groups", default="peers,unsloth,ours,real,tiny")
    a.add_argument("--only", default="", help="comma-separated case names to keep")
    a.add_argument("--budget-s", type=float, default=560.0, help="stop starting cases after this long")
    c = sub.add_parser("case", help="run one case of ours, print one JSON line")
    c.add_argument("name", choices=sorted(CASES))
    s = sub.add_parser("summary", help="rebuild the table from an --out folder")
    s.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "all":
        orchestrate(args.out, [g for g in args.groups.split(",") if g], args.budget_s, [x for x in args.only.split(",") if x])
    elif args.cmd == "case":
        print(json.dumps(run_case(args.name)), flush=True)
    else:
        vers = json.loads((args.out / "versions.json").read_text()) if (args.out / "versions.json").exists() else {}
        print(summarize(args.out, vers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
