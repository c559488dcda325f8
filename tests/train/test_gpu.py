"""CUDA paths of training (run on the device; skipped on CPU): bf16 autocast, bitsandbytes
4-bit/8-bit on the GPU, peak memory from torch.cuda, and the same output contract."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from llama_pipe.config import ChatSettings, LoraSettings, TrainSettings
from llama_pipe.train.train import train

pytestmark = pytest.mark.gpu


CHAT = ChatSettings(max_seq_len=256)


def _settings(**kw) -> TrainSettings:
    s = TrainSettings(micro_batch_size=4, max_steps=10, lr=1e-2, warmup_steps=2, eval_every=10,
                      save_every=5, lora=LoraSettings(r=8, alpha=16), device="cuda")
    return replace(s, **kw)


@pytest.mark.parametrize(("method", "storage"), [("lora", "float"), ("lora", "nf4"), ("lora", "int8"), ("full", "float")])
def test_methods_and_bases_on_cuda(method, storage, tmp_path, tiny_hf_model_dir, data_files) -> None:
    mode = f"{method}-{storage}"
    lr = 1e-3 if method == "full" else 1e-2
    summary = train(tiny_hf_model_dir, *data_files, tmp_path / mode, _settings(method=method, base_storage=storage, lr=lr), CHAT)
    assert summary["precision"] == "bf16" and summary["device"].startswith("cuda")
    assert summary["val_loss_after"] < summary["val_loss_before"]
    rows = [json.loads(x) for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert all(r["peak_mem_kind"] == "cuda_max_allocated" and r["peak_mem_bytes"] > 0 for r in steps)
    assert all(r["tokens_per_s"] > 0 for r in steps)


def test_qlora_uses_bf16_compute_and_nf4_on_cuda(tiny_hf_model_dir) -> None:
    import bitsandbytes as bnb

    from llama_pipe.train.model import build_model

    model = build_model(tiny_hf_model_dir, _settings(base_storage="nf4"), torch.device("cuda:0"), "bf16")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.compute_dtype == torch.bfloat16 for m in layers)
    assert all(m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested for m in layers)
    assert all(m.weight.device.type == "cuda" for m in layers)


def test_gradient_checkpointing_gives_the_same_step(tmp_path, tiny_hf_model_dir, data_files) -> None:
    a = train(tiny_hf_model_dir, *data_files, tmp_path / "a", _settings(max_steps=3, lora=LoraSettings(dropout=0.0)), CHAT)
    b = train(tiny_hf_model_dir, *data_files, tmp_path / "b",
              _settings(max_steps=3, lora=LoraSettings(dropout=0.0), gradient_checkpointing=True), CHAT)
    assert b["val_loss_after"] == pytest.approx(a["val_loss_after"], abs=2e-2)  # bf16 noise


def test_fp16_with_grad_scaler(tmp_path, tiny_hf_model_dir, data_files) -> None:
    summary = train(tiny_hf_model_dir, *data_files, tmp_path / "fp16", _settings(precision="fp16"), CHAT)
    assert summary["precision"] == "fp16"
    assert summary["val_loss_after"] < summary["val_loss_before"]


def test_flash_attention_packed_rows_do_not_attend_across(tiny_hf_model_dir, tokenizer, chat_records) -> None:
    """flash-attention sees packed rows flattened to (1, total); the loss equals the unpacked one."""
    pytest.importorskip("flash_attn")
    from transformers import AutoModelForCausalLM

    from llama_pipe.chat_template.builtin import get_template
    from llama_pipe.train.dataset import collate, encode_record, pack_examples
    from llama_pipe.train.step import logits_loss_sum

    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_hf_model_dir), attn_implementation="flash_attention_2", dtype=torch.bfloat16
    ).cuda().eval()
    t = get_template("vicuna_v1.1")
    examples = [encode_record({"conversations": r["conversations"][:2]}, tokenizer, t, "Be brief.") for r in chat_records[:16]]
    examples = [type(e)(e.input_ids[:200], e.labels[:200]) for e in examples]

    def total(rows, flatten):
        s = 0.0
        with torch.no_grad():
            for i in range(0, len(rows), 4):
                batch = {k: v.cuda() for k, v in collate(rows[i : i + 4], tokenizer.pad_token_id, flatten=flatten).items()}
                s += float(logits_loss_sum(model, batch)[0])
        return s

    ref = total(pack_examples(examples, 512, packing=False), flatten=False)
    got = total(pack_examples(examples, 512, packing=True), flatten=True)
    assert got == pytest.approx(ref, rel=2e-3)  # bf16
