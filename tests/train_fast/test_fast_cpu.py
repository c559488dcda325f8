"""CPU checks of the GPU fast path's parts that also run on CPU (fused loss, checkpointing)."""

from __future__ import annotations

import pytest
import torch

from llama_pipe.train.fast import FastOptions, apply, report
from llama_pipe.train.fast.loss import (
    fused_linear_cross_entropy,
    reference_causal_lm_loss,
)


def _case(seed: int, n_tokens: int = 37, hidden: int = 24, vocab: int = 101, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, n_tokens, hidden, generator=g, dtype=dtype)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype) * 0.3
    labels = torch.randint(0, vocab, (3, n_tokens), generator=g)
    labels[torch.rand(3, n_tokens, generator=g) < 0.3] = -100
    return h, w, labels


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("num_items", [None, 50])
def test_fused_loss_and_grads_equal_full_logits(chunk: int, num_items) -> None:
    for seed in range(3):
        h, w, labels = _case(seed)
        h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
        h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
        ref = reference_causal_lm_loss(h1 @ w1.t(), labels, num_items)
        out = fused_linear_cross_entropy(h2, w2, labels, num_items_in_batch=num_items, chunk_tokens=chunk)
        (ref * 1.7).backward()
        (out * 1.7).backward()
        # Both take the softmax in fp32 (as transformers does), so they agree to fp32 rounding.
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-7)


def test_fused_loss_frozen_weight_gets_no_grad_and_ignores_padding() -> None:
    h, w, labels = _case(5, dtype=torch.float32)
    labels[1] = -100  # a row with no counted token changes nothing
    h = h.requires_grad_()
    out = fused_linear_cross_entropy(h, w, labels, chunk_tokens=16)
    out.backward()
    assert w.grad is None and h.grad is not None
    assert torch.all(h.grad[1] == 0)
    torch.testing.assert_close(out, reference_causal_lm_loss(h.detach() @ w.t(), labels), rtol=1e-5, atol=1e-6)


def test_fused_loss_rejects_mismatched_labels() -> None:
    h, w, labels = _case(0)
    with pytest.raises(ValueError, match="labels hold"):
        fused_linear_cross_entropy(h, w, labels[:, :-1])


def _tiny_lora(model_dir, dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False))
    return m


def _batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 48), generator=g)
    labels = ids.clone()
    labels[:, :10] = -100
    return ids, labels


def _lora_grads(m) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def test_auto_leaves_cpu_model_untouched(tiny_hf_model_dir) -> None:
    m = _tiny_lora(tiny_hf_model_dir, 0.0)
    base_forward = m.get_base_model().forward
    apply(m, "auto")
    assert m.get_base_model().forward == base_forward
    assert not any(report(m).on(k) for k in report(m).levers)
    assert "CPU model" in report(m).describe()


