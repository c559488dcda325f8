"""``llama-pipe export --format gguf``: a Hugging Face LLaMA directory -> one GGUF file for llama.cpp.

Written from the GGUF specification with the ``gguf`` library's writer (not from llama.cpp's
convert script):

* metadata of the ``llama`` architecture (context, widths, heads, RoPE base, RMSNorm epsilon);
* tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ...). Hugging Face stores
  q/k rows in the "rotate half" order its RoPE uses; llama.cpp's ``llama`` architecture rotates
  adjacent pairs, so q and k rows are interleaved back (the inverse of Meta -> HF conversion);
* the tokenizer: sentencepiece (``tokenizer.ggml.model = llama``; pieces, scores and types from
  ``tokenizer.model`` when present, else from ``tokenizer.json``) or byte-level BPE
  (``gpt2``; vocabulary, merges and the pre-tokenizer llama.cpp must use, found from the HF
  pre-tokenizer's structure: :mod:`llama_pipe.weights.gguf_vocab`), special token ids,
  whether BOS is added, and the chat template;
* ``--type f32``, ``f16`` (1-D norm weights stay f32) or ``q8_0`` (``gguf.quants``; matrices
  whose rows are not a multiple of 32 stay f16).

The file is written beside OUT under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_pipe.config import ExportSettings, settings_from_args
from llama_pipe.core.atomic import check_output_files, remove_dead_temps
from llama_pipe.core.errors import InputError, OutputError
from llama_pipe.core.settings import add_settings_arguments, describe
from llama_pipe.weights.gguf_vocab import add_tokenizer

log = logging.getLogger(__name__)

ARCH = "llama"
# HF parameter name (after "model.layers.N.") -> llama.cpp tensor kind (gguf.MODEL_TENSOR member).
LAYER_TENSORS = {
    "input_layernorm": "ATTN_NORM",
    "self_attn.q_proj": "ATTN_Q",
    "self_attn.k_proj": "ATTN_K",
    "self_attn.v_proj": "ATTN_V",
    "self_attn.o_proj": "ATTN_OUT",
    "post_attention_layernorm": "FFN_NORM",
    "mlp.gate_proj": "FFN_GATE",
    "mlp.up_proj": "FFN_UP",
    "mlp.down_proj": "FFN_DOWN",
}
TOP_TENSORS = {"model.embed_tokens": "TOKEN_EMBD", "model.norm": "OUTPUT_NORM", "lm_head": "OUTPUT"}


@dataclass
class ModelShape:
    """The numbers of config.json the GGUF header needs."""

    vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int
    rope_theta: float
    rms_eps: float
    rope_scaling: dict[str, Any] | None


def read_shape(model_dir: Path) -> ModelShape:
    """config.json of a LlamaForCausalLM, or an InputError naming what is wrong."""
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise InputError(f"{model_dir}: no config.json; export needs a Hugging Face model directory (e.g. results/default/merged)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{cfg_file}: not readable JSON: {exc}") from None
    if cfg.get("model_type") != "llama":
        raise InputError(
            f"{cfg_file}: model_type {cfg.get('model_type')!r}; export writes the llama architecture only "
            "(a LlamaForCausalLM directory such as results/default/merged)"
        )
    rope = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return ModelShape(
            vocab=int(cfg["vocab_size"]),
            hidden=hidden,
            ffn=int(cfg["intermediate_size"]),
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            context=int(cfg.get("max_position_embeddings") or 2048),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_scaling=scaling,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{cfg_file}: missing or bad LLaMA setting {exc}") from None


def unpermute_rows(w: Any, n_heads: int) -> Any:
    """HF's rotate-half q/k rows -> the adjacent-pair order llama.cpp's ``llama`` RoPE expects.

    Within each head HF holds the first halves of all rotary pairs, then the second halves;
    llama.cpp wants pair members next to each other.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of one HF parameter (``model.layers.3.mlp.up_proj.weight`` -> ``blk.3.ffn_up.weight``)."""
    import gguf

    stem, _, suffix = hf_name.rpartition(".")
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    kind = LAYER_TENSORS.get(m.group(2)) if m else TOP_TENSORS.get(stem)
    if kind is None or suffix not in ("weight", "bias"):
        raise InputError(f"{hf_name}: a weight export does not know (not a plain LlamaForCausalLM parameter)")
    base = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)]
    return (base.format(bid=int(m.group(1))) if m else base) + "." + suffix


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory (sharded or not)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    missing = [f for f in files if not f.is_file()]
    if not files or missing:
        raise InputError(f"{model_dir}: no safetensors weights{f' ({missing[0].name} missing)' if missing else ''}; "
                         "export reads a Hugging Face directory written by convert or merge-adapter")
    return files


def convert_tensor(name: str, tensor: Any, shape: ModelShape, qtype: str) -> tuple[Any, Any]:
    """(array to store, GGML type or None) of one HF tensor under ``qtype`` (f32, f16, q8_0)."""
    import gguf
    import numpy as np
    import torch

    w = tensor.to(torch.float32)
    if name.endswith("attn_q.weight") or name.endswith("attn_q.bias"):
        w = unpermute_rows(w, shape.heads)
    elif name.endswith("attn_k.weight") or name.endswith("attn_k.bias"):
        w = unpermute_rows(w, shape.kv_heads)
    arr = w.numpy()
    if qtype == "f32" or arr.ndim == 1:
        return np.ascontiguousarray(arr, dtype=np.float32), None
    if qtype == "q8_0" and arr.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return np.ascontiguousarray(arr, dtype=np.float16), None


def add_header(writer: Any, shape: ModelShape, qtype: str, name: str) -> None:
    import gguf

    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_name(name)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_block_count(shape.layers)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_vocab_size(shape.vocab)
    writer.add_file_type(file_types[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if shape.rope_scaling:
        kind = shape.rope_scaling.get("rope_type") or shape.rope_scaling.get("type")
        if kind != "linear":
            raise InputError(f"config.json: rope scaling {kind!r} is not supported by export (only linear)")
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(shape.rope_scaling["factor"]))


def export_gguf(model_dir: str | Path, out: str | Path, settings: ExportSettings) -> dict[str, Any]:
    """Write ``out`` (GGUF) from the HF LLaMA directory ``model_dir``; returns a summary."""
    import gguf
    from safetensors import safe_open
    from tqdm import tqdm

    src, dest = Path(model_dir), Path(out)
    if not src.is_dir():
        raise InputError(f"{src}: not a directory; export needs a Hugging Face model directory (e.g. results/default/merged)")
    if settings.format != "gguf":
        raise InputError(f"--format {settings.format}: only gguf is supported")
    if dest.is_dir():
        raise OutputError(f"{dest}: is a directory; give a file path for the GGUF (e.g. {dest / 'model.gguf'})")
    check_output_files([("-o", dest)], [src])  # never over one of the model's own files
    shape = read_shape(src)
    files = weight_files(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(dest)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    counts: dict[str, int] = {}
    try:
        writer = gguf.GGUFWriter(tmp, ARCH, use_temp_file=True)
        add_header(writer, shape, settings.type, settings.name or src.resolve().name)
        vocab = add_tokenizer(writer, src, shape.vocab)
        seen: set[str] = set()
        with tqdm(total=len(files), desc="export", unit="file", disable=None) as bar:
            for f in files:
                with safe_open(str(f), framework="pt") as st:
                    for key in st.keys():
                        name = gguf_name(key)
                        arr, raw = convert_tensor(name, st.get_tensor(key), shape, settings.type)
                        writer.add_tensor(name, arr, raw_dtype=raw)
                        seen.add(name)
                        kind = raw.name if raw is not None else str(arr.dtype)
                        counts[kind] = counts.get(kind, 0) + 1
                bar.update(1)
        for needed in ("token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight"):
            if needed not in seen:
                raise InputError(f"{src}: weight {needed} missing from the safetensors files")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"tensors": len(seen), "types": counts, "bytes": dest.stat().st_size, "tied": "output.weight" not in seen, **vocab}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face LLaMA directory (e.g. results/default/merged)")
    parser.add_argument("-o", "--out", required=True, metavar="OUT", help="file to write (e.g. results/default/export/model.f16.gguf)")
    add_settings_arguments(parser, ExportSettings, "export")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, ExportSettings, "export")
    log.info("export settings:\n%s", describe(settings))
    summary = export_gguf(args.model_dir, args.out, settings)
    types = ", ".join(f"{n} {k}" for k, n in sorted(summary["types"].items()))
    print(
        f"export: {summary['tensors']} tensors ({types}), tokenizer {summary['tokenizer']} (pre-tokenizer {summary['pre_tokenizer']}, "
        f"{summary['tokens']} tokens), {summary['bytes'] / 1e6:.1f} MB -> {args.out}"
    )
    return 0
