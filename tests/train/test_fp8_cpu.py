"""``train.base_storage: fp8`` off the GPU: the quantization and the layer's algebra (CPU emulation of the
FP8 products: the same rounded operands, fp32 arithmetic), peft and the fused LoRA over it, the refusals
(CPU, a GPU without FP8, dora, fp32/fp16), the planner's weight bytes, and merge-adapter merging into the
float base read from disk, not into the FP8 copy. The GPU side is tests/gpu/test_fp8.py."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from llama_pipe.config import LoraSettings, TrainSettings
from llama_pipe.config.checks import train_errors
from llama_pipe.core.errors import ConfigError
from llama_pipe.train import fp8


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_rows_quantize_to_e4m3_within_half_an_ulp() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 200, generator=g) * torch.logspace(-3, 2, 33).unsqueeze(1)  # rows of very different size
    q, s = fp8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (33, 1)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((33,), 448.0))  # every row's largest element at the top of the range
    back = q.float() * s
    # e4m3 has 3 mantissa bits: round to nearest is within 2^-4 relative for normal values
    normal = (x.abs() / s) >= 2.0**-6
    assert ((back - x).abs() <= 2.0**-4 * x.abs() + 1e-12)[normal].all()
    cs = torch.rand(200, generator=g) + 0.1
    q2, s2 = fp8.quantize_rows(x, cs)
    assert _rel(q2.float() * s2, x * cs) < 0.04
    qw, sw = fp8.quantize_weight(x)
    assert sw.shape == (33,) and torch.equal(qw, q) and torch.allclose(sw, s.squeeze(1))


def _layer(n_in: int = 64, n_out: int = 96, bias: bool = False, dgrad: fp8.Dgrad = "transpose") -> tuple[nn.Linear, fp8.Fp8Linear]:
    torch.manual_seed(1)
    lin = nn.Linear(n_in, n_out, bias=bias)
    return lin, fp8.Fp8Linear.from_linear(lin, "cpu", torch.float32, dgrad)


@pytest.mark.parametrize("dgrad", ["transpose", "tiles", "cached", "dequant"])
def test_layer_forward_and_input_gradient_are_the_fp8_products(dgrad: fp8.Dgrad) -> None:
    lin, layer = _layer(bias=True, dgrad=dgrad)
    assert layer.weight.dtype == torch.float8_e4m3fn and not layer.weight.requires_grad
    x = torch.randn(5, 7, 64, requires_grad=True)
    y = layer(x)
    w = layer.dequantized(torch.float32)
    xq, xs = fp8.quantize_rows(x.detach().reshape(-1, 64))
    ref = (xq.float() * xs) @ w.t() + lin.bias.detach()  # the rounded operands, exact arithmetic
    assert torch.allclose(y.reshape(-1, 96), ref, rtol=1e-5, atol=1e-5)
    assert _rel(y, lin(x)) < 0.06  # against the float layer: e4m3 rounding of weight and input
    g = torch.randn_like(y)
    y.backward(g)
    g2 = g.reshape(-1, 96)
    if dgrad == "dequant":
        ref_dx = g2 @ w
    else:  # g diag(s) quantized per row, times Wq
        gq, gs = fp8.quantize_rows(g2, layer.weight_scale)
        ref_dx = (gq.float() * gs) @ layer.weight.float()
    assert torch.allclose(x.grad.reshape(-1, 64), ref_dx, rtol=1e-5, atol=1e-5)
    assert _rel(x.grad.reshape(-1, 64), g2 @ lin.weight.detach()) < 0.06
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)


def _tiny_fp8_peft(model_dir: Path, fused: bool) -> nn.Module:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from llama_pipe.train import fast
    from llama_pipe.train.model import lora_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    done, kept = fp8.convert_model(model, "cpu", torch.float32)
    assert (done, kept) == (7 * model.config.num_hidden_layers, 0)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    torch.manual_seed(0)
    peft_model = get_peft_model(model, lora_config(LoraSettings(r=4, alpha=8, dropout=0.0)))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    if fused:
        fast.apply(peft_model, fast.FastOptions(cpu=True, kernels=False, varlen_attention=False, offload_checkpoints=False,
                                                adapter_autocast=False, bf16_frozen_weights=False))
        assert fast.report(peft_model).levers["fused_lora"] == "on (14 layers)"
    return peft_model


def test_peft_wraps_fp8_layers_and_fused_lora_computes_the_same(tiny_hf_model_dir: Path) -> None:
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(2))
    grads, losses = [], []
    for fused in (False, True):
        m = _tiny_fp8_peft(tiny_hf_model_dir, fused)
        lora = {n: p for n, p in m.named_parameters() if p.requires_grad}
        assert lora and all("lora_" in n and p.dtype == torch.float32 for n, p in lora.items())
        assert sum(isinstance(x, fp8.Fp8Linear) for x in m.modules()) == 14
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
        assert all(p.grad is None for p in m.parameters() if not p.requires_grad)
        losses.append(float(loss))
        grads.append(torch.cat([p.grad.flatten() for _, p in sorted(lora.items())]))
    assert math.isclose(losses[0], losses[1], rel_tol=1e-5)
    assert _rel(grads[1], grads[0]) < 1e-4


def test_fp8_is_refused_on_cpu_and_on_gpus_without_fp8(tiny_hf_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llama_pipe.train.model import build_model

    s = TrainSettings(base_storage="fp8", device="cpu")
    errs = train_errors(s)
    assert any("fp8 needs a CUDA GPU with FP8 tensor cores" in e for e in errs)
    assert any("fp8 trains LoRA adapters" in e for e in train_errors(replace(s, method="dora", device="auto")))
    assert any("fp8 computes its products in bf16" in e for e in train_errors(replace(s, precision="fp32", device="auto")))
    assert any("method full" in e for e in train_errors(replace(s, method="full", device="auto")))
    assert not train_errors(replace(s, device="auto"))
    with pytest.raises(ConfigError, match=r"base_storage: fp8: it needs a CUDA GPU .* the training device is cpu"):
        build_model(tiny_hf_model_dir, replace(s, device="auto"), "cpu", "fp32")
    # A GPU of compute capability 8.0 (A100): no FP8 tensor cores.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"A100.*compute capability 8\.0\) has no FP8 tensor cores"):
        fp8.check_supported("cuda:0", "bf16")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp8.check_supported("cuda:0", "bf16")
    with pytest.raises(ConfigError, match="precision resolved to fp16"):
        fp8.check_supported("cuda:0", "fp16")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="FSDP/DeepSpeed is not supported"):
        fp8.check_supported("cuda:0", "bf16")


def test_planner_counts_one_byte_per_base_weight() -> None:
    from llama_pipe.train import planner

    shape = planner.ModelShape(4096, 11008, 32, 32, 32, 32000)
    run = planner.RunShape(shape, "float", "lora", 16, ("all-linear",), 1024, 8)
    f8 = replace(run, storage="fp8")
    inner = 32 * shape.layer_params()
    assert planner.weight_bytes(run) - planner.weight_bytes(f8) == pytest.approx(inner * (1 - 4 / 4096), rel=1e-6)
    plan = planner.Plan(8, 1, 0, True, "adamw", False)
    p_float, p_fp8 = planner.predict(run, plan), planner.predict(f8, plan)
    assert p_float.peak - p_fp8.peak > 5.5 * planner.GiB


def test_merge_adapter_merges_into_the_float_base_not_the_fp8_copy(tiny_hf_model_dir: Path, tmp_path: Path) -> None:
    """An adapter trained over an fp8 base is a plain peft adapter; merge-adapter reads the float base from disk."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from llama_pipe.cli import main

    m = _tiny_fp8_peft(tiny_hf_model_dir, fused=False)
    m.save_pretrained(str(tmp_path / "adapter"))
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved) and all(t.dtype == torch.float32 for t in saved.values())
    out = tmp_path / "merged"
    assert main(["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(tmp_path / "adapter"), "-o", str(out)]) == 0
    base = AutoModelForCausalLM.from_pretrained(str(tiny_hf_model_dir), dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    name = "model.layers.0.self_attn.q_proj"
    a = saved[f"base_model.model.{name}.lora_A.weight"]
    b = saved[f"base_model.model.{name}.lora_B.weight"]
    w0 = base.get_submodule(name).weight.detach()
    want = w0 + 2.0 * (b @ a)  # alpha / r = 8 / 4
    got = merged.get_submodule(name).weight.detach()
    assert torch.allclose(got, want, atol=1e-6)
    fp8_base = fp8.Fp8Linear.from_linear(base.get_submodule(name), "cpu", torch.float32).dequantized(torch.float32)
    assert (got - (fp8_base + 2.0 * (b @ a))).abs().max() > 1e-3  # the e4m3-rounded weights would differ