def test_none_reports_off(tiny_hf_model_dir) -> None:
    m = _tiny_lora(tiny_hf_model_dir, 0.0)
    apply(m, "none")
    assert "off" in report(m).describe()
    with pytest.raises(ValueError, match="'auto', 'auto-fp32' or 'none'"):
        apply(m, "fast")
    from llama_pipe.train.fast import options_for

    assert options_for("auto").bf16_frozen_weights and not options_for("auto-fp32").bf16_frozen_weights
    assert options_for("none") is None


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_cpu_fast_path_matches_plain_loss_and_lora_grads(tiny_hf_model_dir, dropout: float) -> None:
    """Fused loss + the offloading checkpoint function (recompute only on CPU) against plain peft,
    with checkpointing on; dropout > 0 checks that the recompute replays the same dropout masks
    (there without the fused LoRA layers, which draw their masks differently from peft's
    dropout; tests/train_fast/test_fused_lora.py checks those)."""
    plain = _tiny_lora(tiny_hf_model_dir, dropout)
    ids, labels = _batch(plain.config.vocab_size)
    plain.train()
    torch.manual_seed(7)
    ref = plain(input_ids=ids, labels=labels).loss
    ref.backward()
    ref_grads = _lora_grads(plain)

    fast = _tiny_lora(tiny_hf_model_dir, dropout)
    fast.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    apply(fast, FastOptions(cpu=True, fused_lora=dropout == 0.0))
    rep = report(fast)
    assert rep.on("fused_loss") and rep.levers["offload_checkpoints"].startswith("on (2 layers")
    assert rep.levers["fused_lora"] == ("on (14 layers)" if dropout == 0.0 else "off (not requested)")
    fast.train()
    torch.manual_seed(7)
    out = fast(input_ids=ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    grads = _lora_grads(fast)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # Without labels the original forward runs and returns logits.
    with torch.no_grad():
        assert fast(input_ids=ids).logits.shape == (*ids.shape, fast.config.vocab_size)


def test_loss_sum_contract_matches_trainer_default(tiny_hf_model_dir) -> None:
    """``model_loss_sum`` (the trainer's loss_fn contract) gives the same sum and count with
    and without the fused loss, on a packed batch."""
    from llama_pipe.train.fast import model_loss_sum

    ids, labels = _batch(512)
    pos = torch.cat([torch.arange(20), torch.arange(28)]).expand(2, 48)
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
    plain = _tiny_lora(tiny_hf_model_dir, 0.0)
    with torch.no_grad():
        # use_cache=False: with a cache transformers skips packed-sequence detection.
        logits = plain(input_ids=ids, position_ids=pos, use_cache=False).logits
        ref = reference_causal_lm_loss(logits, labels, num_items_in_batch=1)
        s0, n0 = model_loss_sum(plain, batch)
        apply(plain, FastOptions(cpu=True))
        s1, n1 = model_loss_sum(plain, batch)
    assert int(n0) == int(n1) == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(s0, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s1, ref, rtol=1e-5, atol=1e-4)


def _tiny_int8_lora(model_dir):
    """The trainer's int8 base on CPU: bitsandbytes LLM.int8 base + LoRA (r4 all-linear, B non-zero)."""
    from llama_pipe.config import LoraSettings, TrainSettings
    from llama_pipe.train.model import build_model

    torch.manual_seed(0)
    s = TrainSettings(base_storage="int8", device="cpu", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    m = build_model(model_dir, s, "cpu", "fp32")
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return m


def test_int8_dequant_matches_llm_int8_and_keeps_only_int8_for_backward(tiny_hf_model_dir) -> None:
    """The int8_dequant lever: same loss and LoRA gradients as bitsandbytes' LLM.int8 path (within
    LLM.int8's own activation-quantization error), and no dense weight kept for the backward."""
    import bitsandbytes as bnb

    from llama_pipe.train.fast import int8

    plain = _tiny_int8_lora(tiny_hf_model_dir)
    ids, labels = _batch(plain.config.vocab_size)
    plain.train()
    ref = plain(input_ids=ids, labels=labels).loss
    ref.backward()
    ref_grads = _lora_grads(plain)

    fast = _tiny_int8_lora(tiny_hf_model_dir)
    apply(fast, FastOptions(cpu=True, int8_dequant=True, fused_loss=False, offload_checkpoints=False))
    assert report(fast).levers["int8_dequant"] == "on (14 layers in torch.float32)"
    layer = fast.get_base_model().model.layers[0].mlp.down_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear8bitLt) and layer.weight.dtype == torch.int8
    # One layer exactly: the dense weight is int8 * row scale / 127.
    x = torch.randn(3, layer.in_features)
    w = layer.weight.data.float() * (int8._scales(layer).float() / 127).unsqueeze(1)
    torch.testing.assert_close(layer(x), x @ w.T)
    # What autograd keeps for the backward: nothing dense of the weight's shape in float.
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x.requires_grad_())
    assert not any(t.is_floating_point() and t.shape == layer.weight.shape for t in saved)

    fast.train()
    out = fast(input_ids=ids, labels=labels)
    out.loss.backward()
    assert abs(out.loss.item() - ref.item()) / ref.item() < 1e-2
    grads = _lora_grads(fast)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        cos = torch.nn.functional.cosine_similarity(grads[name].flatten(), g.flatten(), dim=0)
        assert cos > 0.99, (name, float(cos))
    assert all(p.grad is None for n, p in fast.named_parameters() if not p.requires_grad)


def test_int8_dequant_is_on_in_auto_and_needs_8bit_layers(tiny_hf_model_dir) -> None:
    from llama_pipe.train.fast import options_for

    assert options_for("auto").int8_dequant and options_for("auto-fp32").int8_dequant
    m = _tiny_lora(tiny_hf_model_dir, 0.0)
    apply(m, FastOptions(cpu=True, int8_dequant=True))
    assert report(m).levers["int8_dequant"] == "off (no 8-bit layers)"
