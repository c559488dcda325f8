"""GPU fast path for LoRA / QLoRA / 8-bit training of Llama-family models.

One entry point, :func:`apply`, patches a loaded transformers causal LM (or the peft model
around it) in place and reports what it changed:

- ``fused_loss``: the loss is computed with the output projection, chunk by chunk, without
  full fp32 logits (:mod:`.loss`; works on CPU too, exact up to rounding);
- ``kernels``: liger-kernel's Triton RMSNorm, SwiGLU and RoPE (:mod:`.kernels`; CUDA, optional
  dependency);
- ``varlen_attention``: packed rows attend per document through PyTorch's flash varlen kernel
  instead of SDPA with a dense block mask (:mod:`.attention`; CUDA, bf16/fp16);
- ``offload_checkpoints``: where gradient checkpointing is on, each decoder layer's saved input
  goes to pinned host memory and comes back one layer ahead in the backward pass
  (:mod:`.offload`; CUDA);
- ``adapter_autocast``: the forward runs under bf16 autocast when the base computes in bf16 and
  the adapters are fp32 (peft's default; the trainer's accelerate autocast does the same), and
  peft's fp32 copy of every adapted layer's input is skipped under autocast (autocast would
  cast it straight back to bf16: same values, two full copies saved per layer and pass);
- ``fused_lora``: each peft LoRA linear runs as one autograd function with the adapter's scale
  and add folded into the GEMMs (:mod:`.lora`; plain torch, so it runs on CPU too);
- ``bf16_frozen_weights``: frozen fp32 weights (``prepare_model_for_kbit_training`` upcasts the
  embeddings, norms and head of a quantised model: nf4, or int8 under ``int8_dequant``) are stored
  in bf16, so the residual stream stays bf16 between the quantised layers instead of being cast at every layer (and 0.5 GiB less memory at 7B);

- ``int8_dequant``: an 8-bit base's layers run as dense bf16 GEMMs over weights dequantized per
  layer instead of LLM.int8 matmuls (:mod:`.int8`; ~3.9x LLM.int8's speed on the 7B case, and
  numerically closer to the unquantized model, see docs/benchmarks.md).

``torch.compile`` of the decoder MLPs was measured and left out: +4% tok/s on the 7B bf16 case,
but together with liger's SwiGLU kernel it produced wrong adapter gradients (torch 2.11; see
docs/benchmarks.md).

``kernels="auto"`` turns on what the hardware supports and does nothing on CPU; ``"none"``
leaves the model untouched. Call it after ``get_peft_model`` and after gradient checkpointing
is enabled (offloading replaces the checkpoint function of layers that already checkpoint).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch

from llama_pipe.train.fast import attention, int8, lora, offload
from llama_pipe.train.fast import kernels as kern
from llama_pipe.train.fast.loss import (
    fused_linear_cross_entropy,
    model_loss_sum,
    patch_fused_loss,
    reference_causal_lm_loss,
    supports_fused_loss,
)

__all__ = [
    "FastOptions",
    "FastReport",
    "apply",
    "model_loss_sum",
    "fused_linear_cross_entropy",
    "options_for",
    "reference_causal_lm_loss",
    "report",
]

log = logging.getLogger(__name__)

KernelsSetting = Literal["auto", "auto-fp32", "none"]


@dataclass(frozen=True)
class FastOptions:
    """Which levers :func:`apply` may use (each still checks that it can run)."""

    fused_loss: bool = True
    kernels: bool = True
    varlen_attention: bool = True
    offload_checkpoints: bool = True
    adapter_autocast: bool = True
    #: every single-adapter LoRA linear as one autograd function, scale and add fused (:mod:`.lora`).
    fused_lora: bool = True
    #: frozen fp32 weights (embeddings, norms, head upcast by prepare_model_for_kbit_training)
    #: stored in bf16, so the residual stream stays bf16 between the nf4 layers.
    bf16_frozen_weights: bool = True
    #: 8-bit base layers as dense GEMMs over weights dequantized per layer (:mod:`.int8`) instead
    #: of LLM.int8 matmuls (the int8 weights stay what is stored).
    int8_dequant: bool = True
    #: allow the levers that also run on CPU (fused loss, checkpoint function, fused LoRA, int8
    #: dequantization) on a CPU model.
    cpu: bool = False


def options_for(setting: str | FastOptions) -> FastOptions | None:
    """The levers for a ``train.kernels`` value.

    ``"auto"``: every lever. ``"auto-fp32"``:
    the same except ``bf16_frozen_weights`` (a 4-bit base keeps peft's fp32 embeddings/norms/head
    and fp32 residual stream, as the plain path does; slower and more memory, see
    docs/benchmarks.md). ``"none"``: None (leave the model alone).
    """
    if isinstance(setting, FastOptions):
        return setting
    if setting == "auto":
        return FastOptions()
    if setting == "auto-fp32":
        return FastOptions(bf16_frozen_weights=False)
    if setting == "none":
        return None
    raise ValueError(f"train.kernels must be 'auto', 'auto-fp32' or 'none', got {setting!r}")


@dataclass
class FastReport:
    """What :func:`apply` did: lever -> 'on' or the reason it is off."""

    levers: dict[str, str] = field(default_factory=dict)

    def on(self, lever: str) -> bool:
        return self.levers.get(lever) == "on"

    def describe(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in self.levers.items()) or "none"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the decoder's matmuls run in: bitsandbytes' compute dtype for a 4-bit base,
    fp16 for LLM.int8, else the dtype of the (frozen) linear weights. Not the embedding's dtype:
    ``prepare_model_for_kbit_training`` keeps embeddings and norms in fp32."""
    for module in model.modules():
        if hasattr(module, "base_layer"):  # a peft LoRA wrapper (peft names some after their base class)
            continue
        name = type(module).__name__
        if getattr(module, "fp8_base", False) is True:  # train.base_storage fp8: FP8 GEMMs with bf16 output
            return cast(torch.dtype, module.compute_dtype)
        if name == "Linear4bit" and getattr(module, "compute_dtype", None) is not None:
            return cast(torch.dtype, module.compute_dtype)
        if name == "Linear8bitLt":  # LLM.int8 runs in fp16 unless the int8_dequant lever chose a dtype
            return getattr(module, "_llama_pipe_int8_dtype", None) or torch.float16
        if isinstance(module, torch.nn.Linear) and module.weight.dtype.is_floating_point and not module.weight.requires_grad:
            return module.weight.dtype
    return next(model.parameters()).dtype


