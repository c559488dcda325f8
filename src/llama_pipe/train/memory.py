"""The trainer's side of ``train.memory``: read the card and the model, plan, apply the plan.

:mod:`llama_pipe.train.planner` is pure arithmetic; this module turns settings, the base's
``config.json`` and the accelerator into its inputs, the chosen plan back into effective
settings, keeps the planned number of decoder layers out of gradient checkpointing, and
recognises an out-of-memory error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_pipe.config import TrainSettings
from llama_pipe.core.errors import ConfigError
from llama_pipe.train import planner
from llama_pipe.train.planner import GiB, Pins, Plan, PlanError, Prediction, RunShape

log = logging.getLogger("llama_pipe.train")


@dataclass(frozen=True)
class Planned:
    """The settings the run uses, and the plan behind them (None under ``memory: manual``)."""

    settings: TrainSettings
    plan: Plan | None = None
    run: RunShape | None = None
    prediction: Prediction | None = None
    budget: int = 0
    pins: Pins = Pins()  # what the user fixed: a step-down keeps it

    @property
    def layers(self) -> int:
        return self.run.model.layers if self.run else 0


def manual(settings: TrainSettings) -> TrainSettings:
    """``memory: manual``: unset choices take their fixed defaults (no checkpointing, AdamW)."""
    return dataclasses.replace(
        settings,
        gradient_checkpointing=bool(settings.gradient_checkpointing),
        optimizer=settings.optimizer or "adamw",
        optimizer_in_backward=bool(settings.optimizer_in_backward),
    )


def with_plan(settings: TrainSettings, plan: Plan, layers: int) -> TrainSettings:
    return dataclasses.replace(
        settings, micro_batch_size=plan.micro_batch, grad_accum=plan.grad_accum,
        gradient_checkpointing=plan.keep_layers < layers, optimizer=plan.optimizer, optimizer_in_backward=plan.in_backward,
    )


def detect_gib(device: str) -> float:
    """The card's total memory (GiB), or on CPU the memory available to new allocations now."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GiB
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / GiB


def run_shape(settings: TrainSettings, seq_len: int, base: Path, device: str, processes: int, fast: bool) -> RunShape:
    """What the planner needs of a run: the model's shape (its config.json), the settings, ``seq_len`` (chat.max_seq_len)."""
    cfg_path = Path(base) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{cfg_path}: cannot read the model shape for train.memory auto ({exc}); "
                          "fix the file or set train.memory: manual") from None
    cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
    try:
        model = planner.ModelShape.from_config(cfg)
    except PlanError as exc:
        raise ConfigError(f"{cfg_path}: {exc}") from None
    s = settings
    eight_bit = device == "cuda" and _has_bitsandbytes()
    in_bwd = s.max_grad_norm == 0 and s.on_nonfinite == "stop" and s.precision != "fp16" and processes == 1
    return RunShape(model, s.base_storage, s.method, s.lora.r, tuple(s.lora.target_modules), seq_len,
                    s.micro_batch_size * s.grad_accum, s.lora.dropout, fast and device == "cuda",
                    "cuda" if device == "cuda" else "cpu", eight_bit, in_bwd, frozen_fp32=s.kernels == "auto-fp32")


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def pins(settings: TrainSettings) -> Pins:
    return Pins(settings.gradient_checkpointing, settings.optimizer, settings.optimizer_in_backward)


def cpu_note() -> str:
    """What the predicted peak is on CPU: tensors as the GPU model counts them, not the process's RSS."""
    rss, predicted = planner.CPU_RSS_MEASURED
    return (f"; on CPU that counts the training tensors as on a GPU, not the process's memory (RSS): SmolLM2-135M at "
            f"4 x 512, r16 all-linear, peaked at {rss:.2f} GiB RSS for a predicted {predicted:.2f} GiB, "
            f"{rss / predicted:.2f}x (docs/training.md)")


def plan_run(settings: TrainSettings, seq_len: int, base: Path, device: str, processes: int, sharded: bool) -> Planned:
    """Plan the run (``memory: auto``), or resolve the manual settings; logs the plan and its
    predicted peak. Raises :class:`ConfigError` (exit 2) when no plan fits."""
    if settings.memory == "manual":
        return Planned(manual(settings))
    if sharded:
        log.info("train.memory auto: not planned under FSDP/DeepSpeed (sharded weights); the settings as given")
        return Planned(manual(settings))
    run = run_shape(settings, seq_len, base, device, processes, settings.kernels != "none")
    gib = settings.gpu_memory_gib or detect_gib(device)
    budget = planner.budget_bytes(gib, run.device)
    fixed = pins(settings)
    try:
        plan, pred = planner.choose(run, budget, fixed)
    except PlanError as exc:
        raise ConfigError(str(exc)) from None
    where = f"{gib:.1f} GiB {'card' if run.device == 'cuda' else 'of system memory available'}"
    log.info("train.memory auto: %s on a %s, predicted peak %s%s", plan.describe(run.model.layers), where, pred.describe(),
             cpu_note() if run.device == "cpu" else "")
    return Planned(with_plan(settings, plan, run.model.layers), plan, run, pred, budget, fixed)


def step_down(planned: Planned) -> Planned | None:
    """The plan after an out-of-memory error (same optimiser), or None when there is none smaller."""
    if planned.plan is None or planned.run is None:
        return None
    nxt = planner.step_down(planned.run, planned.plan, planned.pins)
    if nxt is None:
        return None
    return Planned(with_plan(planned.settings, nxt, planned.layers), nxt, planned.run,
                   planner.predict(planned.run, nxt), planned.budget, planned.pins)


def keep_layers(model: Any, keep: int) -> int:
    """Turn gradient checkpointing off in the last ``keep`` checkpointed decoder layers (their
    activations stay for the backward pass); returns how many layers still checkpoint. Call it
    after checkpointing is enabled and before the fast path installs its offloading."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True
              and hasattr(m, "_gradient_checkpointing_func")]
    for m in layers[len(layers) - keep:] if keep > 0 else []:
        m.gradient_checkpointing = False
    return len(layers) - min(keep, len(layers))


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error of the accelerator's allocator."""
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
