"""``llama-pipe convert MODEL.gguf -o HF_DIR``: a llama.cpp GGUF file -> Hugging Face ``LlamaForCausalLM``.

What happens, in order:

1. Metadata and tensors are read with the ``gguf`` library (memory-mapped). Only
   ``general.architecture: llama`` with a byte-level BPE tokenizer (``tokenizer.ggml.model: gpt2``)
   is accepted; anything else is an :class:`InputError` naming the file and the value. Every
   metadata value used is checked for its type and bounds first (an integer size within
   :data:`llama_pipe.weights.validate.SIZE_FIELDS`' limits, heads that divide the width, a list of
   strings for the tokens, a block count equal to the ``blk.N`` tensors present), and every
   tensor's type must be one ``gguf`` can dequantize and its shape the one the metadata implies,
   before anything is dequantized or built: a malformed file is exit 2 naming the key or tensor.
2. Every tensor is dequantized to float32 (``gguf.quants.dequantize``: Q4_0, Q4_1, Q8_0, K-quants,
   F16, ...) and renamed (``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight``).
3. llama.cpp's converter permutes each head's q/k rows from Hugging Face's rotate-half layout to
   interleaved pairs; the inverse (:func:`llama_pipe.weights.meta.permute_for_rotary`, the same
   reordering a Meta checkpoint needs) is applied with ``head_count`` for q and ``head_count_kv``
   for k.
4. ``LlamaConfig`` comes from the metadata (layers, widths, heads, ``rope.freq_base``,
   ``layer_norm_rms_epsilon``, ``context_length``, vocabulary; embeddings are tied when the file
   has no ``output.weight``). The plain ``LlamaForCausalLM`` is built on the meta device, the state
   dict is loaded into it (strict: every name and shape must match) and ``save_pretrained`` writes
   safetensors in ``convert.dtype``.
5. The tokenizer: vocabulary and merges from ``tokenizer.ggml.tokens`` / ``merges``, control tokens
   as special tokens, the pre-tokenizer named by ``tokenizer.ggml.pre`` (recorded in
   ``tokenizer_config.json`` as ``gguf_pre_tokenizer``, which export checks and writes back), BOS/EOS/UNK/PAD ids, a
   BOS prepended only when ``tokenizer.ggml.add_bos_token`` says so; the model's own chat template
   (``tokenizer.chat_template``, rendered once under :mod:`llama_pipe.chat_template.jinja`'s bounds: a
   looping or escaping template is exit 2 naming the key), else ``chat.template``'s (vicuna_v1.1
   for auto).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

from llama_pipe.chat_template.builtin import AUTO, MODEL, ChatTemplate, end_of_turn_ids, template_for_bare_model
from llama_pipe.chat_template.model import ModelTemplate, model_template
from llama_pipe.config import ConvertSettings
from llama_pipe.core.atomic import atomic_dir, write_json_atomic
from llama_pipe.core.errors import InputError
from llama_pipe.weights.gguf_vocab import LLAMA_CPP_PRE, PRE_ALIASES, RECORDED_PRE
from llama_pipe.weights.meta import permute_for_rotary
from llama_pipe.weights.validate import SIZE_FIELDS

log = logging.getLogger(__name__)

#: tokenizer.ggml.pre -> the llama.cpp split (gguf_vocab.LLAMA_CPP_PRE) the HF tokenizer is built with,
#: recorded in tokenizer_config.json (gguf_vocab.RECORDED_PRE) so that export writes it back.
#: llama.cpp's "default" splits with several regexes one after another; GPT-2's single one stands
#: in for it (logged).
PRE_TOKENIZERS: dict[str, str] = {"default": "gpt-2", "gpt-2": "gpt-2", **PRE_ALIASES, **{n: n for n in LLAMA_CPP_PRE}}
CONTROL = 3  # llama.cpp token type of special tokens such as <|im_start|>
USER_DEFINED = 4

_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str:
    """The Hugging Face ``LlamaForCausalLM`` name of a llama.cpp tensor (KeyError if none)."""
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if gguf_name in fixed:
        return fixed[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight" and parts[2] in _LAYER:
        return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}.weight"
    raise KeyError(gguf_name)


class GGUFModel:
    """Metadata and tensors of one GGUF file, with the checks a LLaMA conversion needs."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        self.path = path
        try:
            self.reader = GGUFReader(str(path))
        except Exception as exc:  # gguf raises ValueError / struct errors on damaged files
            raise InputError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {str(exc)[:200]})") from None
        arch = self.get("general.architecture")
        if arch != "llama":
            raise InputError(f"{path}: general.architecture is {arch!r}; only 'llama' (LlamaForCausalLM) GGUF files are converted")
        scaling = self.get("llama.rope.scaling.type", "none")
        if scaling not in ("none", None):
            raise InputError(f"{path}: llama.rope.scaling.type {scaling!r} is not supported (only unscaled RoPE)")

    def get(self, key: str, default: Any = ...) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is ...:
                raise InputError(f"{self.path}: metadata key {key!r} is missing")
            return default
        try:
            return field.contents()
        except Exception as exc:  # noqa: BLE001 - a value gguf cannot decode (bytes that are not UTF-8, ...)
            raise InputError(f"{self.path}: metadata {key} cannot be read ({type(exc).__name__}: {str(exc)[:100]})") from None

    def _bad(self, key: str, what: str, value: Any) -> InputError:
        return InputError(f"{self.path}: metadata {key} must be {what}, got {value!r:.60}")

    def get_int(self, key: str, default: Any = ..., lo: int = 1, hi: int = 2**31) -> int:
        """An integer within [lo, hi] (a string, a float, a bool or a list is refused, naming the key)."""
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an integer", value)
        if not lo <= value <= hi:
            raise InputError(f"{self.path}: metadata {key} = {value} is out of range ({lo} to {hi})")
        return value

    def get_float(self, key: str, default: float, lo: float, hi: float) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not lo < value < hi:
            raise self._bad(key, f"a number between {lo:g} and {hi:g}", value)
        return float(value)

    def get_str(self, key: str, default: Any = ...) -> Any:
        value = self.get(key, default)
        if value is not default and not isinstance(value, str):
            raise self._bad(key, "a string", value)
        return value

    def get_list(self, key: str, kind: type, default: Any = ..., longest: int = SIZE_FIELDS["vocab_size"]) -> Any:
        """A list of ``kind`` (str or int) of at most ``longest`` items."""
        value = self.get(key, default)
        if value is default:
            return value
        if not isinstance(value, list):
            raise self._bad(key, f"a list of {kind.__name__}", value)
        if len(value) > longest:
            raise InputError(f"{self.path}: metadata {key} has {len(value):,} items; at most {longest:,} are accepted")
        for i, v in enumerate(value):
            if isinstance(v, bool) or not isinstance(v, kind):
                raise InputError(f"{self.path}: metadata {key}[{i}] must be a {kind.__name__}, got {v!r:.40}")
        return value

    def config_kwargs(self) -> dict[str, Any]:
        names = {t.name for t in self.reader.tensors}
        cap = SIZE_FIELDS
        dim = self.get_int("llama.embedding_length", hi=cap["hidden_size"])
        heads = self.get_int("llama.attention.head_count", hi=cap["num_attention_heads"])
        kv = self.get_int("llama.attention.head_count_kv", heads, hi=cap["num_key_value_heads"])
        if "llama.attention.key_length" not in self.reader.fields and dim % heads:
            raise InputError(f"{self.path}: metadata llama.embedding_length {dim} is not a multiple of llama.attention.head_count {heads}")
        head_dim = self.get_int("llama.attention.key_length", dim // heads, hi=cap["head_dim"])
        if heads % kv:
            raise InputError(f"{self.path}: metadata llama.attention.head_count {heads} is not a multiple of "
                             f"llama.attention.head_count_kv {kv}")
        if head_dim % 2:
            raise InputError(f"{self.path}: metadata llama.attention.key_length {head_dim} is odd; rotary embeddings need an even head size")
        tokens = self.get_list("tokenizer.ggml.tokens", str)
        blocks = self.get_int("llama.block_count", hi=cap["num_hidden_layers"])
        found = sorted({int(m.group(1)) for n in names if (m := re.match(r"blk\.(\d+)\.", n))})
        if found != list(range(blocks)):
            raise InputError(f"{self.path}: metadata llama.block_count is {blocks} but the file holds tensors of "
                             f"{len(found)} block(s){f' (blk.{found[0]} .. blk.{found[-1]})' if found else ''}")
        return dict(
            vocab_size=self.get_int("llama.vocab_size", len(tokens), hi=cap["vocab_size"]),
            hidden_size=dim,
            intermediate_size=self.get_int("llama.feed_forward_length", hi=cap["intermediate_size"]),
            num_hidden_layers=blocks,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            max_position_embeddings=self.get_int("llama.context_length", 4096, hi=cap["max_position_embeddings"]),
            rms_norm_eps=self.get_float("llama.attention.layer_norm_rms_epsilon", 1e-5, 0.0, 1.0),
            rope_parameters={"rope_type": "default", "rope_theta": self.get_float("llama.rope.freq_base", 10000.0, 0.0, 1e12)},
            tie_word_embeddings="output.weight" not in names,
        )

    def check_tensors(self, cfg: dict[str, Any]) -> None:
        """Every tensor's type is one gguf dequantizes, and its shape is what ``cfg`` implies (before
        anything is dequantized or allocated)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import _type_traits

        readable = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, *_type_traits}
        dim, ff, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
        q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
        per_layer = {"attn_norm": (dim,), "ffn_norm": (dim,), "attn_q": (q, dim), "attn_k": (kv, dim), "attn_v": (kv, dim),
                     "attn_output": (dim, q), "ffn_gate": (ff, dim), "ffn_up": (ff, dim), "ffn_down": (dim, ff)}
        fixed = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,), "output.weight": (vocab, dim)}
        for t in self.reader.tensors:
            if t.tensor_type not in readable:
                raise InputError(f"{self.path}: tensor {t.name!r} has type {t.tensor_type.name}, which cannot be dequantized here "
                                 "(supported: F32, F16, BF16, Q4_0 .. Q8_0, the K-quants and IQ types)")
            if t.name == "rope_freqs.weight":
                continue
            shape = tuple(int(n) for n in reversed(t.shape))
            parts = t.name.split(".")
            want = fixed.get(t.name) or (per_layer.get(parts[2]) if len(parts) == 4 and parts[0] == "blk" else None)
            if want is not None and shape != want:
                raise InputError(f"{self.path}: tensor {t.name!r} has shape {list(shape)} but the metadata implies {list(want)} "
                                 "(llama.embedding_length, feed_forward_length, attention.head_count(_kv), key_length, vocab_size)")

    def state_dict(self, cfg: dict[str, Any], dtype: Any) -> dict[str, Any]:
        """Every tensor dequantized, renamed, q/k un-permuted, cast to ``dtype``."""
        import numpy as np
        import torch
        from gguf.quants import dequantize


        out: dict[str, Any] = {}
        for t in self.reader.tensors:
            if t.name == "rope_freqs.weight":
                continue  # recomputed from rope_theta (only written by scaled-RoPE models, refused above)
            try:
                name = hf_name(t.name)
            except KeyError:
                raise InputError(f"{self.path}: tensor {t.name!r} has no LlamaForCausalLM counterpart") from None
            shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists the fastest-varying dimension first
            values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
            w = torch.from_numpy(values.copy())
            if name.endswith("q_proj.weight"):
                w = permute_for_rotary(w, cfg["num_attention_heads"])
            elif name.endswith("k_proj.weight"):
                w = permute_for_rotary(w, cfg["num_key_value_heads"])
            out[name] = w.to(dtype)
        return out


def build_tokenizer(g: GGUFModel, chat_template: str | None) -> Any:
    """A ``PreTrainedTokenizerFast`` from the GGUF's byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    kind = g.get_str("tokenizer.ggml.model")
    if kind != "gpt2":
        raise InputError(f"{g.path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') tokenizers are converted")
    pre = g.get_str("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise InputError(f"{g.path}: tokenizer.ggml.pre {pre!r} is not known here (known: {sorted(PRE_TOKENIZERS)})")
    tokens: list[str] = list(g.get_list("tokenizer.ggml.tokens", str))
    if not tokens:
        raise InputError(f"{g.path}: metadata tokenizer.ggml.tokens is empty")
    types: list[int] = list(g.get_list("tokenizer.ggml.token_type", int, [1] * len(tokens)))
    if len(types) != len(tokens):
        raise InputError(f"{g.path}: metadata tokenizer.ggml.token_type has {len(types)} items for {len(tokens)} tokens")
    raw_merges = g.get_list("tokenizer.ggml.merges", str, longest=4 * SIZE_FIELDS["vocab_size"])
    merges = [tuple(m.split(" ", 1)) for m in raw_merges]
    bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
    if bad is not None:
        raise InputError(f"{g.path}: metadata tokenizer.ggml.merges[{bad}] is {raw_merges[bad]!r:.40}; a merge is two tokens and a space")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise InputError(f"{g.path}: tokenizer.ggml.tokens holds duplicate tokens")
    name = PRE_TOKENIZERS[pre]
    if pre == "default":
        log.warning("%s: tokenizer.ggml.pre 'default' (llama.cpp's generic split): GPT-2's split is used; "
                    "an export writes 'gpt-2'", g.path)
    split = LLAMA_CPP_PRE[name]
    try:
        tk = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=split.ignore_merges))
    except Exception as exc:  # noqa: BLE001 - tokenizers refuses merges of unknown tokens, ...
        raise InputError(f"{g.path}: metadata tokenizer.ggml.merges do not fit tokenizer.ggml.tokens ({str(exc)[:120]})") from None
    byte_level = [pre_tokenizers.Split(Regex(split.pattern), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tk.pre_tokenizer = pre_tokenizers.Sequence(([pre_tokenizers.Digits(individual_digits=True)] if split.digits else []) + byte_level)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok, ty in zip(tokens, types) if ty == CONTROL])
    tk.add_tokens([AddedToken(tok, special=False, normalized=False) for tok, ty in zip(tokens, types) if ty == USER_DEFINED])

    def token(key: str) -> str | None:
        i = g.get_int(f"tokenizer.ggml.{key}_token_id", None, lo=0, hi=len(tokens) - 1) \
            if f"tokenizer.ggml.{key}_token_id" in g.reader.fields else None
        return tokens[i] if i is not None else None

    bos, eos, unk, pad = token("bos"), token("eos"), token("unknown"), token("padding")
    if eos is None:
        raise InputError(f"{g.path}: no tokenizer.ggml.eos_token_id")
    post: list[Any] = [processors.ByteLevel(trim_offsets=False)]
    add_bos = g.get("tokenizer.ggml.add_bos_token", False)
    if not isinstance(add_bos, bool):
        raise g._bad("tokenizer.ggml.add_bos_token", "true or false", add_bos)
    if add_bos and bos is not None:
        post.append(processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]))
    tk.post_processor = processors.Sequence(post)
    if pad is None or pad == eos:
        # The EOS ends every assistant reply and is a label: padding with it would mask it.
        pad = unk if unk not in (None, eos) else None
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
                                 clean_up_tokenization_spaces=False, **{RECORDED_PRE: name})
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


