"""Every stage of llama-pipe, in pipeline order, with what it reads and writes: the one list that the
CLI (``llama-pipe STAGE``), the workflow's rules (their inputs, params and stats files), the report's
data funnel and the tests (the reliability harness, the workflow's fake ``llama-pipe``, the SLURM
re-run plan) read. The pipeline order is this tuple's order; nothing else restates it.

A stage is a module with ``add_arguments(parser)`` and ``run(args) -> int``, named after the stage
(``filter-lang``: ``data/filter_lang.py``; a launcher starts ``train`` as ``python -m llama_pipe train``).
Its entry here says what else is true of it:

* ``section`` - the ``config.yaml`` section its settings come from (:data:`llama_pipe.config.SECTIONS`);
  ``keys`` - the keys of that section it takes as flags (None: all but the performance-only ones);
  ``chat`` - the ``chat`` keys it renders with;
* ``unit`` - for a data stage, what its stats file counts (``records``; split counts ``pairs``);
  ``None`` for the stages that are not data stages;
* ``per_shard`` - the workflow runs it once per shard (``results/data/<rule>/<key>/shard-NNN.*``);
* ``layout`` - its command line and outputs (:data:`LAYOUTS`);
* ``reads`` - the stages whose outputs it reads, its records first (a data stage: the stage before
  it; none for merge, which reads ``data.inputs``).

This module imports nothing heavy (Snakemake reads it when it parses the workflow).
"""

from __future__ import annotations

from dataclasses import dataclass

from llama_pipe.config import SECTIONS

#: The command lines and outputs of the stages (``Stage.layout``). Paths after ``--`` are inputs.
LAYOUTS: dict[str, str] = {
    "records": "llama-pipe NAME [flags] -o OUT.jsonl -- IN.jsonl ...: OUT plus OUT.stats.json and OUT.rejects.jsonl beside it",
    "shards": "llama-pipe NAME --n N -o DIR -- IN.jsonl: DIR/shard-000.jsonl ... plus DIR/NAME.stats.json and DIR/NAME.rejects.jsonl",
    "sets": "llama-pipe NAME [flags] --train TRAIN.jsonl --val VAL.jsonl -- IN.jsonl ...: both, plus NAME.stats.json and "
            "NAME.rejects.jsonl beside TRAIN",
    "directory": "llama-pipe NAME [flags] -o DIR ...: one directory, written whole or not at all",
    "interactive": "no output file: a terminal chat, a server, or text on stdout",
}


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
    layout: str = "directory"
    """Its command line and outputs: a key of :data:`LAYOUTS`."""
    reads: tuple[str, ...] = ()
    """The stages whose outputs it reads, its records first (a data stage reads the one before it)."""
    keys: tuple[str, ...] | None = None
    """The keys of its section it takes as flags; None: every key but the performance-only ones."""
    chat: tuple[str, ...] = ()
    """The keys of the ``chat`` section it takes as flags (the stages that render conversations)."""

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

    @property
    def records_from(self) -> Stage | None:
        """The stage whose records it reads (``reads[0]``); None when it reads none."""
        return BY_NAME[self.reads[0]] if self.reads else None

    @property
    def tokenizer(self) -> bool:
        """A data stage that measures text with the base's tokenizer (``--tokenizer``: it reads convert's output)."""
        return "convert" in self.reads and self.unit is not None


