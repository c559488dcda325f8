"""The trainer's optimiser: AdamW (torch's or bitsandbytes' 8-bit), optionally run in the backward.

``train.optimizer_in_backward`` applies the optimiser to each trainable tensor as soon as its
gradient is complete (a post-accumulate-grad hook) and frees that gradient at once, so the
gradients of all adapters never exist together: at 7B with r64 all-linear adapters that is
0.6 GiB of fp32 gradients less at the peak, which sits at the end of the backward pass. The
update is the same AdamW update; what it gives up is what needs every gradient before any
update: clipping by the global norm, gradient accumulation over micro-batches, and DDP's
all-reduce (one process only), and fp16's gradient scaler. Each tensor gets its own optimiser instance; one
:class:`InBackwardOptimizer` presents them to the trainer, the LR scheduler and checkpoints as a
single optimiser with one parameter group per tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from llama_pipe.config import TrainSettings
from llama_pipe.config.checks import train_errors
from llama_pipe.core.errors import ConfigError


def fused_adamw_ok(acc: Any) -> bool:
    """Whether torch's fused (single-kernel) AdamW applies: CUDA, one process or DDP. It updates
    in place, where the default multi-tensor AdamW allocates temporaries the size of all trainable
    parameters (0.6 GiB for r64 all-linear adapters at 7B); FSDP/DeepSpeed keep the default."""
    from accelerate.utils import DistributedType

    return acc.device.type == "cuda" and acc.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU)


def _param_groups(model: Any, settings: TrainSettings) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on norms, biases or DoRA magnitudes)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _factory(settings: TrainSettings, fused: bool) -> Callable[[list[dict[str, Any]]], torch.optim.Optimizer]:
    kwargs: dict[str, Any] = {"lr": settings.lr, "betas": (0.9, 0.999), "eps": 1e-8}
    if settings.optimizer in (None, "adamw"):  # None: unplanned (memory: manual resolves it to adamw)
        if fused:
            kwargs["fused"] = True
        return lambda groups: torch.optim.AdamW(groups, **kwargs)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if settings.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return lambda groups: cls(groups, **kwargs)


def make_optimizer(model: Any, settings: TrainSettings, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW per ``train.optimizer`` (torch's, or bitsandbytes' 8-bit / paged 8-bit) over the
    trainable parameters; ``fused``: torch's AdamW as its fused kernel (see :func:`fused_adamw_ok`).
    With ``train.optimizer_in_backward`` an :class:`InBackwardOptimizer` (hooks installed)."""
    factory = _factory(settings, fused)
    groups = _param_groups(model, settings)
    if settings.optimizer_in_backward:
        return InBackwardOptimizer(groups, factory)
    return factory(groups)


def check_optimizer(settings: TrainSettings, acc: Any) -> None:
    """Refuse optimiser choices that cannot run here, before any weights are loaded."""
    from accelerate.utils import DistributedType

    # the same cross-field checks the workflow runs when the Snakefile loads
    errors = train_errors(settings, processes=acc.num_processes)
    if errors:
        raise ConfigError("\n  ".join(errors))
    if settings.optimizer in (None, "adamw"):  # None: unplanned (memory: manual resolves it to adamw)
        return
    if settings.optimizer == "paged_adamw_8bit" and acc.device.type != "cuda":
        raise ConfigError("train.optimizer: paged_adamw_8bit pages through CUDA memory; use adamw_8bit or adamw on CPU")
    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError(
            f"train.optimizer: {settings.optimizer} runs on one process or under DDP; under {acc.distributed_type} "
            "the optimiser state is sharded by the launcher (use adamw)"
        )


class InBackwardOptimizer(torch.optim.Optimizer):
    """One optimiser per trainable tensor, each stepped by a hook the moment the tensor's gradient
    is accumulated; the gradient is freed right after.

    To the trainer it is one optimiser: ``param_groups`` are the inner optimisers' own group dicts
    (so an LR scheduler's writes reach them), ``step()`` and ``zero_grad()`` have nothing left to
    do, ``state_dict()`` has torch's layout with one group per tensor. :meth:`take_grad_norm`
    returns the global gradient norm of the last backward (squares summed on the device, in the
    hooks, as each gradient goes by).
    """

    def __init__(self, groups: list[dict[str, Any]], factory: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]):
        self.inner: list[torch.optim.Optimizer] = []
        params: list[torch.nn.Parameter] = []
        for group in groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                self.inner.append(factory([{**options, "params": [p]}]))
                params.append(p)
        if not params:
            raise ValueError("no trainable parameters")
        super().__init__(params, dict(self.inner[0].defaults))
        self.param_groups = [opt.param_groups[0] for opt in self.inner]
        self._sq: torch.Tensor | None = None
        for p, opt in zip(params, self.inner):
            p.register_post_accumulate_grad_hook(self._hook(opt))

    def _hook(self, opt: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        def step_now(p: torch.Tensor) -> None:
            assert p.grad is not None  # a post-accumulate-grad hook runs once the gradient is there
            sq = torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32).square()
            self._sq = sq if self._sq is None else self._sq + sq.to(self._sq.device)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step_now

    def take_grad_norm(self) -> float:
        """The global gradient norm of the updates since the last call (0.0 if there were none)."""
        sq, self._sq = self._sq, None
        return 0.0 if sq is None else float(sq.sqrt())

    def step(self, closure: Any = None) -> Any:  # the hooks already stepped
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.inner:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        groups = []
        for i, opt in enumerate(self.inner):
            sd = opt.state_dict()
            if 0 in sd["state"]:
                state[i] = sd["state"][0]
            groups.append({**sd["param_groups"][0], "params": [i]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.inner):
            raise ValueError(f"optimiser state has {len(groups)} parameter groups, this model {len(self.inner)}")
        for i, (opt, group) in enumerate(zip(self.inner, groups)):
            st = state_dict["state"].get(i, state_dict["state"].get(str(i)))
            opt.load_state_dict({"state": {0: st} if st is not None else {}, "param_groups": [{**group, "params": [0]}]})
        self.param_groups = [opt.param_groups[0] for opt in self.inner]
