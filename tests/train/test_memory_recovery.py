"""train.memory on the tiny model (CPU): the plan is logged and recorded, a fitting run keeps
today's behaviour, and an out-of-memory error in the middle of a run steps the plan down once and
resumes from the last checkpoint to the same result as a run that never ran out."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import pytest
import torch

from llama_pipe.config import ChatSettings, LoraSettings, TrainSettings
from llama_pipe.core.errors import ConfigError
from llama_pipe.train.step import logits_loss_sum
from llama_pipe.train.train import train

CHAT = ChatSettings(max_seq_len=256)


def _settings(**kw: object) -> TrainSettings:
    base = TrainSettings(
        micro_batch_size=4, grad_accum=1, max_steps=6, lr=5e-3, warmup_steps=2, eval_every=3,
        save_every=2, keep_checkpoints=2, lora=LoraSettings(r=4, alpha=8, dropout=0.0), seed=3, device="cpu",
        gpu_memory_gib=4.0,
    )
    return replace(base, **kw)


class OomAt:
    """A loss function that raises CUDA's out-of-memory error on the k-th training forward, once."""

    def __init__(self, k: int) -> None:
        self.k, self.calls, self.raised = k, 0, False

    def __call__(self, model, batch):
        if model.training:
            self.calls += 1
            if self.calls == self.k and not self.raised:
                self.raised = True
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return logits_loss_sum(model, batch)


@pytest.mark.slow
def test_oom_steps_the_plan_down_once_and_resumes_to_the_same_result(tmp_path, tiny_hf_model_dir, data_files, caplog) -> None:
    train_path, val_path = data_files
    clean = train(tiny_hf_model_dir, train_path, val_path, tmp_path / "clean", _settings(), CHAT, loss_fn=logits_loss_sum)
    assert clean["memory_plan"]["plan"].startswith("micro-batch 4 x 1, checkpointing none, optimizer adamw")
    assert not clean["memory_plan"]["stepped_down"]
    assert clean["memory_plan"]["predicted_peak_bytes"] <= clean["memory_plan"]["budget_bytes"]

    hook = OomAt(5)  # one micro-batch per step: step 5, after the step-4 checkpoint
    with caplog.at_level(logging.INFO, logger="llama_pipe.train"):
        s = train(tiny_hf_model_dir, train_path, val_path, tmp_path / "oom", _settings(), CHAT, loss_fn=hook)
    assert hook.raised
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("out of memory at step 5 with micro-batch 4 x 1, checkpointing none") and
               "stepping the plan down once to " in m for m in lines), lines
    assert any("resumed from" in m and "step 4 of 6" in m for m in lines), lines
    assert s["memory_plan"]["stepped_down"] and s["memory_plan"]["plan"] != clean["memory_plan"]["plan"]
    assert s["memory_plan"]["predicted_peak_bytes"] <= 0.8 * clean["memory_plan"]["predicted_peak_bytes"]
    assert s["resumed_from"] == 4 and s["steps"] == 6
    # The smaller micro-batches make the same steps: same validation loss as the run without the error.
    assert math.isclose(s["val_loss_after"], clean["val_loss_after"], rel_tol=1e-4)
    assert math.isclose(s["val_loss_before"], clean["val_loss_before"], rel_tol=1e-6)


@pytest.mark.slow
def test_a_second_oom_or_manual_memory_is_not_retried(tmp_path, tiny_hf_model_dir, data_files) -> None:
    train_path, val_path = data_files

    class Always(OomAt):
        def __call__(self, model, batch):
            if model.training:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
            return logits_loss_sum(model, batch)

    with pytest.raises(torch.cuda.OutOfMemoryError):
        train(tiny_hf_model_dir, train_path, val_path, tmp_path / "a", _settings(max_steps=2), CHAT, loss_fn=Always(1))
    hook = OomAt(1)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        train(tiny_hf_model_dir, train_path, val_path, tmp_path / "m", _settings(max_steps=2, memory="manual"), CHAT, loss_fn=hook)


def test_no_plan_fits_is_a_clear_config_error(tmp_path, tiny_hf_model_dir, data_files) -> None:
    train_path, val_path = data_files
    with pytest.raises(ConfigError, match=r"train.memory auto: no plan fits 0\.0 GiB.*memory: manual"):
        train(tiny_hf_model_dir, train_path, val_path, tmp_path / "x", _settings(gpu_memory_gib=0.001), CHAT)
