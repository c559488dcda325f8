"""bench/multi_gpu.py's adapter-completeness check: it must flag the ways a sharded save goes wrong.

The check runs on every adapter the multi-GPU benchmark saves (DDP, FSDP, ZeRO-3); a check that
passed a ZeRO-3 adapter saved from one rank's empty shards would make that table meaningless.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.bench.loader import load_bench


@pytest.fixture(scope="module")
def mg():
    return load_bench("multi_gpu")


def _adapter(base: Path, out: Path, targets: list[str], r: int = 4) -> Path:
    """A trained-looking adapter (B non-zero) saved the way the trainer saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    peft_targets = "all-linear" if targets == ["all-linear"] else targets
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), LoraConfig(r=r, target_modules=peft_targets))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    model.save_pretrained(str(out))
    (out / "train_config.json").write_text(json.dumps({"train": {"lora": {"r": r, "target_modules": targets}}}))
    return out


def _edit(path: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    f = path / "adapter_model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f))


def test_complete_adapter_passes_and_matches_itself(mg, tiny_hf_model_dir, tmp_path) -> None:
    run = _adapter(tiny_hf_model_dir, tmp_path / "a", ["all-linear"])
    rep = mg.check_adapter(run, tiny_hf_model_dir, reference=run)
    assert rep["problems"] == [] and rep["tensors"] == rep["expected"] == 2 * 7 * 2  # 7 linears x 2 layers
    assert rep["min_cos_vs_single"] == pytest.approx(1.0)


def test_adapter_config_cannot_hide_a_missing_module(mg, tiny_hf_model_dir, tmp_path) -> None:
    """The expected modules come from what training asked for, not from the adapter's own config."""
    run = _adapter(tiny_hf_model_dir, tmp_path / "a", ["q_proj", "v_proj"])
    _edit(run, lambda t: [t.pop(k) for k in list(t) if "layers.1.self_attn.v_proj" in k])
    cfg = json.loads((run / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj"]  # as if the save had also narrowed the config
    (run / "adapter_config.json").write_text(json.dumps(cfg))
    problems = mg.check_adapter(run, tiny_hf_model_dir)["problems"]
    assert any("missing" in p and "layers.1.self_attn.v_proj.lora_A" in p for p in problems)


def test_empty_shard_and_wrong_shape_are_reported(mg, tiny_hf_model_dir, tmp_path) -> None:
    run = _adapter(tiny_hf_model_dir, tmp_path / "a", ["q_proj", "v_proj"])

    def damage(t):
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].zero_()  # one rank's empty shard
        t["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"] = torch.zeros(0)

    _edit(run, damage)
    problems = " | ".join(mg.check_adapter(run, tiny_hf_model_dir)["problems"])
    assert "layers.0.self_attn.q_proj.lora_B.weight: all zeros" in problems
    assert "layers.1.self_attn.q_proj.lora_A.weight: shape (0,)" in problems


def test_divergent_adapter_has_low_similarity(mg, tiny_hf_model_dir, tmp_path) -> None:
    ref = _adapter(tiny_hf_model_dir, tmp_path / "ref", ["q_proj", "v_proj"])
    run = _adapter(tiny_hf_model_dir, tmp_path / "run", ["q_proj", "v_proj"])
    _edit(run, lambda t: [v.neg_() for k, v in t.items() if "layers.0" in k and "lora_B" in k])
    rep = mg.check_adapter(run, tiny_hf_model_dir, reference=ref)
    assert rep["problems"] == [] and rep["min_cos_vs_single"] < 0
