"""8-bit base layers computed as plain GEMMs over weights dequantized on the fly.

bitsandbytes' LLM.int8 (``Linear8bitLt``) quantizes every activation row to int8, splits out
outlier columns, and runs an int8 matmul plus an fp16 one for the outliers - for each pass. The
weights stay int8 in memory either way; what this lever changes is only the arithmetic: each
layer dequantizes its int8 weight (``CB * SCB / 127``, row-wise absmax scales) into the compute
dtype and runs one dense GEMM. That is closer to the unquantized model than LLM.int8 itself
(no activation quantization) and uses the GPU's bf16 tensor cores.

Memory: the dequantized weight lives only inside the forward and the backward of its own layer
(a custom autograd function saves the int8 weight and its scales, not the dense copy), so at
most one layer's dense weight (~90 MB for a 7B MLP projection) exists at a time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _scales(module: torch.nn.Module) -> torch.Tensor | None:
    """The row-wise absmax scales of a ``Linear8bitLt``: on the weight until its first forward,
    on ``module.state`` after it (bitsandbytes moves them there)."""
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    return scb


def dequantize(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``cb * scb / 127`` row by row, computed in fp32 and rounded once to ``dtype``."""
    return (cb.float() * (scb.float() / 127.0).unsqueeze(1)).to(dtype)


class _DequantLinear(torch.autograd.Function):
    """``y = x @ dequantize(cb, scb).T + bias`` with a frozen weight; saves only int8 + scales."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        w = dequantize(cb, scb, dtype)
        ctx.save_for_backward(cb, scb)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        cb, scb = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad.to(ctx.dtype) @ dequantize(cb, scb, ctx.dtype)).to(ctx.x_dtype)
        return grad_x, None, None, None, None


def _forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    scb = _scales(module)
    return _DequantLinear.apply(x, module.weight.data, scb, module.bias, module._llama_pipe_int8_dtype)


def install(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Route every frozen ``Linear8bitLt`` of ``model`` through :class:`_DequantLinear` in ``dtype``.

    Layers that keep fp16 master weights (``has_fp16_weights``), or whose scales cannot be found,
    are left to bitsandbytes. Returns the number of layers changed.
    """
    import types

    from bitsandbytes.nn import Linear8bitLt  # the base layer, not peft's LoRA wrapper of the same name

    n = 0
    for module in model.modules():
        if not isinstance(module, Linear8bitLt) or getattr(module, "_llama_pipe_int8_dtype", None) is not None:
            continue
        state = getattr(module, "state", None)
        if getattr(state, "has_fp16_weights", True) or module.weight.dtype != torch.int8 or _scales(module) is None:
            continue
        module._llama_pipe_int8_dtype = dtype  # type: ignore[assignment]
        module.forward = types.MethodType(_forward, module)  # type: ignore[method-assign]
        n += 1
    return n
