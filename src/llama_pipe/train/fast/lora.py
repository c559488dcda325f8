"""LoRA layers as one autograd function each: base GEMM + adapter, scale and add fused.

peft computes an adapted projection as ``base(x) + lora_B(lora_A(dropout(x))) * scaling``:
the base GEMM, two thin GEMMs, then a separate scale and a separate add over the full
``tokens x out`` output, and in the backward the same again (the scale's backward, two
gradient sums over ``tokens x in``). On a 7B step those elementwise passes over full-width
tensors cost about a tenth of the GPU time. :class:`LoraLinearFunction` computes the same
function with the scale and the add folded into GEMM epilogues (``addmm`` with ``alpha``):

forward:  ``y = x W^T``; ``xa = drop(x) A^T``; ``y += s * xa B^T`` (one ``addmm_``)
backward: ``gb = g B``; ``dB = s g^T xa``; ``dA = s gb^T drop(x)``; ``dx = g W + s gb A`` (one
``addmm_``; with dropout the adapter term is masked first)

The frozen weight ``W`` is the base layer's own bf16 weight, or is dequantized inside the
forward and again inside the backward for a 4-bit (bitsandbytes nf4/fp4) base or an 8-bit base
under the ``int8_dequant`` lever, as bitsandbytes itself does: no dense copy outlives the call.
Over an fp8 base (:class:`llama_pipe.train.fp8.Fp8Linear`) no dense weight is made at all: ``x W^T``
and ``g W`` are the layer's own FP8 GEMMs (``fp8_mm``, ``fp8_dgrad``).
Saved for the backward: the layer input (which checkpointing holds anyway), the ``tokens x r``
adapter activation, and the dropout mask as booleans when dropout is on.

Numerics: all GEMMs run in the base's compute dtype with the adapter weights cast to it, as
autocast does on peft's path; the gradients of the fp32 adapter weights come back in fp32.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from llama_pipe.train.fast.int8 import _scales, dequantize

if TYPE_CHECKING:
    from bitsandbytes.nn import Params4bit
    from peft.tuners.lora import LoraLayer


def _frozen_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight as a dense ``out x in`` tensor in ``dtype``."""
    name = type(base).__name__
    if getattr(base, "fp8_base", False) is True:  # train.base_storage fp8 (llama_pipe.train.fp8)
        return cast(torch.Tensor, cast(Any, base).dequantized(dtype))
    if name == "Linear4bit":
        import bitsandbytes.functional as bnbf

        weight = cast("Params4bit", base.weight)
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    if name == "Linear8bitLt":  # only under int8_dequant, which int8.install turns on only where the scales exist
        return dequantize(cast(torch.Tensor, base.weight).data, cast(torch.Tensor, _scales(base)), dtype)
    return cast(torch.Tensor, base.weight).to(dtype)


def base_compute_dtype(base: nn.Module) -> torch.dtype | None:
    """The dtype the fused function computes in for ``base``, or None when it cannot take it:
    a plain ``nn.Linear`` (its weight dtype), a bitsandbytes 4-bit layer (its compute dtype), or
    an 8-bit layer only under the ``int8_dequant`` lever (LLM.int8 itself is left alone)."""
    name = type(base).__name__
    if getattr(base, "fp8_base", False) is True:  # its products run on FP8 tensor cores, output in compute_dtype
        return cast(torch.dtype, base.compute_dtype)
    if name == "Linear4bit":
        qs = getattr(base.weight, "quant_state", None)
        if qs is None:
            return None
        return getattr(base, "compute_dtype", None) or qs.dtype
    if name == "Linear8bitLt":
        return getattr(base, "_llama_pipe_int8_dtype", None)
    if isinstance(base, nn.Linear) and base.weight.dtype.is_floating_point and not base.weight.requires_grad:
        return base.weight.dtype
    return None


