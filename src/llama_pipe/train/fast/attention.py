"""Variable-length (per-document) attention for packed rows, through PyTorch's flash varlen kernel.

A packed row holds several conversations; positions restart at 0 at each one. transformers
turns that into a dense block-diagonal mask for SDPA, which then cannot use its flash kernel.
This attention implementation instead reads the document boundaries off ``position_ids`` (a new
document wherever the position is not the previous one + 1, as transformers' own packed-sequence
detection does) and calls ``torch.nn.attention.varlen.varlen_attn`` (flash attention over
concatenated sequences: no mask, no attention across documents, no work on the masked half).

Registered as ``"llama_pipe_varlen"`` in transformers' attention and mask interfaces. Rows with
padding (a 2-D attention mask with zeros), KV caches, attention dropout or CPU tensors go to
transformers' SDPA path unchanged.
"""

from __future__ import annotations

import inspect
import weakref
from typing import TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig

NAME = "llama_pipe_varlen"

_cache: dict[str, Any] = {}


def varlen_available() -> bool:
    """True when this torch has ``torch.nn.attention.varlen`` and a CUDA GPU of sm80 or newer."""
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def document_boundaries(position_ids: torch.Tensor, batch: int, seq: int) -> tuple[torch.Tensor, int]:
    """``cu_seqlens`` (int32, starts of documents in the flattened batch plus the end) and the longest one.

    Every decoder layer (and every recompute under gradient checkpointing) asks again with the
    same ``position_ids`` tensor, so the answer is kept for that tensor *object* (a weak
    reference: identity, plus its in-place version counter). A key made of the data pointer and
    shape was wrong: the CUDA caching allocator hands the next step's ``position_ids`` the block
    just freed, so a new batch of the same shape got the previous batch's document boundaries
    (one micro-batch per step, ``micro_batch_size x 1``: a different step from step 7 on).
    """
    ref = _cache.get("ref")
    key = (position_ids._version, batch, seq)
    if ref is not None and ref() is position_ids and _cache.get("key") == key:
        return cast(tuple[torch.Tensor, int], _cache["value"])
    pos = position_ids.expand(batch, seq)
    start = torch.ones_like(pos, dtype=torch.bool)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    idx = torch.nonzero(start.reshape(-1), as_tuple=False).flatten()
    cu = torch.cat([idx, idx.new_tensor([batch * seq])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max().item())
    _cache["ref"], _cache["key"], _cache["value"] = weakref.ref(position_ids), key, (cu, max_len)
    return cu, max_len


def packed_causal_mask(position_ids: torch.Tensor, batch: int, seq: int) -> torch.Tensor | None:
    """A (B, 1, S, S) boolean mask: causal and within one document; None when each row is one document."""
    pos = position_ids.expand(batch, seq)
    start = torch.zeros_like(pos, dtype=torch.int32)
    start[:, 1:] = (pos[:, 1:] != pos[:, :-1] + 1).to(torch.int32)
    if not bool(start.any()):
        return None
    doc = start.cumsum(-1)
    same = doc.unsqueeze(-1) == doc.unsqueeze(-2)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=pos.device).tril()
    return (same & causal).unsqueeze(1)


def _varlen_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float | None) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    params = _cache.get("params")
    if params is None:
        params = _cache["params"] = set(inspect.signature(varlen_attn).parameters)
    kw: dict[str, Any] = {}
    if "is_causal" in params:
        kw["is_causal"] = True
    else:
        kw["window_size"] = (-1, 0)
    if scale is not None and "scale" in params:
        kw["scale"] = scale
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return cast(torch.Tensor, varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw))  # a tuple only with return_aux


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: (B, H, S, D) in, (B, S, H, D) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, hq, s, d = query.shape
    if (
        attention_mask is not None
        or position_ids is None
        or key.shape[2] != s
        or dropout > 0
        or not query.is_cuda
        or query.dtype not in (torch.bfloat16, torch.float16)
        or (scaling is not None and "scale" not in _cache.get("params", {"scale"}) and abs(scaling - d**-0.5) > 1e-9)
    ):
        if attention_mask is None and position_ids is not None and key.shape[2] == s:
            attention_mask = packed_causal_mask(position_ids, b, s)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, position_ids=position_ids, **kwargs
        )
    cu, max_len = document_boundaries(position_ids, b, s)
    q = query.transpose(1, 2).reshape(b * s, hq, d)
    k = key.transpose(1, 2).reshape(b * s, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * s, value.shape[1], d)
    out = _varlen_call(q, k, v, cu, max_len, scaling)
    return out.view(b, s, hq, d), None


def varlen_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """Mask-interface function: no mask for unpadded rows (documents come from position_ids),
    transformers' SDPA mask when there is padding (the attention then takes the SDPA path)."""
    if attention_mask is None or (attention_mask.ndim == 2 and bool(attention_mask.all())):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)  # type: ignore[misc]  # transformers passes no positionals


def install(model: torch.nn.Module) -> None:
    """Register the implementation with transformers and switch ``model`` (a PreTrainedModel) to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, varlen_mask)
    setter = getattr(model, "set_attn_implementation", None)
    try:
        if setter is None:
            raise AttributeError
        setter(NAME)
    except (AttributeError, ValueError, KeyError, ImportError):  # other transformers: set the config field
        cast("PretrainedConfig", model.config)._attn_implementation = NAME
