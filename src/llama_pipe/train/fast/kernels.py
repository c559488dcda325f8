"""Fused Triton kernels for RMSNorm, SwiGLU and RoPE from liger-kernel, patched per instance.

liger-kernel (PyPI, optional: ``pip install 'llama-pipe[gpu]'``) ships Triton kernels that do
RMSNorm in one pass (the plain module makes four fp32 passes), silu(gate) * up in one, and the
rotary embedding of q and k in place. Only the modules of the given model are patched (their
``forward``); RoPE is a module-level function in transformers, so it is replaced by a wrapper
that takes liger's kernel only for the cos/sin tensors made by a patched model's rotary module
and the original function otherwise.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn


def liger_unavailable_reason() -> str | None:
    """None when liger-kernel can run here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if torch.cuda.get_device_capability()[0] < 8:
        return "GPU older than sm80"
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except (ImportError, RuntimeError, OSError) as e:  # not installed, or triton missing/broken
        return f"liger-kernel not importable ({type(e).__name__}: {e}); pip install 'llama-pipe[gpu]'"
    return None


def _rms_norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_rms_norm

    if not hidden_states.is_cuda:
        return cast(Callable[..., torch.Tensor], self._llama_pipe_plain_forward)(hidden_states)
    return liger_rms_norm(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", False)


def _swiglu_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_swiglu

    if not x.is_cuda:
        return cast(Callable[..., torch.Tensor], self._llama_pipe_plain_forward)(x)
    return cast(nn.Module, self.down_proj)(liger_swiglu(cast(nn.Module, self.gate_proj)(x), cast(nn.Module, self.up_proj)(x)))


def _bind(module: torch.nn.Module, fn: Any) -> None:
    if getattr(module, "_llama_pipe_plain_forward", None) is None:
        module._llama_pipe_plain_forward = module.forward  # type: ignore[assignment]
        module.forward = types.MethodType(fn, module)


#: cos tensors made by the rotary modules of patched models (id -> tensor, weakly held): the
#: module-level RoPE wrapper uses liger only for these, so an unpatched model in the same process
#: keeps transformers' function, and a layer's recompute sees the same function as its forward.
_LIGER_COS: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def _rotary_forward(
    self: torch.nn.Module, x: torch.Tensor, position_ids: torch.Tensor, *args: Any, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cast(Callable[..., tuple[torch.Tensor, torch.Tensor]], self._llama_pipe_plain_forward)(x, position_ids, *args, **kwargs)
    if cos.is_cuda:
        _LIGER_COS[id(cos)] = cos
    return cos, sin


def _patch_rope_function() -> None:
    from liger_kernel.transformers.functional import liger_rope
    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb
    if getattr(original, "_llama_pipe", False):
        return

    def apply_rotary_pos_emb(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not args and not kwargs and _LIGER_COS.get(id(cos)) is cos:
            return liger_rope(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._llama_pipe = True  # type: ignore[attr-defined]
    modeling_llama.apply_rotary_pos_emb = apply_rotary_pos_emb


def patch_llama_kernels(model: torch.nn.Module) -> dict[str, int]:
    """Patch the RMSNorm and gated-MLP modules of a Llama-family ``model``; counts what was patched."""
    counts = {"rms_norm": 0, "swiglu": 0, "rope": 0}
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and hasattr(module, "weight"):
            _bind(module, _rms_norm_forward)
            counts["rms_norm"] += 1
        elif name.endswith("MLP") and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")):
            act = getattr(getattr(module, "config", None), "hidden_act", "silu")
            if act in ("silu", "swish"):
                _bind(module, _swiglu_forward)
                counts["swiglu"] += 1
        elif name.endswith("RotaryEmbedding") and getattr(getattr(model, "config", None), "model_type", None) == "llama":
            _patch_rope_function()
            _bind(module, _rotary_forward)
            counts["rope"] += 1
    return counts