def _adapter_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}


def _skip_input_cast_under_autocast(base: torch.nn.Module) -> int:
    """peft's LoRA ``Linear`` casts each layer input to the adapter dtype (fp32) before the
    adapter matmuls, and autocast casts it straight back to bf16: two full copies of every
    adapted layer's input, per pass, for the same values (bf16 -> fp32 -> bf16 is exact). Under
    autocast this skips the first cast; without autocast peft's behaviour is unchanged."""
    import types

    n = 0
    for module in base.modules():
        if hasattr(module, "cast_input_dtype_enabled") and hasattr(module, "_cast_input_dtype"):
            if getattr(module, "_llama_pipe_cast", False):
                continue
            plain = module._cast_input_dtype

            def cast(self: torch.nn.Module, x: Any, dtype: torch.dtype, _plain: Any = plain) -> Any:
                if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
                    return x
                return _plain(x, dtype)

            module._cast_input_dtype = types.MethodType(cast, module)  # type: ignore[assignment]
            module._llama_pipe_cast = True  # type: ignore[assignment]
            n += 1
    return n


def _frozen_to(base: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast frozen fp32 floating-point weights (what ``prepare_model_for_kbit_training`` upcasts:
    embeddings, norms, output head) to ``dtype``; returns how many tensors changed."""
    n = 0
    for p in base.parameters():
        if not p.requires_grad and p.dtype == torch.float32:
            p.data = p.data.to(dtype)
            n += 1
    return n


def _wrap_autocast(base: torch.nn.Module, dtype: torch.dtype) -> None:
    import functools
    import types

    inner = base.forward
    if getattr(inner, "_llama_pipe_autocast", False):
        return

    @functools.wraps(inner)
    def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.is_autocast_enabled("cuda"):
            return inner(*args, **kwargs)
        with torch.autocast("cuda", dtype=dtype):
            return inner(*args, **kwargs)

    forward._llama_pipe_autocast = True  # type: ignore[attr-defined]
    base.forward = types.MethodType(forward, base)


def apply(model: torch.nn.Module, kernels: KernelsSetting | FastOptions = "auto") -> torch.nn.Module:
    """Patch ``model`` (a transformers causal LM, or a peft model around one) in place.

    Returns the same model; ``report(model)`` tells what was applied (also logged at INFO).
    """
    opts = options_for(kernels)
    base = _unwrap(model)
    rep = FastReport()
    if opts is None:
        rep.levers["all"] = "off (train.kernels: none)"
        base._llama_pipe_fast_report = rep  # type: ignore[assignment]
        return model
    device = _model_device(base)
    on_gpu = device.type == "cuda"
    cpu_ok = on_gpu or opts.cpu

    def lever(name: str, wanted: bool, reason_off: str | None) -> bool:
        if not wanted:
            rep.levers[name] = "off (not requested)"
            return False
        if reason_off is not None:
            rep.levers[name] = f"off ({reason_off})"
            return False
        rep.levers[name] = "on"
        return True

    has_int8 = any(type(m).__name__ == "Linear8bitLt" for m in base.modules())
    int8_off = None if has_int8 else "no 8-bit layers"
    if int8_off is None and not cpu_ok:
        int8_off = "CPU model"
    if lever("int8_dequant", opts.int8_dequant, int8_off):
        int8_dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
        rep.levers["int8_dequant"] = f"on ({int8.install(base, int8_dtype)} layers in {int8_dtype})"
    dtype = _compute_dtype(base)

    if lever("fused_loss", opts.fused_loss, supports_fused_loss(base) or (None if cpu_ok else "CPU model")):
        patch_fused_loss(base)
    if lever("kernels", opts.kernels, kern.liger_unavailable_reason() if on_gpu else "CPU model"):
        counts = kern.patch_llama_kernels(base)
        rep.levers["kernels"] = "on (" + ", ".join(f"{k} x{v}" for k, v in counts.items()) + ")"
    varlen_off = None if on_gpu and attention.varlen_available() else "needs CUDA sm80+ and torch.nn.attention.varlen"
    if varlen_off is None and dtype not in (torch.bfloat16, torch.float16):
        varlen_off = f"base computes in {dtype} (the flash varlen kernel needs bf16/fp16)"
    if lever("varlen_attention", opts.varlen_attention, varlen_off):
        attention.install(base)
    ckpt_on = any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules())
    off_reason = None if ckpt_on else "gradient checkpointing is off"
    if off_reason is None and not cpu_ok:
        off_reason = "CPU model"
    if lever("offload_checkpoints", opts.offload_checkpoints, off_reason):
        n = offload.install(base)
        rep.levers["offload_checkpoints"] = f"on ({n} layers)" if on_gpu else f"on ({n} layers, CPU: recompute only)"
    ad = _adapter_dtypes(base)
    ac_off = None
    if not on_gpu:
        ac_off = "CPU model"
    elif dtype != torch.bfloat16:
        ac_off = f"base computes in {dtype}"
    elif ad != {torch.float32}:
        ac_off = "adapters are not fp32" if ad else "no LoRA adapters"
    if lever("adapter_autocast", opts.adapter_autocast, ac_off):
        _wrap_autocast(base, torch.bfloat16)
        n = _skip_input_cast_under_autocast(base)
        rep.levers["adapter_autocast"] = f"on ({n} adapted layers skip the fp32 input copy)"
    lora_off = None if cpu_ok else "CPU model"
    if lora_off is None and not ad:
        lora_off = "no LoRA adapters"
    if lever("fused_lora", opts.fused_lora, lora_off):
        rep.levers["fused_lora"] = f"on ({lora.install(base)} layers)"
    bf_off = ac_off if ac_off else None
    if bf_off is None and not any(p.dtype == torch.float32 and not p.requires_grad for p in base.parameters()):
        bf_off = "no frozen fp32 weights"
    if lever("bf16_frozen_weights", opts.bf16_frozen_weights, bf_off):
        rep.levers["bf16_frozen_weights"] = f"on ({_frozen_to(base, torch.bfloat16)} tensors)"
    base._llama_pipe_fast_report = rep  # type: ignore[assignment]
    log.info("fast path: %s", rep.describe())
    return model


def report(model: torch.nn.Module) -> FastReport:
    """The :class:`FastReport` of the last :func:`apply` on ``model`` (empty if never applied)."""
    return getattr(_unwrap(model), "_llama_pipe_fast_report", FastReport())


def replace(opts: FastOptions, **changes: bool) -> FastOptions:
    """A copy of ``opts`` with some levers changed (for benchmarks that measure each lever)."""
    return dataclasses.replace(opts, **changes)
