"""The adapter a run writes names its base by an absolute path: peft loads it from any directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama_pipe.config import ChatSettings, LoraSettings, TrainSettings
from llama_pipe.train.train import train


@pytest.mark.slow
def test_adapter_loads_with_auto_peft_from_another_directory(tmp_path, tiny_hf_model_dir, data_files, monkeypatch) -> None:
    # Train as the workflow does: the base given relative to the working directory.
    monkeypatch.chdir(tiny_hf_model_dir.parent)
    out = tmp_path / "run"
    settings = TrainSettings(micro_batch_size=2, max_steps=2, eval_every=2, save_every=2,
                             lora=LoraSettings(r=2, alpha=4, dropout=0.0), seed=1)
    train(Path(tiny_hf_model_dir.name), *data_files, out, settings, ChatSettings(max_seq_len=128))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_hf_model_dir.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import sys, torch; from peft import AutoPeftModelForCausalLM\n"
        "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "print(m(torch.tensor([[1, 5, 9]])).logits.shape[-1])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=elsewhere, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip().splitlines()[-1]) == json.loads((tiny_hf_model_dir / "config.json").read_text())["vocab_size"]
