"""Check model and adapter directories before anything is allocated from them.

A safetensors file is an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``) and the
tensor bytes. A header that lies (a length beyond the file, offsets beyond the data, tensors
that overlap or leave gaps, a byte count that disagrees with dtype x shape, garbage JSON) makes
the loaders fail deep inside with a traceback, or map memory that is not there. ``config.json``
values are turned into allocations by ``from_pretrained`` before any weight is read: a
``vocab_size`` of 1e12 asks for terabytes. Everything here reads headers only (a few KB per
file) and raises :class:`InputError` with one line naming the file and what is wrong.

The config check compares the parameter count the config describes with the number of elements
the safetensors files actually hold, so a config can never make a loader allocate much more
than is on disk. For a LLaMA-style decoder (``model.layers.N.*``) it also compares each size with
the tensors themselves: the layer count with the layers present (transformers would silently drop
extra layers or initialise missing ones at random), every layer holding the tensors the first one
does, and the attention, MLP, norm and output shapes with ``num_attention_heads`` x ``head_dim``,
``num_key_value_heads``, ``intermediate_size``, ``hidden_size`` and ``vocab_size``; an untied
config needs an ``lm_head.weight``. The message names the field.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

from llama_pipe.core.errors import InputError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
# Bits per element of every safetensors dtype (F4/F6 are packed sub-byte types).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
MAX_DIMS = 8
# Integer config fields that size a tensor: each must be a positive int no larger than this.
SIZE_FIELDS = {
    "vocab_size": 2**24,
    "hidden_size": 2**18,
    "intermediate_size": 2**20,
    "num_hidden_layers": 4096,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "head_dim": 2**16,
    "max_position_embeddings": 2**25,
}
MAX_LORA_RANK = 2**16

Tensors = dict[str, tuple[str, tuple[int, ...]]]


def _fail(path: Path, what: str) -> InputError:
    return InputError(f"{path}: {what}")


def read_safetensors_header(path: str | Path) -> Tensors:
    """The tensors of one safetensors file, ``{name: (dtype, shape)}``, after checking the header
    against the file: every byte of the data section belongs to exactly one tensor."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _fail(path, f"not a safetensors file: {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise _fail(path, f"not a safetensors file: header length {n} does not fit the file's {size} bytes")
            raw = fh.read(n)
    except OSError as exc:
        raise _fail(path, f"cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise _fail(path, "safetensors header is not valid JSON (nested too deeply)") from None
    except ValueError as exc:
        raise _fail(path, f"safetensors header is not valid JSON ({str(exc).split(';')[0]})") from None
    if not isinstance(header, dict):
        raise _fail(path, "safetensors header is not a JSON object")
    data_len = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    tensors: Tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise _fail(path, "safetensors __metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict):
            raise _fail(path, f"tensor {name!r}: header entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_BITS:
            raise _fail(path, f"tensor {name!r}: unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise _fail(path, f"tensor {name!r}: shape must be a list of at most {MAX_DIMS} non-negative integers, got {shape!r:.80}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise _fail(path, f"tensor {name!r}: data_offsets must be two integers, got {offsets!r:.80}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise _fail(path, f"tensor {name!r}: data_offsets [{begin}, {end}] lie outside the {data_len}-byte data section")
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != end - begin:
            raise _fail(path, f"tensor {name!r}: {dtype} {shape} needs {bits / 8:g} bytes but data_offsets give {end - begin}")
        spans.append((begin, end, name))
        tensors[name] = (dtype, tuple(shape))
    at, prev = 0, "the start of the data"
    for begin, end, name in sorted(spans):
        if begin != at:
            how = "overlaps" if begin < at else "leaves a gap after"
            raise _fail(path, f"tensor {name!r} {how} {prev} (starts at byte {begin}, expected {at})")
        at, prev = end, repr(name)
    if at != data_len:
        raise _fail(path, f"the tensors cover {at} of the {data_len} data bytes (a truncated or padded file)")
    return tensors


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _fail(path, f"cannot read ({exc.strerror or exc})") from None
    except RecursionError:
        raise _fail(path, "not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an over-long integer
        raise _fail(path, f"not valid JSON ({str(exc).split(';')[0]})") from None


def _size_fields(path: Path, cfg: dict[str, Any]) -> dict[str, int]:
    """The tensor-sizing fields present in ``cfg``, each checked to be a positive int in bounds."""
    found: dict[str, int] = {}
    for key, cap in SIZE_FIELDS.items():
        value = cfg.get(key)
        if value is None:
            continue
        per_layer = isinstance(value, list) and bool(value)  # some architectures size each layer
        for v in value if per_layer else [value]:
            if isinstance(v, bool) or not isinstance(v, int):
                raise _fail(path, f"{key} must be a positive integer, got {value!r:.40}")
            if not 1 <= v <= cap:
                raise _fail(path, f"{key} = {v} is out of range (1 to {cap})")
        if not per_layer:
            found[key] = value
    heads, kv = found.get("num_attention_heads"), found.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise _fail(path, f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    hidden = found.get("hidden_size")
    if heads and hidden and "head_dim" not in found and hidden % heads:
        raise _fail(path, f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    return found


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _check_decoder(path: Path, dims: dict[str, int], text: dict[str, Any], cfg: dict[str, Any], tensors: Tensors) -> None:
    """The config's sizes against a LLaMA-style decoder's tensors (``model.layers.N.*``): see the module docstring."""
    layers: dict[int, dict[str, tuple[int, ...]]] = {}
    for name, (_, shape) in tensors.items():
        m = _LAYER.match(name)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = shape
    if not layers:
        return
    n = dims.get("num_hidden_layers")
    if n is not None and sorted(layers) != list(range(n)):
        raise _fail(path, f"num_hidden_layers = {n} but the weights hold {len(layers)} layer(s) "
                          f"(model.layers.{min(layers)} .. model.layers.{max(layers)})")
    first = layers[min(layers)]
    for i in sorted(layers):
        if set(layers[i]) != set(first):
            odd = sorted(set(layers[i]) ^ set(first))[0]
            has, lacks = (i, min(layers)) if odd in layers[i] else (min(layers), i)
            raise _fail(path.parent, f"the weights hold model.layers.{has}.{odd} but not model.layers.{lacks}.{odd}; every layer "
                                     "must hold the same tensors (a missing one would be initialised at random)")
    hidden, heads = dims.get("hidden_size"), dims.get("num_attention_heads")
    head_dim = dims.get("head_dim") or (hidden // heads if hidden and heads else None)
    kv = dims.get("num_key_value_heads", heads)
    inter, vocab = dims.get("intermediate_size"), dims.get("vocab_size")
    quantized = bool(cfg.get("quantization_config"))  # packed weights: shapes are not the logical ones
    rules: list[tuple[str, tuple[int | None, ...], str]] = [
        ("self_attn.q_proj.weight", ((heads or 0) * (head_dim or 0) or None, hidden), "num_attention_heads x head_dim, hidden_size"),
        ("self_attn.k_proj.weight", ((kv or 0) * (head_dim or 0) or None, hidden), "num_key_value_heads x head_dim, hidden_size"),
        ("self_attn.v_proj.weight", ((kv or 0) * (head_dim or 0) or None, hidden), "num_key_value_heads x head_dim, hidden_size"),
        ("self_attn.o_proj.weight", (hidden, (heads or 0) * (head_dim or 0) or None), "hidden_size, num_attention_heads x head_dim"),
        ("mlp.gate_proj.weight", (inter, hidden), "intermediate_size, hidden_size"),
        ("mlp.up_proj.weight", (inter, hidden), "intermediate_size, hidden_size"),
        ("mlp.down_proj.weight", (hidden, inter), "hidden_size, intermediate_size"),
        ("input_layernorm.weight", (hidden,), "hidden_size"),
        ("post_attention_layernorm.weight", (hidden,), "hidden_size"),
    ]
    if not quantized:
        for i in sorted(layers):
            for suffix, want, fields in rules:
                _same_shape(path, f"model.layers.{i}.{suffix}", layers[i].get(suffix), want, fields)
        _same_shape(path, "model.norm.weight", tensors.get("model.norm.weight", (None, None))[1], (hidden,), "hidden_size")
        _same_shape(path, "lm_head.weight", tensors.get("lm_head.weight", (None, None))[1], (vocab, hidden), "vocab_size, hidden_size")
    tied = text.get("tie_word_embeddings", cfg.get("tie_word_embeddings"))
    if tied is False and "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        raise _fail(path, "tie_word_embeddings is false but the weights hold no lm_head.weight (it would be initialised at random)")


def _same_shape(path: Path, name: str, shape: tuple[int, ...] | None, want: tuple[int | None, ...], fields: str) -> None:
    if shape is None or len(shape) != len(want):
        if shape is not None:
            raise _fail(path, f"{name} in the weights is {list(shape)}, not the {len(want)}-D tensor {fields} describe")
        return
    if any(w is not None and w != s for w, s in zip(want, shape)):
        raise _fail(path, f"{fields} = {[w if w is not None else '?' for w in want]} but {name} in the weights is {list(shape)}")


def estimate_parameters(dims: dict[str, int], tied: bool) -> int:
    """A decoder-only transformer's parameter count from its config (embeddings, attention, a
    gated MLP); architectures with experts or biases hold more, never much less."""
    vocab, hidden = dims.get("vocab_size", 0), dims.get("hidden_size", 0)
    heads = dims.get("num_attention_heads", 1)
    head_dim = dims.get("head_dim", hidden // heads if heads else 0)
    kv = dims.get("num_key_value_heads", heads)
    per_layer = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim + 3 * hidden * dims.get("intermediate_size", 0)
    return vocab * hidden * (1 if tied else 2) + dims.get("num_hidden_layers", 0) * per_layer


def check_config(path: str | Path, tensors: Tensors | None = None) -> dict[str, Any]:
    """Check a model's ``config.json``: JSON object, sizes positive integers in bounds, and (given
    the tensors on disk) no more parameters described than the weights hold."""
    path = Path(path)
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise _fail(path, "config.json must hold a JSON object")
    for key in ("model_type", "dtype", "torch_dtype"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise _fail(path, f"{key} must be a string, got {cfg[key]!r:.40}")
    dims = _size_fields(path, cfg)
    text_config = cfg.get("text_config")
    text = text_config if isinstance(text_config, dict) else cfg
    if text is not cfg:  # multimodal configs size the language model in text_config
        dims.update(_size_fields(path, text))
    if tensors is None:
        return cfg
    for name, (_, shape) in tensors.items():
        if name.endswith("embed_tokens.weight") and len(shape) == 2:
            for key, got in (("vocab_size", shape[0]), ("hidden_size", shape[1])):
                if key in dims and dims[key] != got:
                    raise _fail(path, f"{key} = {dims[key]} but {name} in the weights is {list(shape)}")
    if not cfg.get("quantization_config"):  # packed low-bit weights hold fewer elements than parameters
        described = estimate_parameters(dims, bool(text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))))
        stored = sum(math.prod(shape) for _, shape in tensors.values())
        if described > 2 * stored + 2**20:
            raise _fail(path, f"describes about {described:,} parameters but the safetensors files hold {stored:,}; "
                              "the config does not belong to these weights")
    _check_decoder(path, dims, text, cfg, tensors)
    return cfg


REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")


def refuse_remote_code(model_dir: str | Path, allowed: bool = False, files: tuple[str, ...] = REMOTE_CODE_FILES) -> None:
    """Refuse a folder that needs its own Python code to load (an ``auto_map`` in ``config.json`` or
    ``tokenizer_config.json``: transformers would import the ``.py`` files it names, and, asked
    without ``trust_remote_code``, prompt on stdin). ``allowed``: train.trust_remote_code is on."""
    if allowed:
        return
    model_dir = Path(model_dir)
    for name in files:
        f = model_dir / name
        if not f.is_file():
            continue
        cfg = _read_json(f)
        auto_map = cfg.get("auto_map") if isinstance(cfg, dict) else None
        if auto_map:
            shown = ", ".join(f"{k}: {v}" for k, v in list(auto_map.items())[:2]) if isinstance(auto_map, dict) else repr(auto_map)
            raise _fail(f, f"auto_map ({shown:.120}) names Python code shipped with the model; it runs only with "
                           "trust_remote_code, which is off (train.trust_remote_code: true turns it on for training; chat, serve, "
                           "eval, merge-adapter, split and convert never run a model's code)")


def check_model_weights(model_dir: str | Path, files: list[str]) -> Tensors:
    """Check every safetensors header of a model directory, the index (if any) against the
    headers, and config.json against both; return all tensors."""
    model_dir = Path(model_dir)
    tensors: Tensors = {}
    where: dict[str, str] = {}
    for f in files:
        for name, info in read_safetensors_header(model_dir / f).items():
            if name in where:
                raise _fail(model_dir / f, f"tensor {name!r} is also in {where[name]}")
            tensors[name], where[name] = info, f
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")  # safetensors_files checked it is there
        wrong = [k for k, f in weight_map.items() if where.get(k) != f]
        if wrong:
            raise _fail(index, f"{len(wrong)} tensor(s) are not in the file the index names, e.g. {wrong[0]!r} "
                               f"(index: {weight_map[wrong[0]]}, found in: {where.get(wrong[0], 'no file')})")
    cfg = check_config(model_dir / "config.json", tensors)
    _check_tied_head(model_dir, cfg, tensors, where)
    return tensors


def _check_tied_head(model_dir: Path, cfg: dict[str, Any], tensors: Tensors, where: dict[str, str]) -> None:
    """A config that ties the output layer to the embedding while the weights hold a different
    ``lm_head.weight``: transformers would drop the stored head. Compares two rows of each."""
    sub = cfg.get("text_config")
    text: dict[str, Any] = sub if isinstance(sub, dict) else cfg
    head, emb = "lm_head.weight", "model.embed_tokens.weight"
    if not text.get("tie_word_embeddings", cfg.get("tie_word_embeddings")) or head not in tensors or emb not in tensors:
        return
    if tensors[head][1] != tensors[emb][1] or tensors[head][0] != tensors[emb][0]:
        raise _fail(model_dir / "config.json", f"tie_word_embeddings is true but {head} {list(tensors[head][1])} is not "
                                               f"{emb} {list(tensors[emb][1])}; the stored head would be dropped")
    try:
        from safetensors import safe_open

        rows = []
        for name in (head, emb):
            with safe_open(str(model_dir / where[name]), framework="pt") as f:
                s = f.get_slice(name)
                rows.append((s[0:1], s[-1:]))
        same = all(bool((a == b).all()) for a, b in zip(rows[0], rows[1]))
    except Exception:  # noqa: BLE001 - a dtype the framework cannot read: not provable here
        return
    if not same:
        raise _fail(model_dir / "config.json", f"tie_word_embeddings is true but the weights hold an {head} that differs from "
                                               f"{emb}; transformers would drop it (set tie_word_embeddings to false)")


def check_adapter_weights(adapter_dir: str | Path) -> Tensors:
    """Check a peft adapter: the safetensors header, and ``r`` in adapter_config.json against the
    rank of the stored ``lora_A`` matrices (peft allocates ``r x in_features`` per layer first)."""
    adapter_dir = Path(adapter_dir)
    tensors = read_safetensors_header(adapter_dir / "adapter_model.safetensors")
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = _read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise _fail(cfg_path, "adapter_config.json must hold a JSON object")
    r = cfg.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_LORA_RANK:
        raise _fail(cfg_path, f"r must be an integer from 1 to {MAX_LORA_RANK}, got {r!r:.40}")
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise _fail(cfg_path, f"lora_alpha must be a finite number, got {alpha!r:.40}")
    patterns = cfg.get("rank_pattern") or {}
    if not isinstance(patterns, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_LORA_RANK for v in patterns.values()):
        raise _fail(cfg_path, f"rank_pattern must map module names to ranks from 1 to {MAX_LORA_RANK}")
    if not patterns:
        for name, (_, shape) in tensors.items():
            if "lora_A" in name and len(shape) == 2 and shape[0] != r:
                raise _fail(cfg_path, f"r = {r} but {name} in adapter_model.safetensors has rank {shape[0]}")
    return tensors
