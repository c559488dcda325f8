"""``llama-pipe merge-adapter``: fold one or more adapters, in order (or one weighted combination
of them), into a float copy of the base.

The base is always loaded in float32 - also when an adapter was trained over a 4-bit (QLoRA) or
8-bit base: the adapter file format is the same, and merging into quantised weights would add
rounding error to every merged matrix. Each adapter is applied to the result of the previous one
(``W <- W + scale * B @ A``), so ``--adapter A --adapter B`` equals running the base with A and
then B stacked; that is sound only when B was trained on A's merged model, so each adapter's
recorded ``trained_on`` is checked first (:func:`llama_pipe.models.lineage.chain_lineage`: exit 2 when
it was trained on other weights, a warning when it has no record). ``--combine cat|svd
--weights ...`` instead merges one weighted combination of adapters each trained on the base
(peft's ``add_weighted_adapter``; :func:`llama_pipe.models.model_dir.combine_adapters`). When an
adapter directory carries a tokenizer with more tokens than the current embedding matrix, the
embeddings are resized first and that tokenizer is the one written out.

Output (a plain Hugging Face directory, built in ``OUT.tmp-*`` and renamed when complete):
sharded ``model-*.safetensors`` (``max_shard_size``), ``config.json``, ``generation_config.json``
(the template's end-of-turn ids as EOS), the tokenizer with the chat template as Jinja, and
``llama_pipe.json`` (template name, base, adapters and their sha256, the lineage - base
fingerprint plus every adapter or combination merged into it - and the written weights' fingerprint). ``--format meta`` also
writes ``consolidated.00.pth`` + ``params.json`` (+ ``tokenizer.model``) in Meta's layout.
Adapters are read from ``adapter_model.safetensors`` only; a pickled ``adapter_model.bin`` is
refused.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from llama_pipe.chat_template.builtin import end_of_turn_ids, get_template
from llama_pipe.chat_template.resolve import recorded_system_prompt, resolve_template
from llama_pipe.config import ChatSettings, MergeAdapterSettings, settings_from_args
from llama_pipe.config.checks import merge_adapter_errors
from llama_pipe.core.atomic import atomic_dir, check_output_dir, write_json_atomic
from llama_pipe.core.errors import ConfigError, InputError
from llama_pipe.core.settings import add_settings_arguments, describe
from llama_pipe.core.sidecar import SIDECAR
from llama_pipe.models.lineage import chain_lineage, combination_lineage
from llama_pipe.models.model_dir import apply_adapters, check_adapter_dir, check_model_dir, combine_adapters, has_tokenizer, is_full_model, load_float_base
from llama_pipe.weights.fingerprint import weights_fingerprint
from llama_pipe.weights.to_meta import write_meta
from llama_pipe.weights.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="HF_DIR", help="float Hugging Face base model directory")
    parser.add_argument(
        "--adapter", action="append", required=True, metavar="DIR",
        help="peft adapter directory (adapter_config.json + adapter_model.safetensors); repeat to chain, applied in order "
        "(each must have been trained on the merged model of the ones before it), or to combine with --combine",
    )
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="merged model directory (replaced atomically)")
    add_settings_arguments(parser, MergeAdapterSettings, "merge_adapter")
    add_settings_arguments(parser, ChatSettings, "chat", config_flag=False, only=("template", "system_prompt"))


# ----------------------------------------------------------------------------- output


def write_model_dir(model: Any, tokenizer: Any, template_name: str, out: Path, max_shard_size: str, sidecar: dict[str, Any]) -> None:
    """Save model (safetensors shards), tokenizer with chat template, generation config and sidecar into ``out``."""
    from transformers import GenerationConfig

    template = get_template(template_name, tokenizer)
    tokenizer.chat_template = template.jinja_for(tokenizer)
    eos = end_of_turn_ids(tokenizer, template)
    model.config.eos_token_id = eos[0] if len(eos) == 1 else eos
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(out))
    # The fingerprint of the weights just written: a later reader trusts the lineage only while
    # the weights are still these (llama_pipe.models.lineage.model_lineage).
    write_json_atomic(out / SIDECAR, {"template": template_name, **sidecar, "fingerprint": weights_fingerprint(out)})


def copy_sentencepiece(tokenizer: Any, dirs: list[Path], out: Path) -> None:
    """Copy ``tokenizer.model`` (what Meta's code and some servers read) from the directory the
    written tokenizer came from, when the save did not produce one."""
    if (out / "tokenizer.model").is_file():
        return
    for d in reversed(dirs):
        if (d / "tokenizer.model").is_file() and has_tokenizer(d) and len(load_tokenizer(d)) == len(tokenizer):
            shutil.copyfile(d / "tokenizer.model", out / "tokenizer.model")
            return


def run(args: argparse.Namespace) -> int:
    import torch

    settings = settings_from_args(args, MergeAdapterSettings, "merge_adapter")
    chat = settings_from_args(args, ChatSettings, "chat")
    log.info("merge-adapter settings:\n%s", describe(settings))
    adapters = [Path(a) for a in [*args.adapter, *settings.extra_adapters]]
    base, out = Path(args.base), Path(args.output)
    full = None
    if adapters and is_full_model(adapters[0]):
        # train.method full: the run directory is a whole model; it replaces the base weights.
        full, adapters = adapters[0], adapters[1:]
        log.info("%s is a fully fine-tuned model, not an adapter: it is the starting point", full)
    errors = merge_adapter_errors(settings, len(adapters))
    if errors:
        raise ConfigError("; ".join(errors))
    inputs = [base, *([full] if full else []), *adapters]
    check_output_dir(out, inputs, "merge-adapter")  # fail fast: -o may not hold an input or another stage's output
    for a in adapters:  # fail fast, before loading anything big
        if is_full_model(a):
            raise InputError(f"{a}: a full model (no adapter_config.json) can only be the first --adapter")
        check_adapter_dir(a)
    check_model_dir(base, "base model")
    t0 = time.time()
    start = full or base
    # Each adapter against what it was trained on (exit 2 before anything big is loaded).
    if settings.combine == "chain":
        lineage = chain_lineage(start, adapters)
    else:
        lineage = combination_lineage(start, adapters, settings.combine, settings.weights)
    tokenizer = load_tokenizer(start)
    model = load_float_base(start)
    if settings.combine == "chain":
        model, tokenizer = apply_adapters(model, tokenizer, adapters)
    else:
        model, tokenizer = combine_adapters(model, tokenizer, adapters, settings.combine, settings.weights, settings.svd_rank)
    dirs = [base, *([full] if full else []), *adapters]
    template_name = resolve_template(chat.template, dirs, tokenizer).name
    model = model.to(getattr(torch, settings.dtype))
    added = len(adapters) if settings.combine == "chain" else min(len(adapters), 1)  # the steps this merge added
    merged = [a for step in lineage.steps[len(lineage.steps) - added:] for a in step.adapters]
    sidecar = {
        "system_prompt": chat.system_prompt if chat.system_prompt is not None else recorded_system_prompt(dirs[1:]),
        "base": str(base),
        "full_model": str(full) if full else None,
        "adapters": [{"path": a.path, "sha256": a.sha256} for a in merged],
        "combine": settings.combine,
        "weights": settings.weights,
        "dtype": settings.dtype,
        "lineage": lineage.to_json(),
    }
    with atomic_dir(out, stage="merge-adapter", inputs=inputs) as tmp:
        write_model_dir(model, tokenizer, template_name, tmp, settings.max_shard_size, sidecar)
        copy_sentencepiece(tokenizer, dirs, tmp)
        if settings.format == "meta":
            write_meta(model, tmp)
    n_params = sum(p.numel() for p in model.parameters())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    how = "in order" if settings.combine == "chain" else f"combined {settings.combine}, weights {settings.weights}"
    print(
        f"merge-adapter: {len(adapters)} adapter(s) ({how}) into {start} -> {out} ({n_params / 1e6:.2f}M params, "
        f"{settings.dtype}, {len(shards)} shard(s), template {template_name}{', + meta' if settings.format == 'meta' else ''}) "
        f"in {time.time() - t0:.1f}s; lineage {lineage.describe()}"
    )
    return 0