class LoraLinearFunction(torch.autograd.Function):
    """``base(x) + scale * B(A(dropout_p(x)))`` for a frozen base layer and trainable ``A``, ``B``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, base: nn.Module,
                scale: float, p: float, dtype: torch.dtype) -> torch.Tensor:
        lead, n_in = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, n_in).to(dtype)
        fp8 = getattr(base, "fp8_base", False) is True  # FP8 GEMMs over e4m3 weights (llama_pipe.train.fp8): no dense w
        w = None if fp8 else _frozen_weight(base, dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        bias = getattr(base, "bias", None)
        if w is None:
            y = cast(Any, base).fp8_mm(x2)
        else:
            y = x2 @ w.t() if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
        mask = None
        if p > 0.0:
            mask = torch.rand_like(x2, dtype=torch.float32) >= p
            xd = x2 * mask * (1.0 / (1.0 - p))
        else:
            xd = x2
        xa = xd @ a.t()
        y.addmm_(xa, b.t(), alpha=scale)
        ctx.save_for_backward(x2, xa, a, b, mask, w if w is getattr(base, "weight", None) else None)
        ctx.base, ctx.scale, ctx.p, ctx.dtype = base, scale, p, dtype
        ctx.x_dtype, ctx.a_dtype, ctx.b_dtype = x.dtype, lora_a.dtype, lora_b.dtype
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x2, xa, a, b, mask, w = ctx.saved_tensors
        s, p, dtype = ctx.scale, ctx.p, ctx.dtype
        g = grad.reshape(-1, grad.shape[-1]).to(dtype)
        gb = g @ b  # tokens x r
        xd = x2 if mask is None else x2 * mask * (1.0 / (1.0 - p))
        grad_a = grad_b = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_a = torch.mm(gb.t(), xd).mul_(s).to(ctx.a_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.mm(g.t(), xa).mul_(s).to(ctx.b_dtype)
        if ctx.needs_input_grad[0]:
            if getattr(ctx.base, "fp8_base", False) is True:
                grad_x = ctx.base.fp8_dgrad(g)
            else:
                if w is None:
                    w = _frozen_weight(ctx.base, dtype)
                grad_x = g @ w
            if mask is None:
                grad_x.addmm_(gb, a, alpha=s)
            else:
                grad_x.add_((gb @ a).mul_(mask).mul_(s / (1.0 - p)))
            grad_x = grad_x.view(*grad.shape[:-1], x2.shape[-1]).to(ctx.x_dtype)
        return grad_x, grad_a, grad_b, None, None, None, None


def _fusable(layer: LoraLayer) -> str | None:
    """Why peft LoRA layer ``layer`` cannot take the fused forward, or None when it can."""
    if len(layer.active_adapters) != 1:
        return "several active adapters"
    name = layer.active_adapters[0]
    if name not in layer.lora_A:
        return "adapter not on this layer"
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return "DoRA/variant adapter"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    a, b = layer.lora_A[name], layer.lora_B[name]
    if not isinstance(a, nn.Linear) or not isinstance(b, nn.Linear) or a.bias is not None or b.bias is not None:
        return "adapter is not two bias-free linears"
    if not isinstance(layer.lora_dropout[name], (nn.Dropout, nn.Identity)):
        return "custom dropout"
    if base_compute_dtype(layer.get_base_layer()) is None:
        return f"base layer {type(layer.get_base_layer()).__name__} not supported"
    return None


def _fused_forward(self: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's forward, through :class:`LoraLinearFunction` in the plain single-adapter case."""
    if args or kwargs or self.disable_adapters or self.merged or _fusable(self) is not None:
        return self._llama_pipe_peft_forward(x, *args, **kwargs)  # type: ignore[attr-defined]
    name = self.active_adapters[0]
    drop = self.lora_dropout[name]
    p = float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0
    base = self.get_base_layer()
    return LoraLinearFunction.apply(x, self.lora_A[name].weight, self.lora_B[name].weight, base,
                                    float(self.scaling[name]), p, base_compute_dtype(base))


def install(model: nn.Module) -> int:
    """Give every fusable peft LoRA linear of ``model`` the fused forward; returns how many.

    Layers it cannot take (several adapters, DoRA, LLM.int8 bases, ...) keep peft's forward, and
    a layer whose state changes later (adapters disabled or merged) falls back to it per call.
    """
    from peft.tuners.lora import LoraLayer

    n = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A"):
            continue
        if getattr(module, "_llama_pipe_peft_forward", None) is not None or _fusable(module) is not None:
            continue
        module._llama_pipe_peft_forward = module.forward  # type: ignore[assignment]
        module.forward = types.MethodType(_fused_forward, module)
        n += 1
    return n
