"""The ``llama-pipe`` command: one subcommand per pipeline stage.

Each stage lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
this file only routes. Heavy imports (torch, transformers) happen inside ``run`` so that
``llama-pipe --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from llama_pipe import __version__

# name -> (module, one-line help). The order is the order of the pipeline.
STAGES: dict[str, tuple[str, str]] = {
    "make-base": ("llama_pipe.weights.tiny", "write the embedded tiny LLaMA in Meta's original layout"),
    "download": ("llama_pipe.weights.download", "fetch base weights from a Hugging Face repo or an http(s) URL, verified"),
    "convert": ("llama_pipe.weights.convert", "Meta checkpoint -> Hugging Face LlamaForCausalLM (sharded safetensors)"),
    "merge": ("llama_pipe.data.merge", "validate and normalise ShareGPT/OpenAI/Alpaca files into one JSONL"),
    "shard": ("llama_pipe.data.shard", "scatter a JSONL into N shards (for parallel data stages)"),
    "clean": ("llama_pipe.data.clean", "HTML -> markdown and the clean_sharegpt filters"),
    "filter-lang": ("llama_pipe.data.lang", "keep or drop conversations by detected language"),
    "split": ("llama_pipe.data.split", "split long conversations into chunks of at most N tokens"),
    "gather": ("llama_pipe.data.shard", "gather shards into train/validation JSONL"),
    "train": ("llama_pipe.train.loop", "LoRA / QLoRA / 8-bit / full fine-tuning"),
    "merge-adapter": ("llama_pipe.merge_adapter", "merge adapters (in order) into a float copy of the base"),
    "export": ("llama_pipe.weights.gguf_export", "merged HF model -> one GGUF file for llama.cpp (f16, q8_0, f32)"),
    "eval": ("llama_pipe.evaluate", "perplexity base vs tuned and sample generations"),
    "report": ("llama_pipe.report", "plots: loss curve, data funnel, perplexity"),
    "chat": ("llama_pipe.serve.chat", "chat with a model in the terminal"),
    "serve": ("llama_pipe.serve.server", "OpenAI-compatible HTTP server with a web chat page"),
    "schema": ("llama_pipe.schema_cmd", "print or write the JSON schema of config.yaml"),
}


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``stage``'s module is imported (all of them when None)."""
    parser = argparse.ArgumentParser(
        prog="llama-pipe",
        description="Turn a LLaMA-family base model plus raw chat logs into a fine-tuned, merged, evaluated chat model.",
    )
    parser.add_argument("--version", action="version", version=f"llama-pipe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="STAGE", required=True)
    for name, (module, help_text) in STAGES.items():
        if stage is not None and name != stage:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=help_text)
        adder = getattr(mod, f"add_{name.replace('-', '_')}_arguments", None) or mod.add_arguments
        adder(p)
        p.set_defaults(_module=module, _name=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from llama_pipe.errors import ConfigError, InputError

    argv = list(sys.argv[1:] if argv is None else argv)
    stage = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(stage if stage in STAGES else "")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    mod = importlib.import_module(args._module)
    runner = getattr(mod, f"run_{args._name.replace('-', '_')}", None) or mod.run
    try:
        return int(runner(args) or 0)
    except (InputError, ConfigError) as exc:
        print(f"llama-pipe {args._name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llama-pipe {args._name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
