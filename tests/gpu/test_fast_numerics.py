"""The GPU fast path computes what plain transformers + peft computes (run on the device).

Same weights, same adapter (randomly initialised on both sides so every LoRA matrix gets a
gradient), same packed batch (3 conversations per row, positions restarting): the loss agrees
within 1e-2 relative and every LoRA gradient has cosine similarity >= 0.99 with the plain one,
for a bf16 base, an nf4 (QLoRA) base and an LLM.int8 base, with gradient checkpointing on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
    )
    out = tmp_path_factory.mktemp("llama_small")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    return out


def _batch(seq: int = 512):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 32000, (2, seq), generator=g)
    lengths = [[200, 100, 212], [50, 300, 162]]
    pos = torch.cat([torch.cat([torch.arange(n) for n in row]).unsqueeze(0) for row in lengths])
    labels = ids.clone()
    labels[pos < 20] = -100  # "prompt" tokens of every conversation, BOS included
    return {k: v.cuda() for k, v in {"input_ids": ids, "position_ids": pos, "labels": labels}.items()}


def _build(model_dir: Path, mode: str, fast: bool):
    """``mode``: bf16 | nf4 | int8 (fast path without the int8_dequant lever: LLM.int8 matmuls) |
    int8_dequant (an int8 base with the fast path's default int8_dequant lever)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from llama_pipe.train.fast import FastOptions, apply, report

    dequant = mode == "int8_dequant"
    mode = "int8" if dequant else mode

    kw = {"dtype": torch.bfloat16, "attn_implementation": "sdpa", "device_map": {"": 0}}
    if mode == "nf4":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
        )
    elif mode == "int8":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    m = LlamaForCausalLM.from_pretrained(model_dir, **kw)
    m.config.use_cache = False  # as the trainer does; with a cache transformers ignores packing
    gc = {"use_reentrant": False}
    if mode == "bf16":
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc)
        m.enable_input_require_grads()
    else:
        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=gc)
    torch.manual_seed(1)
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=ALL, init_lora_weights=False))
    if fast:
        apply(m, FastOptions(int8_dequant=dequant))
        rep = report(m)
        expected = ["fused_loss", "kernels", "varlen_attention", "offload_checkpoints"]
        if mode != "int8" or dequant:  # LLM.int8 computes in fp16: no bf16 autocast
            expected += ["adapter_autocast"]
        if mode == "nf4" or dequant:
            expected += ["bf16_frozen_weights"]
        if mode != "int8" or dequant:  # LLM.int8 layers keep peft's forward
            assert rep.levers["fused_lora"] == f"on ({4 * len(ALL)} layers)", rep.describe()
        if dequant:
            expected += ["int8_dequant"]
        for lever in expected:
            assert rep.levers[lever].startswith("on"), rep.describe()
    m.train()
    return m


def _loss_and_grads(m, batch) -> tuple[float, dict[str, torch.Tensor]]:
    out = m(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in m.named_parameters() if p.requires_grad}
    return float(out.loss), grads


@pytest.mark.parametrize("mode", ["bf16", "nf4", "int8", "int8_dequant"])
def test_fast_path_matches_plain_peft(model_dir: Path, mode: str) -> None:
    batch = _batch()
    plain = _build(model_dir, "int8" if mode == "int8_dequant" else mode, fast=False)
    ref_loss, ref = _loss_and_grads(plain, batch)
    del plain
    torch.cuda.empty_cache()
    fast = _build(model_dir, mode, fast=True)
    loss, got = _loss_and_grads(fast, batch)
    assert abs(loss - ref_loss) <= 1e-2 * abs(ref_loss), (loss, ref_loss)
    assert got.keys() == ref.keys() and len(ref) == 4 * len(ALL) * 2
    worst = min((torch.nn.functional.cosine_similarity(got[n].flatten(), ref[n].flatten(), dim=0).item(), n) for n in ref)
    assert worst[0] >= 0.99, worst
    for n, g in ref.items():
        assert torch.isfinite(got[n]).all() and g.abs().sum() > 0, n


def test_varlen_attention_equals_block_mask(model_dir: Path) -> None:
    """Packed rows through the varlen kernel equal SDPA with transformers' block-diagonal mask."""
    from transformers import LlamaForCausalLM

    from llama_pipe.train.fast import attention

    batch = _batch()
    m = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": 0})
    m.config.use_cache = False
    with torch.no_grad():
        ref = m(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.float()
        attention.install(m)
        got = m(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.float()
        # Without restarts the rows are single documents: plain causal attention.
        single = m(input_ids=batch["input_ids"]).logits.float()
    assert m.config._attn_implementation == attention.NAME
    rel = (got - ref).norm() / ref.norm()
    assert rel < 2e-2, rel
    cross = (single - ref).norm() / ref.norm()
    assert cross > 10 * rel  # the documents really were separated


def test_offloaded_checkpoint_moves_layer_inputs_to_host(model_dir: Path) -> None:
    from llama_pipe.train.fast import report
    from llama_pipe.train.fast.offload import HostOffloader

    m = _build(model_dir, "bf16", fast=True)
    layer = m.get_base_model().model.layers[0]
    offloader = getattr(layer._gradient_checkpointing_func, "offloader", None)
    assert isinstance(offloader, HostOffloader), report(m).describe()
    before = offloader.bytes_offloaded
    _loss_and_grads(m, _batch())
    # 4 layers x 2 rows x 512 tokens x 512 hidden x 2 bytes
    assert offloader.bytes_offloaded - before == 4 * 2 * 512 * 512 * 2
