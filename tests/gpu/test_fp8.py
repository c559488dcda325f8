"""``train.base_storage: fp8`` on a GPU with FP8 tensor cores (run on the device; skipped elsewhere).

Tolerances, and why:

* One FP8 product against the same product of the *same rounded operands* in fp32
  (``_scaled_mm`` vs its emulation): only accumulation order and the bf16 output rounding
  (2^-9 relative) differ, so 1e-2 relative (norm) is generous; a wrong scale or layout is O(1).
* One FP8 product against the bf16 product of the original float weight: e4m3 keeps 3 mantissa
  bits, a rounding error uniform within half an ulp, RMS ~2.4% of an element for each operand,
  ~3.4% for their product (measured 3.75e-2 on random normal data, docs/benchmarks.md); the test
  asks 6e-2 (it would be ~1 for a transposed weight or a lost scale).
* Training: a small Llama, LoRA r16 all-linear, gradient checkpointing, the fast path on, 30 steps
  on a fixed batch, fp8 against the float (bf16) base: first-step loss within 1% and adapter
  gradients' cosine >= 0.97 (the rounding above, summed over many layers, does not move the
  loss by more than a few 1e-3); the last loss within 2% (AdamW amplifies rounding differences
  along the run: the 200-step curve of docs/benchmarks.md is the stronger check).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

FP8_OK = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
needs_fp8 = pytest.mark.skipif(not FP8_OK, reason="needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+)")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@needs_fp8
@pytest.mark.parametrize(("rows", "cols"), [(4096, 4096), (11008, 4096), (4096, 11008), (1, 1), (63, 65), (1000, 130)])
def test_transpose_e4m3_is_the_exact_transpose(rows: int, cols: int) -> None:
    """The Triton tile transpose (dgrad ``tiles``) gives PyTorch's ``w.t().contiguous()`` byte for byte,
    edge tiles (shapes not a multiple of 64) included."""
    from llama_pipe.train import fp8

    torch.manual_seed(0)
    w = (torch.randn(rows, cols, device="cuda") * 40).to(torch.float8_e4m3fn)
    t = fp8.transpose_e4m3(w)
    assert t.shape == (cols, rows) and t.is_contiguous() and t.dtype == torch.float8_e4m3fn
    assert torch.equal(t.view(torch.uint8), w.t().contiguous().view(torch.uint8))


@needs_fp8
@pytest.mark.parametrize(("tokens", "n_in", "n_out"), [(1000, 1024, 2816), (4096, 2816, 1024)])
def test_fp8_products_match_their_emulation_and_bf16(tokens: int, n_in: int, n_out: int) -> None:
    from llama_pipe.train import fp8

    torch.manual_seed(0)
    lin = torch.nn.Linear(n_in, n_out, bias=False, device="cuda", dtype=torch.bfloat16)
    lin.weight.requires_grad_(False)
    x = torch.randn(tokens, n_in, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(tokens, n_out, device="cuda", dtype=torch.bfloat16)
    ref_y, ref_dx = x.float() @ lin.weight.float().t(), g.float() @ lin.weight.float()
    results = {}
    for dgrad in ("transpose", "tiles", "cached", "dequant"):
        layer = fp8.Fp8Linear.from_linear(lin, "cuda", torch.bfloat16, dgrad)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(g)
        results[dgrad] = (y.detach(), xi.grad.detach())
        # the emulation: the same rounded operands (the Triton kernel's quantization vs PyTorch's), fp32 arithmetic
        xq, xs = fp8.quantize_rows(x.cpu())
        emu_y = (xq.float() * xs) @ layer.dequantized(torch.float32).cpu().t()
        assert _rel(y.cpu(), emu_y) < 1e-2, dgrad
        assert _rel(y, ref_y) < 6e-2 and _rel(xi.grad, ref_dx) < 6e-2, dgrad
        # The Triton kernel against the PyTorch reference: its divisions are the fast (<= 2 ulp) kind, so a scale may
        # differ in its last bits and an element lying on a rounding boundary may round to the next e4m3 value.
        kq, ks = fp8.quantize_rows(x)
        assert torch.allclose(ks.cpu(), xs, rtol=1e-6, atol=0)
        differ = kq.cpu().float() != xq.float()
        assert differ.float().mean() < 1e-3
        assert ((kq.cpu().float() - xq.float()).abs()[differ] <= xq.float().abs()[differ] / 8 + 2.0**-9).all()
    assert torch.equal(results["transpose"][1], results["cached"][1])
    assert _rel(results["dequant"][1], results["transpose"][1]) < 6e-2


def _model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5)
    out = tmp_path_factory.mktemp("llama_small_fp8")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model_dir(tmp_path_factory)


def _session(model_dir: Path, storage: str, steps: int):
    from llama_pipe.config import LoraSettings, TrainSettings
    from llama_pipe.train import fast
    from llama_pipe.train.session import build_session, make_accelerator

    s = TrainSettings(base_storage=storage, lora=LoraSettings(r=16, alpha=32, dropout=0.0), micro_batch_size=2, gradient_checkpointing=True,
                      precision="bf16", device="cuda", lr=1e-3, warmup_steps=2, max_grad_norm=1.0)
    acc, precision = make_accelerator(s)
    torch.manual_seed(1)
    session = build_session(acc, model_dir, s, precision, steps)
    rep = fast.report(acc.unwrap_model(session.model))
    return session, rep


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 32000, (2, 512), generator=g)
    lengths = [[200, 100, 212], [50, 300, 162]]
    pos = torch.cat([torch.cat([torch.arange(n) for n in row]).unsqueeze(0) for row in lengths])
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": pos}


@needs_fp8
def test_fp8_base_trains_like_the_bf16_base(model_dir: Path) -> None:
    from llama_pipe.train import fp8
    from llama_pipe.train.step import train_step

    steps, batch = 30, _batch()
    targets = int(batch["labels"][:, 1:].numel())
    curves, first_grads = {}, {}
    for storage in ("float", "fp8"):
        session, rep = _session(model_dir, storage, steps)
        model = session.model
        if storage == "fp8":
            n8 = sum(isinstance(m, fp8.Fp8Linear) for m in model.modules())
            assert n8 == 4 * 7, n8
            assert rep.levers["fused_lora"] == "on (28 layers)", rep.describe()
            for lever in ("fused_loss", "kernels", "varlen_attention", "offload_checkpoints", "adapter_autocast"):
                assert rep.levers[lever].startswith("on"), rep.describe()
            assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        losses = []
        for step in range(1, steps + 1):
            if step == 1:  # the first step's adapter gradients, before any update
                from llama_pipe.train.fast import model_loss_sum

                model.zero_grad(set_to_none=True)
                b = {k: v.cuda() for k, v in batch.items()}
                loss_sum, count = model_loss_sum(model, b)
                (loss_sum / count).backward()
                first_grads[storage] = torch.cat([p.grad.float().flatten() for n, p in sorted(model.named_parameters()) if p.requires_grad])
                model.zero_grad(set_to_none=True)
            losses.append(train_step(session.ctx, [batch], targets, step).loss)
        curves[storage] = losses
        del session, model
        torch.cuda.empty_cache()
    f, q = curves["float"], curves["fp8"]
    assert all(math.isfinite(x) for x in q)
    assert abs(q[0] - f[0]) <= 1e-2 * f[0], (q[0], f[0])
    cos = torch.nn.functional.cosine_similarity(first_grads["fp8"], first_grads["float"], dim=0).item()
    assert cos >= 0.97, cos
    assert q[-1] < 0.9 * q[0], "the fp8 run must learn the batch"
    assert abs(q[-1] - f[-1]) <= 2e-2 * f[-1], (q[-1], f[-1])
    print(f"fp8 vs bf16 base: first loss {q[0]:.4f} / {f[0]:.4f}, last {q[-1]:.4f} / {f[-1]:.4f}, first-step grad cosine {cos:.5f}")
