"""The fused LoRA layers (``llama_pipe.train.fast.lora``) compute what peft's LoRA layers compute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llama_pipe.train.fast import FastOptions, apply, report
from llama_pipe.train.fast.lora import LoraLinearFunction, install


def _peft_linear(base: nn.Module, dropout: float = 0.0, r: int = 4, **kw):
    """One peft LoRA layer around ``base`` with random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = base

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    torch.manual_seed(0)
    cfg = LoraConfig(r=r, lora_alpha=3 * r, lora_dropout=dropout, target_modules=["proj"], init_lora_weights=False, **kw)
    return get_peft_model(Wrap(), cfg)


def _grads(model: nn.Module, x: torch.Tensor, seed: int = 5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    y = model(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1], dtype=torch.float32)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["x"] = x.grad.clone()
    for p in model.parameters():
        p.grad = None
    return y.detach(), grads


def test_fused_layer_equals_peft_forward_and_every_gradient() -> None:
    base = nn.Linear(24, 40, bias=True, dtype=torch.float64).requires_grad_(False)
    model = _peft_linear(base)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    ref_y, ref_g = _grads(model, x)
    assert install(model) == 1
    y, g = _grads(model, x)
    torch.testing.assert_close(y, ref_y)
    assert g.keys() == ref_g.keys() and len(g) == 3  # lora_A, lora_B, input
    for name, ref in ref_g.items():
        assert ref.abs().sum() > 0, name
        torch.testing.assert_close(g[name], ref, msg=name)
    assert install(model) == 0  # idempotent


def test_fused_function_gradients_pass_gradcheck_with_dropout() -> None:
    base = nn.Linear(6, 5, bias=True, dtype=torch.float64).requires_grad_(False)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(11)  # the same dropout mask on every evaluation
        return LoraLinearFunction.apply(x, a, b, base, 1.7, 0.4, torch.float64)

    assert torch.autograd.gradcheck(f, (x, a, b))


def test_dropout_masks_the_adapter_input_only() -> None:
    """With dropout p the output is base(x) + s * B(A(x * mask / (1 - p))), mask ~ Bernoulli(1 - p)."""
    base = nn.Linear(32, 16, bias=False, dtype=torch.float64).requires_grad_(False)
    x = torch.randn(64, 32, dtype=torch.float64)
    a, b = torch.randn(4, 32, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    p, s = 0.25, 0.5
    torch.manual_seed(3)
    y = LoraLinearFunction.apply(x, a, b, base, s, p, torch.float64)
    torch.manual_seed(3)
    mask = torch.rand_like(x, dtype=torch.float32) >= p
    torch.testing.assert_close(y, base(x) + s * ((x * mask / (1 - p)) @ a.T) @ b.T)
    assert 0.15 < 1 - mask.double().mean() < 0.35
    # A layer in eval mode applies no dropout.
    model = _peft_linear(nn.Linear(32, 16, bias=False, dtype=torch.float64).requires_grad_(False), dropout=0.5)
    ref = model.eval()(x)
    install(model)
    torch.testing.assert_close(model(x), ref)


def test_adapter_switches_fall_back_to_peft() -> None:
    base = nn.Linear(24, 40, bias=False, dtype=torch.float64).requires_grad_(False)
    model = _peft_linear(base)
    install(model)
    x = torch.randn(5, 24, dtype=torch.float64)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base(x))
    fused = model(x)
    model.merge_adapter()
    torch.testing.assert_close(model(x), fused)
    model.unmerge_adapter()
    # DoRA layers are not fused.
    dora = _peft_linear(nn.Linear(24, 40, bias=False, dtype=torch.float64).requires_grad_(False), use_dora=True)
    assert install(dora) == 0


def _tiny_model(model_dir, dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                        init_lora_weights=False))


def test_checkpoint_recompute_replays_the_fused_dropout_masks(tiny_hf_model_dir) -> None:
    """A whole model with dropout: checkpointed (recomputed forward) equals not checkpointed."""
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(1))
    results = []
    for checkpoint in (False, True):
        m = _tiny_model(tiny_hf_model_dir, 0.1)
        if checkpoint:
            m.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        apply(m, FastOptions(cpu=True))
        assert report(m).levers["fused_lora"] == "on (14 layers)"
        m.train()
        torch.manual_seed(9)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0)
    for name, g in g0.items():
        torch.testing.assert_close(g1[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_nf4_base_matches_peft_qlora_layer() -> None:
    """A bitsandbytes 4-bit base (dequantized inside the function) against peft's QLoRA layer."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(64, 128, bias=False)
    q = bnb.nn.Linear4bit(64, 128, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q = q.to("cpu")  # quantizes
    try:
        q(torch.randn(1, 64))
    except Exception as exc:  # pragma: no cover - depends on the bitsandbytes CPU build
        pytest.skip(f"bitsandbytes 4-bit on CPU unavailable here: {exc}")
    model = _peft_linear(q)
    x = torch.randn(3, 9, 64)
    ref_y, ref_g = _grads(model, x)
    assert install(model) == 1
    y, g = _grads(model, x)
    torch.testing.assert_close(y, ref_y, rtol=1e-4, atol=1e-4)
    for name, ref in ref_g.items():
        torch.testing.assert_close(g[name], ref, rtol=1e-4, atol=1e-4, msg=name)


def test_int8_base_is_fused_only_under_int8_dequant(tiny_hf_model_dir) -> None:
    """LLM.int8 layers keep peft's forward; with int8_dequant (on by default) they are fused and keep
    no dense weight."""
    from llama_pipe.config import LoraSettings, TrainSettings
    from llama_pipe.train.model import build_model

    s = TrainSettings(base_storage="int8", device="cpu", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    plain = build_model(tiny_hf_model_dir, s, "cpu", "fp32")
    apply(plain, FastOptions(cpu=True, int8_dequant=False))
    assert report(plain).levers["fused_lora"] == "on (0 layers)"
    m = build_model(tiny_hf_model_dir, s, "cpu", "fp32")
    apply(m, FastOptions(cpu=True))
    assert report(m).levers["fused_lora"] == f"on ({report(m).levers['int8_dequant'].split()[1].strip('(')} layers)"
    # The levers that follow see the dequantized layers' dtype, not LLM.int8's fp16 (peft's wrapper
    # of an 8-bit layer shares the base class's name and must not be taken for it).
    from llama_pipe.train.fast import _compute_dtype

    assert _compute_dtype(plain.get_base_model()) == torch.float16
    assert _compute_dtype(m.get_base_model()) == torch.float32  # int8_dequant's dtype on CPU
    layer = m.get_base_model().model.layers[0].mlp.down_proj
    saved: list[torch.Tensor] = []
    x = torch.randn(3, layer.in_features, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    shape = layer.get_base_layer().weight.shape
    assert saved and not any(t.is_floating_point() and t.shape == shape for t in saved)
