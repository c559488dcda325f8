"""The trainer's build: an accelerator, then a model ready to step (the adapter or the full model on
its base, layers kept from recompute, optimiser, schedule, the fast path, the step context).

:func:`build_session` is what ``llama-pipe train`` builds once per attempt
(:class:`llama_pipe.train.train.TrainRun`), and what ``bench/`` builds to time steps: one
definition of "the trainer's model", so a benchmark measures what a run computes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_pipe.config import TrainSettings
from llama_pipe.core.errors import ConfigError
from llama_pipe.train import fast
from llama_pipe.train.memory import keep_layers
from llama_pipe.train.model import build_model, count_parameters, resolve_precision
from llama_pipe.train.optim import fused_adamw_ok, make_optimizer
from llama_pipe.train.step import StepContext, logits_loss_sum

log = logging.getLogger("llama_pipe.train")


@dataclass
class Session:
    """A prepared model and everything a step needs (:func:`llama_pipe.train.step.train_step` takes ``ctx``)."""

    model: Any
    optimizer: Any
    scheduler: Any
    ctx: StepContext
    trainable: int
    n_params: int


def make_accelerator(settings: TrainSettings) -> tuple[Any, str]:
    """An ``Accelerator`` for ``settings.device``/``precision`` (DDP/FSDP/DeepSpeed come from the launcher)."""
    import torch
    from accelerate import Accelerator

    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA GPU is visible")
    cpu = settings.device == "cpu" or not torch.cuda.is_available()
    precision = resolve_precision(settings.precision, "cpu" if cpu else "cuda")
    acc = Accelerator(
        cpu=cpu,
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision],
        gradient_accumulation_steps=settings.grad_accum,
    )
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is not None:  # no dataloader is prepared, so DeepSpeed's "auto" values come from us
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = settings.micro_batch_size
        ds["gradient_accumulation_steps"] = settings.grad_accum
        ds["gradient_clipping"] = settings.max_grad_norm
        ds["train_batch_size"] = settings.micro_batch_size * settings.grad_accum * acc.num_processes
    return acc, precision


def lr_lambda_for(total: int, warmup: int, min_ratio: float) -> Any:
    """Linear warm-up to 1, then cosine down to ``min_ratio`` at step ``total``."""
    import math

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        span = max(total - warmup, 1)
        progress = min(max(step - warmup, 0) / span, 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def apply_fast_path(acc: Any, model: Any, settings: TrainSettings, options: fast.FastOptions | None = None) -> Any:
    """Patch the prepared model with ``train.kernels`` (GPU only); returns its loss function or None.

    Must run after the model is on its device and gradient checkpointing is enabled. On one
    GPU and under DDP (every process holds the whole model and the loss is computed inside the
    wrapped forward); left off under FSDP and DeepSpeed, whose sharded parameters it was never
    checked with. ``options`` (tests and benchmarks) replaces what ``train.kernels`` asks for,
    on CPU too (``FastOptions(cpu=True)`` turns on the levers that run there).
    """
    from accelerate.utils import DistributedType

    wanted: fast.FastOptions | fast.KernelsSetting = options if options is not None else settings.kernels
    if options is None and (settings.kernels == "none" or acc.device.type != "cuda"):
        return None
    if acc.num_processes > 1 and acc.distributed_type != DistributedType.MULTI_GPU:
        log.info("train.kernels=%s left off: the fast path runs on one GPU or under DDP, not under %s",
                 settings.kernels, acc.distributed_type)
        return None
    inner = acc.unwrap_model(model)
    fast.apply(inner, wanted)
    log.info("fast path: %s", fast.report(inner).describe())
    return fast.model_loss_sum


def build_session(acc: Any, base: str | Path, settings: TrainSettings, precision: str, total: int, keep: int | None = None,
                  loss_fn: Any = None, fast_options: fast.FastOptions | None = None) -> Session:
    """Build the model of ``settings`` over ``base`` on ``acc``'s device and prepare it to step.

    ``total``: the run's steps (the learning-rate schedule's length). ``keep``: decoder layers kept
    from recompute under gradient checkpointing (the memory plan's; None: recompute all).
    ``loss_fn``: the step's loss (tests); None: the fast path's when it is on, else the plain one.
    ``fast_options``: the fast path's levers instead of ``train.kernels`` (:func:`apply_fast_path`).
    """
    import torch

    model = build_model(base, settings, acc.device, precision)
    if keep is not None and settings.gradient_checkpointing:
        keep_layers(model, keep)
    trainable, n_params = count_parameters(model)
    log.info("%s over a %s base: %d trainable of %d parameters (%.3f%%)", settings.method, settings.base_storage,
             trainable, n_params, 100 * trainable / max(n_params, 1))
    optimizer = make_optimizer(model, settings, fused=fused_adamw_ok(acc))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(total, settings.warmup_steps, settings.min_lr_ratio))
    model, optimizer = acc.prepare(model, optimizer)
    # The scheduler's state goes into trainer_state.json, not through accelerate's
    # register_for_checkpointing: accelerate reloads registered objects with an unrestricted
    # pickle (weights_only=False), which would run code planted in a checkpoint directory.
    step_loss = loss_fn or apply_fast_path(acc, model, settings, fast_options)
    model.train()
    ctx = StepContext(acc, model, optimizer, scheduler, settings.max_grad_norm, settings.on_nonfinite, step_loss or logits_loss_sum)
    return Session(model, optimizer, scheduler, ctx, trainable, n_params)
