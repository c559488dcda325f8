"""Write a Hugging Face LlamaForCausalLM back into Meta's original layout.

``consolidated.00.pth`` (one model-parallel shard) + ``params.json`` (+ ``tokenizer.model`` when
the directory has one). Hugging Face's conversion interleaves the rotary halves of the q/k
projections differently from Meta's; :func:`unpermute` undoes ``convert_llama_weights_to_hf``'s
``permute`` so the rotary embedding sees the same pairs as in the original code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from llama_pipe.core.errors import InputError


def unpermute(w: Any, n_heads: int) -> Any:
    """Inverse of HF's q/k permutation: per head, rows ``[x0..x(d/2-1), y0..]`` -> interleaved ``[x0, y0, x1, y1, ...]``."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def ffn_params(dim: int, hidden: int) -> dict[str, Any]:
    """``multiple_of`` / ``ffn_dim_multiplier`` that reproduce ``hidden`` in Meta's FeedForward sizing."""
    base = int(2 * (4 * dim) / 3)
    m = 4096
    while m >= 1:
        if m * math.ceil(base / m) == hidden:
            return {"multiple_of": m, "ffn_dim_multiplier": None}
        m //= 2
    return {"multiple_of": 1, "ffn_dim_multiplier": (hidden + 0.5) / base}


def meta_state_dict(model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Meta state dict, params.json contents) of a LlamaForCausalLM."""
    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama":
        raise InputError(f"--format meta needs a LLaMA model; this one is {getattr(cfg, 'model_type', '?')!r}")
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    out: dict[str, Any] = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"]),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q = f"layers.{i}."
        out[q + "attention.wq.weight"] = unpermute(sd[p + "self_attn.q_proj.weight"], n_heads).clone()
        out[q + "attention.wk.weight"] = unpermute(sd[p + "self_attn.k_proj.weight"], n_kv).clone()
        out[q + "attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[q + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[q + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[q + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[q + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[q + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    params = {
        "dim": cfg.hidden_size,
        "n_layers": cfg.num_hidden_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "vocab_size": out["tok_embeddings.weight"].shape[0],
        **ffn_params(cfg.hidden_size, cfg.intermediate_size),
        "norm_eps": cfg.rms_norm_eps,
        "rope_theta": float(theta if theta else getattr(cfg, "rope_theta", 10000.0)),
        "max_seq_len": cfg.max_position_embeddings,
    }
    return out, params


def write_meta(model: Any, out_dir: str | Path) -> None:
    """Write ``consolidated.00.pth`` + ``params.json`` into ``out_dir`` (beside the HF files and ``tokenizer.model``)."""
    import torch

    out_dir = Path(out_dir)
    sd, params = meta_state_dict(model)
    torch.save(sd, out_dir / "consolidated.00.pth")
    (out_dir / "params.json").write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
