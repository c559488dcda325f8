"""One optimiser step and the validation loss, independent of where the data comes from.

The loss of a step is the token-level mean over the *global* batch: the sum of per-token cross
entropies of every micro-batch on every process, divided by the number of target tokens in the
whole step (known up front, since every process holds the same rows). Each micro-batch's sum is
scaled so that accelerate's division by ``grad_accum`` and DDP's average over processes give
exactly that gradient, which makes 1 process x 2 micro-batches and 2 processes x 1 micro-batch
the same step.

A faster kernel plugs in through :class:`StepContext.loss_fn` (e.g. a fused linear +
cross-entropy): it receives the model and a batch and returns ``(sum of token losses, n tokens)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llama_pipe.chat_template.builtin import IGNORE_INDEX
from llama_pipe.models.generation import target_logits

LossFn = Callable[[Any, dict[str, Any]], tuple[Any, Any]]


class NonFiniteLoss(RuntimeError):
    """A loss or gradient norm was NaN/inf; the message names the step."""


def logits_loss_sum(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """Sum of next-token cross entropies over labelled positions, and their count, computed here
    from the logits (the default ``loss_fn``; the fast path's
    :func:`llama_pipe.train.fast.model_loss_sum` lets the model compute it, fused).

    The output layer runs only at the positions that predict a labelled token
    (:func:`llama_pipe.models.generation.target_logits`): the same sum without most of the
    ``tokens x vocabulary`` logits (the default run: 61% of the positions skipped).

    The model is called with ``attention_mask=None`` and the batch's ``position_ids`` so packed
    rows get a block-diagonal causal mask (see :mod:`llama_pipe.train.dataset`). The forward runs
    through ``model`` itself, so DDP's hooks see it.
    """
    import torch.nn.functional as F

    logits, targets = target_logits(model, batch["labels"], input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                    use_cache=False)
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


@dataclass
class StepContext:
    """Everything a training step needs (``model``/``optimizer`` as returned by ``accelerator.prepare``)."""

    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    max_grad_norm: float
    on_nonfinite: str = "stop"
    loss_fn: LossFn = field(default=logits_loss_sum)


@dataclass
class StepResult:
    """What one optimiser step did (``loss`` is the global token mean; ``skipped`` on a NaN with skip)."""

    loss: float
    grad_norm: float
    lr: float
    tokens: int
    target_tokens: int
    skipped: bool = False


def _all_ok(accelerator: Any, ok: bool) -> bool:
    """True when ``ok`` holds on every process (one tiny all-reduce when distributed)."""
    if accelerator.num_processes == 1:
        return ok
    import torch

    flag = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == 0)


def _global_sum(accelerator: Any, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    import torch

    t = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(t, reduction="sum").item())


def train_step(ctx: StepContext, micro_batches: Sequence[dict[str, Any]], global_targets: int, step: int) -> StepResult:
    """Forward/backward over this process's micro-batches, then clip and step optimiser + scheduler.

    ``global_targets`` is the number of target tokens in the step over all processes; ``step`` is
    the 1-based optimiser step (for messages). Raises :class:`NonFiniteLoss` on a NaN/inf loss or
    gradient norm unless ``on_nonfinite == 'skip'``, in which case the step is dropped.
    """
    acc, model = ctx.accelerator, ctx.model
    scale = acc.num_processes * acc.gradient_accumulation_steps / max(global_targets, 1)
    local_loss = 0.0
    tokens = 0
    skipped = False
    for j, batch in enumerate(micro_batches):
        last = j == len(micro_batches) - 1
        acc.sync_gradients = last  # accelerate's optimizer wrapper (and DeepSpeed) step only when True
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        tokens += int(batch["n_tokens"]) if "n_tokens" in batch else int(batch["input_ids"].numel())
        with contextlib.nullcontext() if last else acc.no_sync(model):
            with acc.autocast():
                loss_sum, _ = ctx.loss_fn(model, batch)
            value = float(loss_sum.detach())
            if not _all_ok(acc, math.isfinite(value)):
                if ctx.on_nonfinite == "stop":
                    raise NonFiniteLoss(
                        f"step {step}: the loss is not finite ({value} on process {acc.process_index}, "
                        f"micro-batch {j}); lower train.lr, use precision bf16/fp32 instead of fp16, or set "
                        "train.on_nonfinite: skip"
                    )
                skipped = True
            if skipped:
                # Still run a backward of zero so DDP's gradient reduction stays in step on every
                # process; the gradients are thrown away below.
                loss_sum = loss_sum.nan_to_num(0.0, 0.0, 0.0) * 0.0
            local_loss += value
            acc.backward(loss_sum * scale)
    grad_norm = float("nan")
    opt = getattr(ctx.optimizer, "optimizer", ctx.optimizer)  # accelerate wraps it
    in_backward = opt if hasattr(opt, "take_grad_norm") else None
    if not skipped:
        known = True
        if in_backward is not None:  # train.optimizer_in_backward: the hooks have updated already
            grad_norm = in_backward.take_grad_norm()
        elif ctx.max_grad_norm > 0:
            norm = acc.clip_grad_norm_(model.parameters(), ctx.max_grad_norm)
            known = norm is not None  # None under DeepSpeed, which clips inside its engine
            grad_norm = float(norm) if known else float("nan")
        else:
            grad_norm = _grad_norm(model)
        # fp16: the grad scaler handles an overflow by skipping the step itself.
        if known and not math.isfinite(grad_norm) and acc.scaler is None:
            if in_backward is not None:
                raise NonFiniteLoss(
                    f"step {step}: the gradient norm is not finite ({grad_norm}) and train.optimizer_in_backward "
                    "already applied it: the run stops here (its last checkpoint is intact); lower train.lr"
                )
            if ctx.on_nonfinite == "stop":
                raise NonFiniteLoss(
                    f"step {step}: the gradient norm is not finite ({grad_norm}); lower train.lr or set "
                    "train.on_nonfinite: skip"
                )
            skipped = True
    lr = float(ctx.scheduler.get_last_lr()[0])
    if not skipped:
        ctx.optimizer.step()
        if not acc.optimizer_step_was_skipped:  # fp16: the grad scaler skipped an overflowing step
            ctx.scheduler.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    acc.sync_gradients = True
    loss = _global_sum(acc, local_loss) / max(global_targets, 1)
    tokens = int(_global_sum(acc, float(tokens)))
    return StepResult(loss, grad_norm, lr, tokens, global_targets, skipped)


def _grad_norm(model: Any) -> float:
    import torch

    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def evaluate(ctx: StepContext, batches: Sequence[dict[str, Any]]) -> float:
    """Token-mean validation loss over this process's ``batches``, summed over all processes."""
    import torch

    acc, model = ctx.accelerator, ctx.model
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            with acc.autocast():
                loss_sum, n = ctx.loss_fn(model, batch)
            total += float(loss_sum)
            count += float(n)
    if was_training:
        model.train()
    total, count = _global_sum(acc, total), _global_sum(acc, count)
    return total / count if count else float("nan")
