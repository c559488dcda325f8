"""The GPU fast path computes the same optimiser steps however a step's rows are split (run on the device).

``llama-pipe train`` (the stage's own function) over packed real-length rows -- unequal fill, so
padding in every multi-row micro-batch, and short rows -- for 20 steps of 4 rows, as
``micro_batch_size x grad_accum`` = 4 x 1 (the memory planner's whole-card plan), 2 x 2 and 1 x 4
with ``kernels: auto``, and 4 x 1 and 2 x 2 with ``kernels: none``. Every run's per-step loss is
within 1e-3 (relative) of the plain 2 x 2 run's and every step's gradient has cosine >= 0.999 with
it; a bf16 base and an nf4 base, with and without gradient checkpointing.

The learning rate is 5e-4 (loss 7.05 -> 6.00 over the 20 steps). At 2e-3 the bf16 run is chaotic by
step 15: on the device (2026-12-07, H100) even ``kernels: none`` 4 x 1 against ``kernels: none`` 2 x 2 --
the plain path, rows split differently -- drifted to 8.4e-4 relative loss and gradient cosine 0.997,
as far as the fast path did, so the bounds would measure bf16 rounding amplified by AdamW, not the step.
At 5e-4 every layout, with and without the fast path, stayed within 4.3e-5 and cosine 0.99995 of the
reference (docs/benchmarks.md).

Before the fix, 4 x 1 with the varlen attention reused an earlier batch's document boundaries
whenever CUDA's allocator put the new ``position_ids`` where the old ones had been: the loss left
every other layout's at step 7 and stayed away (issue 24).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.train_fast.equivalence import compare, layout, row_lengths, run_training, write_conversations

pytestmark = pytest.mark.gpu

STEPS = 20
SEQ = 1024
RUNS = (("auto", 4, 1), ("auto", 2, 2), ("auto", 1, 4), ("none", 4, 1))
REFERENCE = ("none", 2, 2)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A random bf16 Llama (hidden 512, 4 layers, GQA) with the test tokenizer."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_pipe.weights.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    out = tmp_path_factory.mktemp("gpu_equiv_base")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def data(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    train, val = write_conversations(tmp_path_factory.mktemp("gpu_equiv_data"), n_train=120, n_val=8)
    lengths = row_lengths(base, train, SEQ)
    assert len(lengths) >= 12 and max(lengths) > 0.9 * SEQ and min(lengths) < 0.7 * SEQ, lengths
    return train, val


def _settings(storage: str, checkpointing: bool, kernels: str):
    from llama_pipe.config import LoraSettings, TrainSettings

    return TrainSettings(
        device="cuda", precision="bf16", base_storage=storage, kernels=kernels, lr=5e-4, warmup_steps=2, max_steps=STEPS,
        eval_every=STEPS, save_every=1000, gradient_checkpointing=checkpointing, memory="manual", seed=0,
        lora=LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=["all-linear"]),
    )


@pytest.mark.parametrize("storage", ["float", "nf4"])
@pytest.mark.parametrize("checkpointing", [True, False], ids=["ckpt", "no_ckpt"])
def test_every_layout_and_kernels_none_compute_the_same_steps(
    base: Path, data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, storage: str, checkpointing: bool
) -> None:
    from llama_pipe.config import ChatSettings

    chat = ChatSettings(max_seq_len=SEQ)
    train, val = data
    kernels, micro, accum = REFERENCE
    ref = run_training(monkeypatch, base, train, val, tmp_path / "ref", layout(_settings(storage, checkpointing, kernels), micro, accum), chat)
    assert ref.losses[-1] < 0.9 * ref.losses[0], ref.losses
    report = []
    for kernels, micro, accum in RUNS:
        s = layout(_settings(storage, checkpointing, kernels), micro, accum)
        trace = run_training(monkeypatch, base, train, val, tmp_path / f"{kernels}{micro}", s, chat)
        label = f"{storage} ckpt={checkpointing} kernels {kernels} {micro}x{accum}"
        worst = compare(ref, trace, loss_rtol=1e-3, min_cos=0.999, label=label)
        report.append(f"{label}: worst rel loss {worst[0]:.2e}, min cos {worst[1]:.6f}")
    print("\n".join(report))


def test_the_fast_path_was_on(base: Path, data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runs above compare what they claim to: kernels auto turns on the varlen attention, the
    fused loss and LoRA, and liger's kernels on this GPU."""
    from llama_pipe.config import ChatSettings
    from llama_pipe.train import fast, session

    seen: list[str] = []
    plain = session.apply_fast_path

    def spy(acc, model, settings, options=None):  # noqa: ANN001, ANN202 - test double
        out = plain(acc, model, settings, options)
        seen.append(fast.report(acc.unwrap_model(model)).describe())
        return out

    monkeypatch.setattr(session, "apply_fast_path", spy)
    train, val = data
    s = replace(layout(_settings("nf4", True, "auto"), 4, 1), max_steps=2)
    run_training(monkeypatch, base, train, val, tmp_path / "on", s, ChatSettings(max_seq_len=SEQ))
    assert seen, "apply_fast_path was not called"
    for lever in ("varlen_attention", "fused_loss", "fused_lora", "kernels", "offload_checkpoints"):
        assert f"{lever}: on" in seen[0], seen[0]
