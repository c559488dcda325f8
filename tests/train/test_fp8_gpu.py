"""``llama-pipe train`` end to end over a ``base_storage: fp8`` base (run on the device; skipped without a GPU
with FP8 tensor cores): steps, validation, checkpoints, resume, and the adapter it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llama_pipe.config import ChatSettings, LoraSettings, TrainSettings
from llama_pipe.train.train import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                                                  reason="needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+)")]

CHAT = ChatSettings(max_seq_len=256)


def test_train_resume_and_adapter_over_fp8(tmp_path: Path, tiny_hf_model_dir: Path, data_files: tuple[Path, Path]) -> None:
    from safetensors.torch import load_file

    s = TrainSettings(base_storage="fp8", micro_batch_size=4, max_steps=6, lr=1e-2, warmup_steps=2, eval_every=6, save_every=3,
                      lora=LoraSettings(r=8, alpha=16), device="cuda")
    out = tmp_path / "run"
    summary = train(tiny_hf_model_dir, *data_files, out, s, CHAT)
    assert summary["base_storage"] == "fp8" and summary["precision"] == "bf16"
    assert summary["val_loss_after"] < summary["val_loss_before"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    adapter = next(out.rglob("adapter_model.safetensors"))
    saved = load_file(str(adapter))
    assert saved and all("lora_" in k and t.dtype == torch.float32 for k, t in saved.items())
    # A run that dies at step 5 (after the step-3 checkpoint) resumes from step 3 and ends where the whole run did.
    from llama_pipe.train.step import logits_loss_sum

    calls = {"n": 0}

    def crash_at_step_5(model, batch):
        if model.training:
            calls["n"] += 1
            if calls["n"] == 5:
                raise RuntimeError("planted crash")
        return logits_loss_sum(model, batch)

    out2 = tmp_path / "run2"
    with pytest.raises(RuntimeError, match="planted crash"):
        train(tiny_hf_model_dir, *data_files, out2, s, CHAT, loss_fn=crash_at_step_5)
    resumed = train(tiny_hf_model_dir, *data_files, out2, s, CHAT)
    assert resumed["resumed_from"] == 3
    assert resumed["val_loss_after"] == pytest.approx(summary["val_loss_after"], rel=2e-2)
