"""The same optimiser steps computed several ways: ``llama-pipe train`` itself, run over the same
packed rows as ``micro_batch_size x grad_accum`` = 4 x 1, 2 x 2 and 1 x 4, with and without the fast
path's levers, recording each step's loss (from ``metrics.jsonl``) and each step's gradient (the
flattened trainable gradients just before ``optimizer.step()``).

Used by ``tests/train_fast/test_step_equivalence.py`` (CPU levers, fp32) and
``tests/gpu/test_step_equivalence.py`` (every lever, bf16 and nf4, on the device).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample" / "sharegpt_sample.json"
IDENTITY = REPO / "data" / "sample" / "identity_sample.json"
LAYOUTS = ((4, 1), (2, 2), (1, 4))


@dataclass
class Trace:
    """One run: the loss and the gradient of every optimiser step."""

    losses: list[float]
    grads: list[torch.Tensor]


def write_conversations(folder: Path, n_train: int = 90, n_val: int = 8, median_chars: float = 150.0) -> tuple[Path, Path]:
    """Train/val JSONL of the bundled samples' alternating conversations, 1..3 pairs each, every
    turn cut to a log-normal length (median ``median_chars``, like real chat turns), every third
    conversation a short identity exchange: lengths from a few dozen tokens to past the row
    length, so packed rows of unequal fill (padding in a micro-batch of several rows) and short rows."""
    rng = random.Random(0)
    recs: list[dict[str, Any]] = []
    short = iter(json.loads(IDENTITY.read_text(encoding="utf-8")))
    for rec in json.loads(SAMPLE.read_text(encoding="utf-8")):
        if len(recs) % 3 == 2:
            recs.append(next(short))
        turns = rec.get("conversations") if isinstance(rec, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        turns = turns[: 2 * (1 + len(recs) % 3)]
        ok = all(isinstance(t, dict) and isinstance(t.get("value"), str) and t["value"].strip() for t in turns)
        if ok and len(turns) % 2 == 0 and all(t.get("from") == ("human" if i % 2 == 0 else "gpt") for i, t in enumerate(turns)):
            cut = [{"from": t["from"], "value": t["value"][: max(8, int(rng.lognormvariate(math.log(median_chars), 0.9)))]} for t in turns]
            recs.append({"id": str(rec["id"]), "conversations": cut})
    assert len(recs) >= n_train + n_val, len(recs)
    train, val = folder / "train.jsonl", folder / "val.jsonl"
    train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs[:n_train]), encoding="utf-8")
    val.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs[n_train : n_train + n_val]), encoding="utf-8")
    return train, val


def row_lengths(base: Path, train: Path, max_seq_len: int, system_prompt: str | None = None) -> list[int]:
    """The packed rows' lengths, as the trainer makes them (for checking the data has what the test needs)."""
    from llama_pipe.chat_template.builtin import get_template
    from llama_pipe.chat_template.resolve import pick_template
    from llama_pipe.train.dataset import load_examples, pack_examples
    from llama_pipe.weights.tokenizer import load_tokenizer

    tok = load_tokenizer(base)
    template = get_template(pick_template("auto", [base], tok), tok)
    examples, _ = load_examples(train, tok, template, max_seq_len, system_prompt)
    return [len(r) for r in pack_examples(examples, max_seq_len, True)]


def _flat_grad(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    return torch.cat([p.grad.detach().float().flatten().cpu() for g in optimizer.param_groups for p in g["params"] if p.grad is not None])


def run_training(
    monkeypatch: pytest.MonkeyPatch, base: Path, train: Path, val: Path, out: Path, settings: Any, chat: Any,
    fast_options: Any = None,
) -> Trace:
    """``llama_pipe.train.train.train`` as the stage runs it, with a hook that records each step's gradient."""
    from accelerate.state import AcceleratorState, GradientState

    from llama_pipe.train import session
    from llama_pipe.train import train as train_stage

    grads: list[torch.Tensor] = []
    plain = session.make_optimizer

    def recording(model: Any, s: Any, fused: bool = False) -> Any:
        opt = plain(model, s, fused=fused)
        opt.register_step_pre_hook(lambda o, args, kwargs: grads.append(_flat_grad(o)))
        return opt

    monkeypatch.setattr(session, "make_optimizer", recording)
    try:
        train_stage.train(base, train, val, out, settings, chat, fast_options=fast_options)
    finally:
        monkeypatch.setattr(session, "make_optimizer", plain)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    losses = [float(r["loss"]) for r in rows if "loss" in r]
    assert len(losses) == len(grads) == settings.max_steps, (len(losses), len(grads))
    return Trace(losses, grads)


def layout(settings: Any, micro: int, accum: int) -> Any:
    """``settings`` with the step's rows split as ``micro x accum`` (the planner left out)."""
    return replace(settings, micro_batch_size=micro, grad_accum=accum, memory="manual")


def compare(ref: Trace, got: Trace, loss_rtol: float, min_cos: float, label: str = "") -> tuple[float, float]:
    """The worst relative loss difference and the worst gradient cosine over the steps; asserts the bounds."""
    worst_rel, worst_cos = 0.0, 1.0
    for step, (a, b) in enumerate(zip(ref.losses, got.losses, strict=True), start=1):
        rel = abs(a - b) / max(abs(a), 1e-12)
        worst_rel = max(worst_rel, rel)
        assert rel <= loss_rtol, f"{label} step {step}: loss {b} vs {a} (relative {rel:.2e} > {loss_rtol})\n{ref.losses}\n{got.losses}"
    for step, (ga, gb) in enumerate(zip(ref.grads, got.grads, strict=True), start=1):
        assert ga.shape == gb.shape
        cos = float(torch.nn.functional.cosine_similarity(ga.double(), gb.double(), dim=0))
        worst_cos = min(worst_cos, cos)
        assert cos >= min_cos, f"{label} step {step}: gradient cosine {cos:.6f} < {min_cos}"
    return worst_rel, worst_cos
