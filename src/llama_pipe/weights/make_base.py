"""``llama-pipe make-base OUT_DIR``: the embedded tiny LLaMA, written in Meta's original layout.

The pipeline's default base model, so that everything runs on a fresh machine with no download:
random (seeded) weights of the shape in ``base.tiny``, split into ``n_shards`` model-parallel
``consolidated.NN.pth`` files exactly the way Meta splits its larger models, a sentencepiece
BPE ``tokenizer.model`` (byte fallback) trained on the texts of ``base.tokenizer_corpus``,
``params.json`` and an md5 ``checklist.chk``. The same settings give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any

from llama_pipe.config import BaseSettings, settings_from_args
from llama_pipe.core.atomic import atomic_dir, check_output_dir
from llama_pipe.core.errors import ConfigError, InputError
from llama_pipe.core.records import InvalidLine, read_records
from llama_pipe.core.settings import add_settings_arguments, describe
from llama_pipe.weights import meta
from llama_pipe.weights.tokenizer import train_sentencepiece

log = logging.getLogger(__name__)

_TEXT_KEYS = ("value", "content", "instruction", "input", "output", "system")
# Markers of the chat templates, so that they are not split into bytes by the tiny tokenizer.
_TEMPLATE_TEXT = "USER: ASSISTANT: SYSTEM: [INST] [/INST] <<SYS>>\n\n<</SYS>>\n\n system user assistant"


def _texts_of(obj: Any) -> list[str]:
    """Every conversation text in a ShareGPT / OpenAI-messages / Alpaca record."""
    out: list[str] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in _TEXT_KEYS and isinstance(value, str):
                out.append(value)
            elif isinstance(value, (list, dict)):
                out += _texts_of(value)
    elif isinstance(obj, list):
        for item in obj:
            out += _texts_of(item)
    return out


def corpus_texts(paths: list[str]) -> list[str]:
    """The texts of every readable record of ``paths``; broken records are skipped and counted."""
    texts: list[str] = []
    for path in paths:
        used = skipped = 0
        for _where, obj in read_records(path):
            found = [] if isinstance(obj, InvalidLine) else _texts_of(obj)
            if found:
                texts += found
                used += 1
            else:
                skipped += 1
        log.info("tokenizer corpus %s: %d records used, %d skipped (no text or broken)", path, used, skipped)
    if not texts:
        raise InputError(f"no text found in base.tokenizer_corpus {paths}; point it at ShareGPT-style files")
    return texts + [_TEMPLATE_TEXT] * 8


def _train_tokenizer(texts: list[str], out_file: Path, vocab_size: int, seed: int, multiple: int) -> int:
    """Train the sentencepiece model; shrink the vocabulary if the corpus cannot fill it."""
    size = vocab_size
    try:
        train_sentencepiece(texts, out_file, vocab_size=size, seed=seed)
    except RuntimeError as exc:
        m = re.search(r"<= (\d+)", str(exc))
        if not m:
            raise
        size = int(m.group(1)) // multiple * multiple
        log.warning(
            "the tokenizer corpus supports at most %s pieces; training %d instead of %d", m.group(1), size, vocab_size
        )
        if size < 300:
            raise InputError(
                f"the tokenizer corpus is too small for a {vocab_size}-piece vocabulary (at most {m.group(1)}); "
                "add text to base.tokenizer_corpus"
            ) from None
        train_sentencepiece(texts, out_file, vocab_size=size, seed=seed)
    return size


def random_weights(p: meta.MetaParams, vocab_size: int, seed: int, dtype: str) -> dict[str, Any]:
    """Seeded random weights with Meta's names and full shapes (norm weights near 1, not exactly 1)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for name, shape in meta.expected_shapes(p, vocab_size).items():
        if len(shape) == 1:
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) * 0.02 * (4.0 if name == "tok_embeddings.weight" else 1.0)
        out[name] = t.to(getattr(torch, dtype))
    # Meta's checkpoints also carry the rotary frequencies as a buffer (unused by converters).
    out["rope.freqs"] = (1.0 / (p.rope_theta ** (torch.arange(0, p.head_dim, 2).float() / p.head_dim))).to(
        getattr(torch, dtype)
    )
    return out