def convert_gguf(gguf_file: Path, out_dir: Path, settings: ConvertSettings, template: str = AUTO) -> dict[str, Any]:
    """Convert one GGUF file into an HF model directory; returns a summary. ``template``: chat.template,
    used when the file has no ``tokenizer.chat_template``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    g = GGUFModel(gguf_file)
    cfg = g.config_kwargs()
    g.check_tensors(cfg)
    own = g.get_str("tokenizer.chat_template", None)
    tok = build_tokenizer(g, own or None)
    added = None if own else template_for_bare_model(template, gguf_file)
    if added is not None:
        tok.chat_template = added.jinja_for(tok)
    if settings.context_length:
        cfg["max_position_embeddings"] = settings.context_length
    if len(tok) != cfg["vocab_size"]:
        raise InputError(f"{gguf_file}: the tokenizer has {len(tok)} tokens but llama.vocab_size is {cfg['vocab_size']}")
    stored = added or _own_template(tok, f"{gguf_file}: metadata tokenizer.chat_template")  # rendered once, bounded
    dtype = getattr(torch, settings.dtype)
    state = g.state_dict(cfg, dtype)
    config = LlamaConfig(**cfg, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise InputError(
            f"{gguf_file}: tensors do not fit the model the metadata describes: missing {missing[:3]}, "
            f"unexpected {extra[:3]}, wrong shape {[(k, got[k], expected[k]) for k in wrong[:3]]}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.config.dtype = settings.dtype
    eos_ids = end_of_turn_ids(tok, stored)

    with atomic_dir(out_dir, stage="convert", inputs=[gguf_file]) as tmp:
        model.save_pretrained(str(tmp), max_shard_size=settings.max_shard_size)
        GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids,
                         pad_token_id=tok.pad_token_id).save_pretrained(tmp)
        tok.save_pretrained(str(tmp))
        write_json_atomic(tmp / "gguf_source.json", {
            "file": gguf_file.name,
            "name": g.get("general.name", None),
            "tensor_types": sorted({t.tensor_type.name for t in g.reader.tensors}),
            "chat_template": "the model's own (tokenizer.chat_template)" if added is None else added.name,
        })
    n = sum(v.numel() for k, v in state.items() if not (config.tie_word_embeddings and k == "lm_head.weight"))
    return {"tensors": len(g.reader.tensors), "parameters": n, "vocab": len(tok),
            "files": len(list(out_dir.glob("*.safetensors"))), "own_template": bool(own), "template": stored.name}


def _own_template(tok: Any, source: str) -> ChatTemplate:
    """The model's own template, checked by rendering a probe within the bounds (a hostile one is
    an InputError naming ``source``); one that cannot be trained on as it is only warns."""
    try:
        return model_template(tok, source)
    except ValueError as exc:
        log.warning("%s: %s (chat.template must name a built-in to train on this model)", source, exc)
        return ModelTemplate(MODEL, "", tok.eos_token or "", tok.chat_template, tok, source=source)


def find_gguf(src: Path) -> Path | None:
    """``src`` itself when a ``.gguf`` file, else the only ``*.gguf`` in directory ``src`` (None: none)."""
    if src.is_file():
        return src if src.suffix == ".gguf" else None
    found = sorted(src.glob("*.gguf"))
    if len(found) > 1:
        raise InputError(f"{src}: {len(found)} GGUF files ({[f.name for f in found]}); give the one to convert")
    return found[0] if found else None
