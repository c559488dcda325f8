"""An independent reference forward pass of a Meta LLaMA checkpoint, for the conversion tests.

Written from Meta's model definition (``llama/model.py``): the original weight names, complex
rotary embeddings (``torch.polar`` / ``view_as_complex`` on interleaved pairs), repeat_kv for
grouped-query attention, RMSNorm and the SwiGLU feed-forward. It shares no code with
``llama_pipe.weights`` — not even the shard merging — so agreeing logits prove the conversion.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

# How Meta's model-parallel layers split each weight (fairscale ColumnParallel / RowParallel /
# ParallelEmbedding); norms are replicated.
_CONCAT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def load_merged(meta_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """params.json and the full state dict merged from every consolidated.NN.pth."""
    params = json.loads((meta_dir / "params.json").read_text())
    files = sorted(meta_dir.glob("consolidated.*.pth"))
    shards = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    merged: dict[str, torch.Tensor] = {}
    for name in shards[0]:
        module = name.split(".")[-2] if name.count(".") >= 1 else name
        if len(shards) == 1 or module not in _CONCAT_DIM:
            merged[name] = shards[0][name]
        else:
            merged[name] = torch.cat([s[name] for s in shards], dim=_CONCAT_DIM[module])
    return params, {k: v.float() for k, v in merged.items()}


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _freqs_cis(head_dim: int, end: int, theta: float) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(end).float(), freqs)
    return torch.polar(torch.ones_like(angles), angles)  # complex64, (end, head_dim / 2)


def _rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); pairs (x0, x1), (x2, x3), ... are complex numbers."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3).type_as(x)


def _ffn_hidden(dim: int, multiple_of: int, mult: float | None) -> int:
    hidden = int(2 * 4 * dim / 3)
    if mult is not None:
        hidden = int(mult * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def forward(params: dict, w: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Logits (batch, seq, vocab) in float32 for ``tokens`` (batch, seq)."""
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    head_dim = dim // n_heads
    eps = params.get("norm_eps", 1e-5)
    assert w["layers.0.feed_forward.w1.weight"].shape[0] == _ffn_hidden(
        dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")
    )
    bsz, seqlen = tokens.shape
    freqs_cis = _freqs_cis(head_dim, seqlen, params.get("rope_theta", 10000.0))
    mask = torch.triu(torch.full((seqlen, seqlen), float("-inf")), diagonal=1)
    h = w["tok_embeddings.weight"][tokens]
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = _rms_norm(h, w[p + "attention_norm.weight"], eps)
        xq = (x @ w[p + "attention.wq.weight"].T).view(bsz, seqlen, n_heads, head_dim)
        xk = (x @ w[p + "attention.wk.weight"].T).view(bsz, seqlen, n_kv, head_dim)
        xv = (x @ w[p + "attention.wv.weight"].T).view(bsz, seqlen, n_kv, head_dim)
        xq, xk = _rotary(xq, freqs_cis), _rotary(xk, freqs_cis)
        rep = n_heads // n_kv
        keys = xk.repeat_interleave(rep, dim=2)  # repeat_kv: head j uses kv head j // rep
        values = xv.repeat_interleave(rep, dim=2)
        q, k, v = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        scores = q @ k.transpose(2, 3) / math.sqrt(head_dim) + mask
        out = F.softmax(scores.float(), dim=-1) @ v
        h = h + out.transpose(1, 2).reshape(bsz, seqlen, dim) @ w[p + "attention.wo.weight"].T
        x = _rms_norm(h, w[p + "ffn_norm.weight"], eps)
        gate = F.silu(x @ w[p + "feed_forward.w1.weight"].T) * (x @ w[p + "feed_forward.w3.weight"].T)
        h = h + gate @ w[p + "feed_forward.w2.weight"].T
    return _rms_norm(h, w["norm.weight"], eps) @ w["output.weight"].T