def write_meta_checkpoint(
    out_dir: Path, params: meta.MetaParams, weights: dict[str, Any], n_shards: int
) -> list[str]:
    """Write ``params.json`` and ``consolidated.NN.pth`` (split like Meta) into ``out_dir``."""
    import torch

    (out_dir / meta.PARAMS).write_text(json.dumps(params.to_json(), indent=2) + "\n", encoding="utf-8")
    shards: list[dict[str, Any]] = [{} for _ in range(n_shards)]
    for name, tensor in weights.items():
        for rank, piece in enumerate(meta.split_tensor(name, tensor, n_shards)):
            shards[rank][name] = piece
    names = [meta.PARAMS]
    for rank, sd in enumerate(shards):
        name = f"consolidated.{rank:02d}.pth"
        # The file's own name becomes the archive's folder name: writing under the final name
        # (inside the temporary directory) keeps the bytes identical from run to run.
        torch.save(sd, out_dir / name)
        names.append(name)
    return names


def check_divisible(p: meta.MetaParams, vocab_size: int, n_shards: int) -> None:
    """Meta's split needs every split dimension divisible by the number of shards."""
    sizes = {
        "n_heads": p.n_heads,
        "n_kv_heads": p.kv_heads,
        "dim": p.dim,
        "FFN hidden size": p.hidden_dim,
        "vocab_size": vocab_size,
    }
    bad = [f"{k}={v}" for k, v in sizes.items() if v % n_shards]
    if bad:
        raise ConfigError(f"base.tiny.n_shards={n_shards} must divide {', '.join(bad)}")


def make_base(out_dir: str | Path, settings: BaseSettings) -> Path:
    """Build the tiny Meta-layout checkpoint at ``out_dir`` (atomically) and return its path."""
    out = Path(out_dir)
    t = settings.tiny
    params = meta.MetaParams(
        dim=t.dim,
        n_layers=t.n_layers,
        n_heads=t.n_heads,
        n_kv_heads=t.n_kv_heads if t.n_kv_heads is not None else t.n_heads,
        vocab_size=-1,
        multiple_of=t.multiple_of,
        ffn_dim_multiplier=t.ffn_dim_multiplier,
        norm_eps=t.norm_eps,
        rope_theta=t.rope_theta,
        max_seq_len=t.max_seq_len,
    )
    try:
        params.check("base.tiny")
    except InputError as exc:
        raise ConfigError(str(exc)) from None
    check_divisible(params, t.vocab_size, t.n_shards)
    check_output_dir(out, settings.tokenizer_corpus, "make-base")
    texts = corpus_texts(settings.tokenizer_corpus)
    with atomic_dir(out, stage="make-base", inputs=settings.tokenizer_corpus) as tmp:
        vocab = _train_tokenizer(texts, tmp / meta.TOKENIZER, t.vocab_size, t.seed, multiple=t.n_shards)
        params.vocab_size = vocab
        check_divisible(params, vocab, t.n_shards)
        weights = random_weights(params, vocab, t.seed, t.dtype)
        names = write_meta_checkpoint(tmp, params, weights, t.n_shards)
        names.append(meta.TOKENIZER)
        (tmp / meta.CHECKLIST).write_text(meta.checklist_text(tmp, names), encoding="utf-8")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (e.g. results/base)")
    add_settings_arguments(parser, BaseSettings, "base")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, BaseSettings, "base")
    log.info("make-base settings:\n%s", describe(settings))
    if settings.source != "tiny":
        log.warning("base.source is %r; make-base builds the embedded tiny model regardless", settings.source)
    out = make_base(args.out_dir, settings)
    p = json.loads((out / meta.PARAMS).read_text(encoding="utf-8"))
    size = sum(f.stat().st_size for f in out.iterdir())
    n = len(meta.shard_paths(out))
    print(
        f"make-base: tiny LLaMA dim={p['dim']} layers={p['n_layers']} heads={p['n_heads']}/{p['n_kv_heads']} "
        f"vocab={p['vocab_size']} in {n} shard(s), {size / 1e6:.1f} MB -> {out}"
    )
    return 0
