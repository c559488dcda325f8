"""weights_fingerprint: the same weights give the same digest however they are stored; other
weights (values, dtype, names, shapes) give another."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from llama_pipe.core.errors import InputError
from llama_pipe.weights.fingerprint import _sample_starts, weights_fingerprint


def resave(src: Path, dest: Path, change=None, **save_kwargs) -> Path:
    """``src`` loaded and saved again to ``dest`` (after ``change(model)``), config and tokenizer copied."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    if change is not None:
        with torch.no_grad():
            change(model)
    model.save_pretrained(str(dest), **save_kwargs)
    return dest


def test_storage_does_not_matter(tiny_hf_model_dir: Path, tmp_path: Path) -> None:
    fp = weights_fingerprint(tiny_hf_model_dir)
    assert len(fp) == 64 and fp == weights_fingerprint(tiny_hf_model_dir)
    sharded = resave(tiny_hf_model_dir, tmp_path / "sharded", max_shard_size="100KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    assert weights_fingerprint(sharded) == fp
    # config.json, the tokenizer and sidecars are not weights
    copy = tmp_path / "copy"
    shutil.copytree(tiny_hf_model_dir, copy)
    (copy / "config.json").write_text((copy / "config.json").read_text().replace('"rms_norm_eps"', '"eos_token_id": 7, "rms_norm_eps"'))
    (copy / "llama_pipe.json").write_text("{}")
    assert weights_fingerprint(copy) == fp


@pytest.mark.parametrize("change", [
    pytest.param(lambda m: m.model.layers[1].self_attn.q_proj.weight.add_(1e-3), id="a merged update"),
    pytest.param(lambda m: m.model.layers[0].mlp.down_proj.weight[-1, -1].add_(1.0), id="the last element"),
    pytest.param(lambda m: m.model.norm.weight.mul_(2), id="a small tensor"),
    pytest.param(lambda m: m.to(torch.bfloat16), id="dtype"),
    pytest.param(lambda m: m.resize_token_embeddings(m.get_input_embeddings().weight.shape[0] + 8), id="shape"),
])
def test_other_weights_give_another_fingerprint(tiny_hf_model_dir: Path, tmp_path: Path, change) -> None:
    assert weights_fingerprint(resave(tiny_hf_model_dir, tmp_path / "m", change)) != weights_fingerprint(tiny_hf_model_dir)


def test_samples_cover_both_ends_and_whole_mode_reads_every_byte() -> None:
    assert _sample_starts(100, 4, 50) == [0]  # small: whole
    starts = _sample_starts(10_000, 4, 100)
    assert starts[0] == 0 and starts[-1] == 10_000 - 100 and len(starts) == 4
    assert _sample_starts(10_000, 0, 100) == [0]


def test_whole_mode_sees_a_change_between_the_windows(tiny_hf_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(tiny_hf_model_dir, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"  # 64 x 192 float32: 48 KiB, sampled by 2 windows of 512 bytes
    flat = tensors[name].view(-1)
    flat[flat.numel() // 3] += 1.0
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert weights_fingerprint(copy, windows=2, window=512) == weights_fingerprint(tiny_hf_model_dir, windows=2, window=512)
    assert weights_fingerprint(copy, windows=0) != weights_fingerprint(tiny_hf_model_dir, windows=0)


def test_a_directory_without_weights_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="no model.safetensors"):
        weights_fingerprint(tmp_path)
