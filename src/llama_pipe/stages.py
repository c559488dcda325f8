"""Every stage of llama-pipe, in pipeline order: the one list that the CLI (``llama-pipe STAGE``),
the report's data funnel, the workflow's stats files and the tests read.

A stage is a module with ``add_arguments(parser)`` and ``run(args) -> int``, named after the stage
(``filter-lang``: ``data/filter_lang.py``; ``train`` keeps ``train/loop.py``, which a launcher
starts as ``python -m llama_pipe.train.loop``). Its entry here says what else is true of it:

* ``section`` - the ``config.yaml`` section its settings come from (:data:`llama_pipe.config.SECTIONS`);
* ``unit`` - for a data stage, what its stats file counts (``records``; split counts ``pairs``);
  ``None`` for the stages that are not data stages;
* ``per_shard`` - the workflow runs it once per shard (``results/<rule>/shard-NNN.*``).

This module imports nothing heavy (Snakemake reads it when it parses the workflow).
"""

from __future__ import annotations

from dataclasses import dataclass

from llama_pipe.config import SECTIONS


@dataclass(frozen=True)
class Stage:
    """One ``llama-pipe`` subcommand."""

    name: str
    """The CLI name: ``llama-pipe NAME``."""
    module: str
    """The module holding its ``add_arguments`` and ``run``."""
    help: str
    """The one-line help of ``llama-pipe --help``."""
    section: str | None = None
    """The ``config.yaml`` section of its settings; None when it has none."""
    unit: str | None = None
    """A data stage: what its stats file counts (``in``/``out``). None: not a data stage."""
    per_shard: bool = False
    """The workflow runs it once per shard."""

    @property
    def rule(self) -> str:
        """Its Snakemake rule, and the ``stage`` field of its stats file: the name with ``_``."""
        return self.name.replace("-", "_")

    @property
    def settings(self) -> type | None:
        """Its settings dataclass (from :mod:`llama_pipe.config`), or None."""
        if self.section is None:
            return None
        return SECTIONS[self.section]


STAGES: tuple[Stage, ...] = (
    Stage("make-base", "llama_pipe.weights.make_base", "write the embedded tiny LLaMA in Meta's original layout",
          section="base"),
    Stage("download", "llama_pipe.weights.download",
          "fetch base weights from a Hugging Face repo or an http(s) URL, verified", section="base"),
    Stage("convert", "llama_pipe.weights.convert",
          "Meta checkpoint -> Hugging Face LlamaForCausalLM (sharded safetensors)", section="convert"),
    Stage("merge", "llama_pipe.data.merge", "validate and normalise ShareGPT/OpenAI/Alpaca files into one JSONL",
          section="merge", unit="records"),
    Stage("shard", "llama_pipe.data.shard", "scatter a JSONL into N shards (for parallel data stages)",
          unit="records"),
    Stage("clean", "llama_pipe.data.clean", "HTML -> markdown and the clean_sharegpt filters",
          section="clean", unit="records", per_shard=True),
    Stage("filter-lang", "llama_pipe.data.filter_lang", "keep or drop conversations by detected language",
          section="filter_lang", unit="records", per_shard=True),
    Stage("split", "llama_pipe.data.split", "split long conversations into chunks of at most N tokens",
          section="split", unit="pairs", per_shard=True),
    Stage("gather", "llama_pipe.data.gather", "gather shards into train/validation JSONL",
          section="data", unit="records"),
    Stage("distill", "llama_pipe.distill",
          "training replies in the base's own words: self-distillation rewrites and replay", section="distill"),
    Stage("train", "llama_pipe.train.loop", "LoRA / QLoRA / 8-bit / full fine-tuning", section="train"),
    Stage("select", "llama_pipe.select_checkpoint",
          "keep the evaluation checkpoint with the best validation loss whose retention stays within bound", section="select"),
    Stage("merge-adapter", "llama_pipe.merge_adapter", "merge adapters (in order, or one weighted combination) into a float copy of the base",
          section="merge_adapter"),
    Stage("export", "llama_pipe.weights.gguf_export",
          "merged HF model -> one GGUF file for llama.cpp (f16, q8_0, f32)", section="export"),
    Stage("eval", "llama_pipe.evaluate", "perplexity base vs tuned and sample generations", section="eval"),
    Stage("report", "llama_pipe.report", "plots: loss curve, data funnel, perplexity"),
    Stage("chat", "llama_pipe.serve.chat", "chat with a model in the terminal", section="serve"),
    Stage("serve", "llama_pipe.serve.server", "OpenAI-compatible HTTP server with a web chat page", section="serve"),
    Stage("schema", "llama_pipe.schema_cmd", "print or write the JSON schema of config.yaml"),
)

#: The stages by CLI name.
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}

#: The data stages (those that write a stats file), in pipeline order: the report's funnel order.
DATA_STAGES: tuple[Stage, ...] = tuple(s for s in STAGES if s.unit is not None)