STAGES: tuple[Stage, ...] = (
    Stage("make-base", "llama_pipe.weights.make_base", "write the embedded tiny LLaMA in Meta's original layout",
          section="base"),
    Stage("download", "llama_pipe.weights.download",
          "fetch base weights from a Hugging Face repo or an http(s) URL, verified", section="base"),
    Stage("convert", "llama_pipe.weights.convert",
          "Meta checkpoint -> Hugging Face LlamaForCausalLM (sharded safetensors)", section="convert", reads=("make-base", "download")),
    Stage("merge", "llama_pipe.data.merge", "validate and normalise ShareGPT/OpenAI/Alpaca files into one JSONL",
          section="merge", unit="records", layout="records"),
    Stage("shard", "llama_pipe.data.shard", "scatter a JSONL into N shards (for parallel data stages)",
          unit="records", layout="shards", reads=("merge",)),
    Stage("clean", "llama_pipe.data.clean", "HTML -> markdown and the clean_sharegpt filters",
          section="clean", unit="records", per_shard=True, layout="records", reads=("shard",)),
    Stage("filter-lang", "llama_pipe.data.filter_lang", "keep or drop conversations by detected language",
          section="filter_lang", unit="records", per_shard=True, layout="records", reads=("clean",)),
    Stage("split", "llama_pipe.data.split", "split long conversations into chunks of at most N tokens",
          section="split", unit="pairs", per_shard=True, layout="records", reads=("filter-lang", "convert"),
          chat=("template", "system_prompt", "max_seq_len")),
    Stage("gather", "llama_pipe.data.gather", "gather shards into train/validation JSONL",
          section="data", unit="records", layout="sets", reads=("split",), keys=("val_fraction", "seed", "inputs", "weights")),
    Stage("distill", "llama_pipe.data.distill",
          "training replies in the base's own words: self-distillation rewrites and replay", section="distill",
          layout="records", reads=("gather", "convert"), chat=("template", "system_prompt")),
    Stage("train", "llama_pipe.train.train", "LoRA / QLoRA / 8-bit / full fine-tuning", section="train",
          reads=("distill", "convert")),
    Stage("select", "llama_pipe.adapters.select",
          "keep the evaluation checkpoint with the best validation loss whose retention stays within bound", section="select",
          reads=("train",)),
    Stage("merge-adapter", "llama_pipe.adapters.merge_adapter",
          "merge adapters (in order, or one weighted combination) into a float copy of the base", section="merge_adapter",
          reads=("select", "convert")),
    Stage("export", "llama_pipe.weights.export",
          "merged HF model -> one GGUF file for llama.cpp (f16, q8_0, f32)", section="export", reads=("merge-adapter",)),
    Stage("eval", "llama_pipe.evaluation.eval", "perplexity base vs tuned and sample generations", section="eval",
          reads=("merge-adapter", "convert", "gather")),
    Stage("report", "llama_pipe.report.report", "plots: loss curve, data funnel, perplexity", reads=("train", "select", "eval")),
    Stage("chat", "llama_pipe.serve.chat", "chat with a model in the terminal", section="serve", layout="interactive",
          reads=("merge-adapter",)),
    Stage("serve", "llama_pipe.serve.serve", "OpenAI-compatible HTTP server with a web chat page", section="serve",
          layout="interactive", reads=("merge-adapter",)),
    Stage("schema", "llama_pipe.config.schema", "print or write the JSON schema of config.yaml", layout="interactive"),
)

#: The stages by CLI name.
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}

#: The data stages (those that write a stats file), in pipeline order: the report's funnel order.
DATA_STAGES: tuple[Stage, ...] = tuple(s for s in STAGES if s.unit is not None)

#: The stages whose products are keyed by what they are made from (``results/data/<rule>/<key>/``):
#: the data stages and distill, every stage that writes records.
KEYED_STAGES: tuple[Stage, ...] = tuple(s for s in STAGES if s.layout in ("records", "shards", "sets"))


def downstream(name: str) -> list[Stage]:
    """``name`` and every stage that reads its outputs, directly or through others (pipeline order):
    what a changed setting of ``name`` re-runs."""
    hit = {name}
    for s in STAGES:
        if any(r in hit for r in s.reads):
            hit.add(s.name)
    return [s for s in STAGES if s.name in hit]


def _check(stages: tuple[Stage, ...]) -> None:
    """Each stage reads only stages listed before it, and names a known layout and section."""
    seen: set[str] = set()
    for s in stages:
        unknown = [r for r in s.reads if r not in seen]
        if unknown or s.layout not in LAYOUTS or (s.section is not None and s.section not in SECTIONS):
            raise ValueError(f"stage {s.name}: reads {unknown} before they are listed, layout {s.layout!r}, section {s.section!r}")
        seen.add(s.name)


_check(STAGES)
