"""The trainer's optimiser choices (llama_pipe.train.optim): fused AdamW, optimiser in the backward."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from llama_pipe.config import ChatSettings, LoraSettings, TrainSettings
from llama_pipe.core.errors import ConfigError
from llama_pipe.train.checkpoint import checkpoint_root
from llama_pipe.train.optim import InBackwardOptimizer, check_optimizer, fused_adamw_ok, make_optimizer
from llama_pipe.train.train import train

CHAT = ChatSettings(max_seq_len=256)


def _settings(**kw) -> TrainSettings:
    base = TrainSettings(
        micro_batch_size=2, grad_accum=1, max_steps=4, lr=1e-2, warmup_steps=1, eval_every=4,
        save_every=2, keep_checkpoints=2, lora=LoraSettings(r=4, alpha=8, dropout=0.1), seed=3, max_grad_norm=0.0,
        weight_decay=0.01,
    )
    return replace(base, **kw)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"grad_norm"' in x]


def _acc(device: str = "cpu", kind: str = "NO", processes: int = 1) -> SimpleNamespace:
    from accelerate.utils import DistributedType

    return SimpleNamespace(device=torch.device(device), distributed_type=DistributedType[kind], num_processes=processes)


def test_fused_adamw_only_on_cuda_single_process_or_ddp() -> None:
    """torch's fused AdamW (no parameter-sized temporaries) where it applies; the default elsewhere."""
    assert fused_adamw_ok(_acc("cuda")) and fused_adamw_ok(_acc("cuda", "MULTI_GPU", 2))
    assert not fused_adamw_ok(_acc("cuda", "FSDP", 2)) and not fused_adamw_ok(_acc("cuda", "DEEPSPEED", 2))
    assert not fused_adamw_ok(_acc("cpu"))
    model = torch.nn.Linear(4, 4)
    assert make_optimizer(model, _settings(), fused=True).defaults["fused"] is True
    assert not make_optimizer(model, _settings()).defaults["fused"]


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_in_backward_trains_exactly_like_the_optimizer_step(optimizer, tmp_path, tiny_hf_model_dir, data_files) -> None:
    """Same adapter, same logged gradient norms, as updating after the backward pass."""
    lora = LoraSettings(r=64, alpha=64, dropout=0.1)  # MLP lora_B 192 x 64: 8-bit moments for adamw_8bit
    train(tiny_hf_model_dir, *data_files, tmp_path / "plain", _settings(optimizer=optimizer, lora=lora), CHAT)
    inbwd = train(tiny_hf_model_dir, *data_files, tmp_path / "inbwd",
                  _settings(optimizer=optimizer, lora=lora, optimizer_in_backward=True), CHAT)
    assert inbwd["val_loss_after"] < inbwd["val_loss_before"]
    a, b = load_file(str(tmp_path / "plain" / "adapter_model.safetensors")), load_file(str(tmp_path / "inbwd" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    ma, mb = _metrics(tmp_path / "plain"), _metrics(tmp_path / "inbwd")
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [1, 2, 3, 4]
    for ra, rb in zip(ma, mb):
        assert rb["grad_norm"] > 0 and rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-5)
        assert rb["lr"] == ra["lr"]


def test_in_backward_frees_each_gradient_and_reports_the_norm() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    ref = [p.detach().clone() for p in model.parameters()]
    live: list[int] = []
    for p in model.parameters():  # count the gradients alive each time one completes (runs first)
        p.register_post_accumulate_grad_hook(lambda _: live.append(sum(q.grad is not None for q in model.parameters())))
    opt = make_optimizer(model, _settings(optimizer_in_backward=True))
    assert isinstance(opt, InBackwardOptimizer) and len(opt.param_groups) == 4
    loss = model(torch.randn(5, 8)).square().mean()
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    loss.backward()
    assert max(live) == 1  # never more than the one being applied
    assert all(p.grad is None for p in model.parameters())
    assert all(not torch.equal(p, r) for p, r in zip(model.parameters(), ref))  # every tensor was updated
    assert opt.take_grad_norm() == pytest.approx(float(torch.cat([g.flatten() for g in grads]).norm()), rel=1e-5)
    assert opt.take_grad_norm() == 0.0  # taken


def test_in_backward_resumes_exactly_from_its_checkpoint(tmp_path, tiny_hf_model_dir, data_files) -> None:
    s = _settings(optimizer_in_backward=True)
    a = tmp_path / "a"
    train(tiny_hf_model_dir, *data_files, a, s, CHAT)
    state = torch.load(a / "checkpoints" / "step-00000002" / "optimizer.bin", weights_only=True)
    assert len(state["param_groups"]) == len(state["state"]) > 2  # one group (and state) per adapter tensor
    b = tmp_path / "b"
    shutil.copytree(a / "checkpoints" / "step-00000002", checkpoint_root(b) / "checkpoints" / "step-00000002")
    resumed = train(tiny_hf_model_dir, *data_files, b, s, CHAT)
    assert resumed["resumed_from"] == 2
    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=1e-6, msg=k)


def test_in_backward_refuses_what_needs_every_gradient_first(tmp_path, tiny_hf_model_dir, data_files) -> None:
    s = _settings(optimizer_in_backward=True, max_grad_norm=1.0, grad_accum=2, on_nonfinite="skip", precision="fp16")
    with pytest.raises(ConfigError) as err:
        check_optimizer(s, _acc("cuda"))
    for need in ("max_grad_norm: 0", "grad_accum: 1", "on_nonfinite: stop", "precision bf16 or fp32"):
        assert need in str(err.value)
    s = replace(s, precision="auto")
    with pytest.raises(ConfigError) as err:
        train(tiny_hf_model_dir, *data_files, tmp_path / "x", s, CHAT)
    for need in ("max_grad_norm: 0", "grad_accum: 1", "on_nonfinite: stop"):
        assert need in str(err.value)
    assert not (tmp_path / "x").exists() and not checkpoint_root(tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="one process"):
        check_optimizer(_settings(optimizer_in_backward=True), _acc("cuda", "MULTI_GPU", 2))
    check_optimizer(_settings(optimizer_in_backward=True), _acc())  # max_grad_norm 0, grad_accum 1, stop: fine
