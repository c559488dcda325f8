"""Settings of training: ``train`` (with its ``lora`` block), ``launch`` and ``select`` (which checkpoint is kept)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llama_pipe.config.section import section
from llama_pipe.core.settings import SEED_MAX, opt


@dataclass
class LoraSettings:
    """LoRA adapter shape."""

    r: int = opt(16, "rank", minimum=1)
    alpha: int = opt(32, "scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)", minimum=1)
    dropout: float = opt(0.05, "dropout on the adapter input", minimum=0, maximum=1)
    target_modules: list[str] = opt(
        ["all-linear"], "module names to adapt (e.g. [q_proj, v_proj]), or ['all-linear'] (every linear layer but lm_head)", minLength=1
    )
    rslora: bool = opt(False, "rank-stabilised scaling")


@section("train", "train stage")
@dataclass
class TrainSettings:
    """``train``: LoRA / QLoRA / 8-bit / full fine-tuning."""

    run: str = opt(
        "default",
        "run name: the workflow writes this run's products to results/<run>/ (train, merged, eval, report)",
        pattern=r"^(?!\.\.?$)[A-Za-z0-9_.-]+$",
    )
    base_run: str | None = opt(
        None,
        "workflow only: train on the merged model of this earlier run (results/<base_run>/merged, made by that run's own "
        "snakemake call) instead of results/hf_base, and merge this run's adapter into it: run B over run A chains "
        "fine-tunes soundly (docs/workflow.md); null: the base",
        pattern=r"^(?!\.\.?$)[A-Za-z0-9_.-]+$",
    )
    method: Literal["lora", "dora", "full"] = opt(
        "lora", "what is trained: lora (low-rank adapters), dora (weight-decomposed LoRA) or full (every weight)"
    )
    base_storage: Literal["float", "nf4", "int8", "fp8"] = opt(
        "float", "how the frozen base is held while adapters train: float (the compute precision), nf4 (4-bit, "
        "QLoRA), int8 (LLM.int8) or fp8 (e4m3 with per-channel scales, products on FP8 tensor cores: a CUDA GPU of "
        "compute capability 8.9+ such as the H100, precision bf16, method lora; docs/training.md); nf4 and int8 need "
        "bitsandbytes and method lora or dora"
    )
    lora: LoraSettings = opt(LoraSettings, "adapter settings (methods lora and dora)")
    packing: bool = opt(True, "pack several conversations into one row (no attention across them)")
    micro_batch_size: int = opt(
        4, "rows per forward pass (memory: auto may split micro_batch_size x grad_accum, the rows of a step, into "
        "smaller micro-batches; the step stays the same)", minimum=1,
    )
    grad_accum: int = opt(1, "micro-batches per optimiser step", minimum=1)
    lr: float = opt(
        2e-3, "peak learning rate (2e-3: a few steps teach SmolLM2-135M its name; 1e-2 suits the tiny demo model; use ~2e-4 "
        "for LoRA on a real 7B)", exclusiveMinimum=0,
    )
    weight_decay: float = opt(0.0, "AdamW weight decay", minimum=0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] | None = opt(
        None,
        "null: chosen by the memory planner (memory: auto), adamw under memory: manual; "
        "adamw (torch); adamw_8bit keeps both moment estimates in 8 bits (bitsandbytes, blockwise; tensors of "
        ">= 4096 elements), a quarter of the fp32 state memory; paged_adamw_8bit also lets them page to host "
        "memory under pressure (CUDA only). 8-bit ones run on one process or under DDP",
    )
    optimizer_in_backward: bool | None = opt(
        None,
        "null: chosen by the memory planner (memory: auto), false under memory: manual; true: update each "
        "trainable tensor as soon as its gradient is complete and free that gradient (all "
        "gradients never exist at once: less peak memory, e.g. 0.6 GiB for r64 all-linear adapters at 7B); "
        "needs max_grad_norm 0, grad_accum 1, on_nonfinite stop, precision other than fp16 and one process",
    )
    warmup_steps: int = opt(2, "linear warm-up steps", minimum=0)
    min_lr_ratio: float = opt(0.1, "cosine schedule ends at lr * this", minimum=0, maximum=1)
    max_steps: int | None = opt(12, "optimiser steps; null trains for `epochs`", minimum=1)
    epochs: float = opt(1.0, "epochs when max_steps is null", exclusiveMinimum=0)
    max_grad_norm: float = opt(1.0, "gradient clipping; 0 disables", minimum=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt(
        "auto", "compute precision; auto = bf16 on a GPU that supports it, else fp32"
    )
    gradient_checkpointing: bool | None = opt(
        None, "recompute activations in the backward pass; null: chosen by the memory planner (memory: auto, which "
        "may also keep some layers' activations), false under memory: manual"
    )
    memory: Literal["auto", "manual"] = opt(
        "auto",
        "auto: before training, plan micro-batch split, gradient checkpointing and optimiser state to the fastest "
        "plan whose predicted peak fits gpu_memory_gib with a margin (logged), and after an out-of-memory error step "
        "the plan down once and resume from the last checkpoint; manual: the settings as given",
    )
    gpu_memory_gib: float | None = opt(
        None, "memory the planner may plan for, in GiB; null: the detected card (on CPU: the system memory available)",
        exclusiveMinimum=0,
    )
    eval_every: int = opt(12, "validation loss every N steps (and at start and end)", minimum=1)
    save_every: int = opt(6, "checkpoint every N steps", minimum=1)
    keep_checkpoints: int = opt(2, "checkpoints kept (oldest deleted)", minimum=1)
    resume: Literal["auto", "never"] = opt("auto", "continue from the newest valid checkpoint")
    on_nonfinite: Literal["stop", "skip"] = opt("stop", "a NaN/inf loss: stop naming the step, or skip that step")
    seed: int = opt(0, "seed for weights init, dropout and data order", minimum=0, maximum=SEED_MAX)
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where to train")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = opt(
        "sdpa", "attention kernel (all three honour packed sequences' restarting position_ids)"
    )
    kernels: Literal["auto", "auto-fp32", "none"] = opt(
        "auto",
        "GPU fast path (fused chunked loss, liger kernels, varlen attention for packed rows, host-offloaded "
        "checkpoints, fused LoRA layers, bf16 GEMMs over dequantized int8 weights, bf16 frozen weights for nf4 "
        "and int8 bases) on one GPU or under DDP; no-op on CPU, FSDP, DeepSpeed; "
        "auto-fp32 keeps a quantised base's embeddings/norms/head fp32; none = plain transformers+peft",
    )
    trust_remote_code: bool = opt(False, "allow model code from the checkpoint to run (never implicit)")


@section("launch", "how the workflow starts training (one process or accelerate launch)")
@dataclass
class LaunchSettings:
    """How the workflow starts the train job: one process, or several under ``accelerate launch``."""

    processes: int = opt(
        1, "training processes, one per GPU; above 1 the train rule runs `accelerate launch` (and asks for that many GPUs)",
        minimum=1,
    )
    accelerate_config: str = opt(
        "configs/accelerate/ddp.yaml",
        "accelerate config for processes > 1 (relative: the working directory's, else the one beside the Snakefile): ddp.yaml for lora/qlora, "
        "fsdp.yaml to shard the base, deepspeed_zero3.yaml (needs deepspeed)",
        minLength=1,
    )
    main_process_port: int = opt(29500, "rendezvous port of the processes; change it to run two trainings on one node",
                                 minimum=1, maximum=65535)


@section("select", "retention during training and the checkpoint the run keeps (select stage)")
@dataclass
class SelectSettings:
    """Retention during training and the ``select`` stage: which checkpoint the run keeps (docs/evaluation.md)."""

    retention: bool = opt(
        True, "score general knowledge (retention items, multiple choice by log-likelihood) before training and at every "
        "evaluation step, and let `select` keep the checkpoint with the best validation loss among those whose retention "
        "stays within bound of the base's; false: `select` keeps the last step",
    )
    bound: float = opt(2.0, "largest drop in retention accuracy, in points, that a kept checkpoint may show against the base "
                            "on the dev items (the point estimate; its paired 95% interval is recorded, not required)", minimum=0, maximum=100)
    items: str | None = opt(
        None, "retention items scored during training (JSONL: id, category, question, choices, answer); null: the bundled "
        "set's dev split (the eval stage reports on its test split, never used to choose)", minLength=1,
    )
    max_items: int = opt(0, "score at most this many items (0 = all)", minimum=0)
    batch_size: int = opt(16, "items per forward pass", minimum=1)
    scale: float = opt(
        0.5, "weight of the kept adapter in the product: 1 = as trained; below 1 the product lies between the base and the "
        "tuned model (the LoRA update scaled, as in WiSE-FT), which keeps more of what the base knew and less of the new "
        "skill (docs/evaluation.md: the measured trade-off). LoRA adapters only (dora and full runs keep 1)",
        exclusiveMinimum=0, maximum=1,
    )
    min_scale: float = opt(
        0.5, "lowest weight select may lower the kept adapter to, so that its retention stays within bound: training "
        "also scores every evaluation step at select.scale, at min_scale and half-way between (each a retention "
        "scoring, ~7 s for SmolLM2-135M on CPU); select keeps the highest of them whose retention is within bound, "
        "else min_scale. Equal to select.scale (the default): a fixed weight, nothing more scored. LoRA only", exclusiveMinimum=0, maximum=1,
    )
