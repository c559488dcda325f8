"""Causal-LM cross-entropy fused with the output projection, computed in token chunks.

The plain path computes ``logits = lm_head(hidden)`` for every token (for a 32k vocabulary and
8k tokens that is 0.5 GiB in bf16 plus 1 GiB once upcast to fp32, and the same again for the
gradient), then the loss. Here the logits exist one chunk of tokens at a time: the forward
pass computes each chunk's loss *and* its gradient with respect to the hidden states (and to
the projection weight when that is trained), so the backward pass only scales what was kept.
Peak extra memory is one chunk of fp32 logits plus one bf16 copy of the hidden states.

The result equals the plain path's ``ForCausalLMLoss`` (labels shifted by one inside, ``-100``
ignored, mean over counted tokens or ``sum / num_items_in_batch``) up to floating-point
rounding; ``tests/train_fast/test_fast_cpu.py`` checks loss and gradients against it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
#: fp32 logits per chunk are capped near this many elements (256 MiB).
DEFAULT_CHUNK_ELEMENTS = 1 << 26


def chunk_tokens_for(vocab_size: int, max_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Tokens per chunk so that one chunk of fp32 logits holds at most ``max_elements`` values."""
    return max(64, max_elements // max(1, vocab_size))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return hidden.dtype if hidden.dtype == weight.dtype else torch.promote_types(hidden.dtype, weight.dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of CE(hidden @ weight.T, target) / denom, gradients made chunk by chunk."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        denom: torch.Tensor,
        chunk: int,
    ) -> torch.Tensor:
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        dtype = _compute_dtype(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            grad_h = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start : start + chunk].to(dtype)
                t = targets[start : start + chunk]
                valid = t != IGNORE_INDEX
                safe_t = torch.where(valid, t, torch.zeros_like(t)).unsqueeze(1)
                logits = (h @ w.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, safe_t).squeeze(1)
                total += torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
                if need_h or need_w:
                    # d(sum CE)/d logits = softmax - onehot(target), zero on ignored rows.
                    probs = logits.sub_(lse.unsqueeze(1)).exp_()
                    probs.scatter_add_(1, safe_t, torch.full_like(picked, -1.0).unsqueeze(1))
                    probs.mul_(valid.unsqueeze(1).to(probs.dtype))
                    g = probs.to(dtype)
                    if need_h:
                        assert grad_h is not None  # allocated above when need_h
                        grad_h[start : start + chunk] = g @ w
                    if need_w:
                        assert grad_w is not None  # allocated above when need_w
                        grad_w.addmm_(g.t().float(), h.float())
        ctx.save_for_backward(grad_h, grad_w, denom)
        ctx.hidden_dtype = hidden.dtype
        ctx.weight_dtype = weight.dtype
        return total / denom

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        grad_h, grad_w, denom = ctx.saved_tensors
        scale = grad_out / denom
        gh = (grad_h * scale.to(grad_h.dtype)).to(ctx.hidden_dtype) if grad_h is not None else None
        gw = (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy of ``hidden @ weight.T`` against ``labels``, logits never whole.

    Args:
        hidden: final hidden states, ``(batch, seq, hidden)`` (after the last norm).
        weight: output projection weight, ``(vocab, hidden)`` (``lm_head.weight``).
        labels: ``(batch, seq)`` token ids, ``-100`` where no loss is taken; shifted by one here,
            exactly as transformers' ``ForCausalLMLoss`` does.
        num_items_in_batch: when given, the loss is ``sum / num_items_in_batch`` (the count over
            all micro-batches of a gradient-accumulation step); else the mean over counted tokens.
        shift_labels: already shifted labels (take precedence over ``labels``, as in transformers).
        chunk_tokens: tokens per chunk; default keeps one chunk of fp32 logits near 256 MiB.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if targets.shape[0] != flat.shape[0]:
        raise ValueError(f"labels hold {targets.shape[0]} tokens but hidden states hold {flat.shape[0]}")
    if num_items_in_batch is None:
        denom = (targets != IGNORE_INDEX).sum().to(torch.float32)
    else:
        denom = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    chunk = chunk_tokens or chunk_tokens_for(weight.shape[0])
    return _FusedLinearCrossEntropy.apply(flat, weight, targets, denom, int(chunk))


def reference_causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """The plain path's loss on full logits (what transformers' ``ForCausalLMLoss`` computes)."""
    shift = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    flat = logits.float().reshape(-1, logits.shape[-1])
    if num_items_in_batch is None:
        return F.cross_entropy(flat, shift, ignore_index=IGNORE_INDEX, reduction="mean")
    return F.cross_entropy(flat, shift, ignore_index=IGNORE_INDEX, reduction="sum") / num_items_in_batch


def _fused_causal_lm_forward(
    self: torch.nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_values: Any = None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    use_cache: bool | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    **kwargs: Any,
) -> Any:
    """``LlamaForCausalLM.forward`` with the fused loss when labels are given (logits then None)."""
    if labels is None:
        return cast(Callable[..., Any], self._llama_pipe_plain_forward)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
    from transformers.modeling_outputs import CausalLMOutputWithPast

    outputs = cast(torch.nn.Module, self.model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        **kwargs,
    )
    loss = fused_linear_cross_entropy(
        outputs.last_hidden_state,
        cast(torch.nn.Linear, self.lm_head).weight,  # a plain nn.Linear (supports_fused_loss)
        labels,
        num_items_in_batch=kwargs.get("num_items_in_batch"),
        shift_labels=kwargs.get("shift_labels"),
    )
    # newer transformers (5.24) name this field ``cache`` and still take ``past_key_values`` (with a warning)
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values)  # type: ignore[call-arg]


def supports_fused_loss(model: torch.nn.Module) -> str | None:
    """None when :func:`patch_fused_loss` can patch ``model``, else the reason it cannot."""
    lm_head = getattr(model, "lm_head", None)
    if type(lm_head) is not torch.nn.Linear or lm_head.bias is not None:
        return "lm_head is not a plain bias-free nn.Linear (adapted or quantized?)"
    if not hasattr(model, "model"):
        return "no decoder at .model"
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1.0):
            return f"config.{attr} changes the logits"
    return None


def patch_fused_loss(model: torch.nn.Module) -> None:
    """Make ``model(..., labels=...)`` compute its loss with :func:`fused_linear_cross_entropy`.

    ``model`` is the transformers causal-LM (``LlamaForCausalLM``), not a peft wrapper. With
    labels the output's ``logits`` is ``None``; without labels the original forward runs.
    """
    import types

    if getattr(model, "_llama_pipe_plain_forward", None) is not None:
        return
    model._llama_pipe_plain_forward = model.forward  # type: ignore[assignment]
    model.forward = types.MethodType(_fused_causal_lm_forward, model)


def model_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's ``loss_fn`` contract: (sum of next-token losses, number of counted tokens),
    computed by the model itself (unlike :func:`llama_pipe.train.step.logits_loss_sum`, which
    computes it from the full logits).

    Passes the labels to the model with ``num_items_in_batch=1`` so the model's loss is the sum:
    with :func:`patch_fused_loss` applied that is the fused, chunked loss (no logits); without it
    transformers' own loss gives the same sum from full logits.
    """
    labels = batch["labels"]
    out = model(
        input_ids=batch["input_ids"],
        position_ids=batch.get("position_ids"),
        labels=labels,
        num_items_in_batch=1,
        use_cache=False,
    )
    return out.loss, (labels[:, 1:] != IGNORE_INDEX).sum()
