"""Build the model to train: the base as ``train.base_storage`` holds it, trained as ``train.method`` says.

==========================  ===========================================  ====================================
base_storage / method       base weights                                  trained
==========================  ===========================================  ====================================
``float`` / lora, dora      float (bf16 with bf16 precision, fp16 with     LoRA (DoRA) matrices, kept in fp32
                            fp16, else fp32), frozen
``nf4`` / lora, dora        bitsandbytes NF4, double quantisation,         LoRA (DoRA) matrices; compute dtype
(QLoRA)                     frozen                                         bf16 on a GPU, fp32 on CPU
``int8`` / lora, dora       bitsandbytes LLM.int8, frozen                  LoRA (DoRA) matrices
``fp8`` / lora              decoder linears e4m3 + per-channel scales,     LoRA matrices, kept in fp32
                            FP8 GEMMs (:mod:`llama_pipe.train.fp8`);
                            embeddings, norms, head bf16; frozen
``float`` / full            fp32 master weights (autocast does bf16/fp16)  every parameter
==========================  ===========================================  ====================================

:func:`build_model` is the one place that knows these rules; the training loop receives a plain
``torch.nn.Module`` whose trainable parameters are the ones to optimise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from llama_pipe.config import LoraSettings, TrainSettings
from llama_pipe.core.errors import ConfigError, InputError
from llama_pipe.models.model_dir import check_model_dir

log = logging.getLogger(__name__)


def resolve_precision(precision: str, device_type: str) -> str:
    """``auto`` -> ``bf16`` on a CUDA device that supports it, else ``fp32``; checks explicit choices."""
    import torch

    if precision == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device_type != "cuda":
        raise ConfigError("train.precision: fp16 needs a CUDA device (use fp32 or bf16 on CPU)")
    return precision


def compute_dtype(precision: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def lora_config(lora: LoraSettings, dora: bool = False) -> Any:
    """The peft ``LoraConfig`` for our settings (``dora``: train.method dora; ``['all-linear']`` becomes peft's ``'all-linear'``)."""
    from peft import LoraConfig

    targets: Any = list(lora.target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
    elif "all-linear" in targets:
        raise ConfigError("train.lora.target_modules: 'all-linear' cannot be combined with module names")
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        use_rslora=lora.rslora,
        use_dora=dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_model(base_dir: str | Path, settings: TrainSettings, device: Any, precision: str) -> Any:
    """Load the base from ``base_dir`` as ``settings.base_storage`` and attach the ``settings.method`` adapter.

    ``device`` is where quantised weights are placed (bitsandbytes layers cannot be moved after
    loading: ``accelerator.device``, i.e. ``cuda:<local rank>`` under DDP); float weights are loaded
    on the CPU and moved by ``accelerator.prepare``. Seed the RNG before calling: the LoRA A
    matrices are initialised randomly.
    """
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base_dir = Path(base_dir)
    check_model_dir(base_dir, "base model", settings.trust_remote_code)  # train checked it; a direct caller (bench) gets it here
    device = torch.device(device)
    # bitsandbytes layers are placed at load time: a GPU index (the local rank's) or "cpu".
    placement: Any = (device.index or 0) if device.type == "cuda" else "cpu"
    dtype = compute_dtype(precision)
    kwargs: dict[str, Any] = {
        "attn_implementation": settings.attn_implementation,
        "use_safetensors": True,
    }
    storage, method = settings.base_storage, settings.method
    if method == "full" and storage != "float":  # config.checks says so at load; a direct caller gets it here
        raise ConfigError(f"train.method full needs base_storage float, not {storage}")
    if storage == "fp8":
        from llama_pipe.train import fp8

        if method != "lora":
            raise ConfigError(f"train.base_storage: fp8 trains LoRA adapters (method lora), not {method}")
        fp8.check_supported(device, precision)  # CPU, a GPU without FP8 tensor cores, a precision other than bf16
    if storage == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["dtype"] = dtype if precision != "fp32" else torch.float32
        kwargs["device_map"] = {"": placement}
    elif storage == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["dtype"] = torch.float16 if device.type == "cuda" else torch.float32
        kwargs["device_map"] = {"": placement}
    elif method != "full":
        kwargs["dtype"] = dtype  # frozen base in the compute dtype; peft keeps the adapter in fp32
    else:  # full: fp32 master weights, autocast provides the low-precision compute
        kwargs["dtype"] = torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), trust_remote_code=settings.trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        raise InputError(f"{base_dir}: cannot load the base model (base_storage {storage}): {exc}") from exc
    model.config.use_cache = False
    restore_fp32_rope(model)

    if storage == "nf4":
        _keep_cpu_4bit_trainable(model)
    if storage == "fp8":  # each decoder linear quantized on the GPU, its float weight freed; the rest moves with prepare
        done, kept = fp8.convert_model(model, device, dtype)
        log.info("base_storage fp8: %d linear layers held in e4m3 on %s (%d left in %s)", done, device, kept, dtype)
    gc_kwargs = {"use_reentrant": False}
    if storage in ("nf4", "int8"):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=settings.gradient_checkpointing,
            gradient_checkpointing_kwargs=gc_kwargs,
        )
    elif settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)

    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    from peft import get_peft_model

    try:
        model = get_peft_model(model, lora_config(settings.lora, dora=method == "dora"))
    except ValueError as exc:
        raise ConfigError(f"train.lora: {exc}") from None
    return model


def restore_fp32_rope(model: Any) -> int:
    """Recompute rotary-embedding buffers (``inv_freq``) in fp32 where loading left them lower.

    Under DeepSpeed ZeRO-3, transformers builds the model inside ``deepspeed.zero.Init``, which
    makes every floating tensor created there bf16/fp16 - the non-persistent RoPE
    ``inv_freq`` too (seen with transformers 5.17: 0.37% relative error, so the rotation angle
    at position 1000 is off by up to ~3.7 rad). The rotary module is rebuilt from its config
    outside that context and its buffers copied over. Returns the number of modules fixed.
    """
    import torch

    fixed, was = 0, None
    for module in model.modules():
        inv = module._buffers.get("inv_freq")
        if inv is None or inv.dtype == torch.float32 or not hasattr(module, "config"):
            continue
        try:
            fresh = type(module)(module.config)
        except (TypeError, ValueError) as exc:  # a rotary class built differently: leave it, say so
            log.warning("rotary embedding %s keeps a %s inv_freq (cannot rebuild it: %s)", type(module).__name__, inv.dtype, exc)
            continue
        for name, buf in fresh.named_buffers(recurse=False):
            if name in module._buffers:
                module._buffers[name] = buf.to(inv.device)
        if hasattr(fresh, "attention_scaling"):
            module.attention_scaling = fresh.attention_scaling
        fixed, was = fixed + 1, inv.dtype
    if fixed:
        log.info("rotary embeddings: recomputed inv_freq in fp32 in %d module(s) (the loader made it %s)", fixed, was)
    return fixed


def _keep_cpu_4bit_trainable(model: Any) -> None:
    """Stop bitsandbytes (0.50, CPU with AVX512-BF16) repacking 4-bit weights for inference.

    On the first forward in eval mode without gradients (our validation pass), ``Linear4bit``
    converts its weight in place to a CPU inference layout whose matmul has no autograd kernel;
    every later training step then gets zero gradients (found by the all-zero ``lora_B`` check of
    :func:`llama_pipe.train.output.verify_adapter`). The flag that enables the repacking is
    switched off; CUDA is unaffected.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as stored elements x 2."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 leaves each process an empty placeholder
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
