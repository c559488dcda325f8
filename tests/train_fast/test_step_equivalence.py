"""A step is the same step however its rows are split into micro-batches, and with every fast-path
lever that runs on CPU (fused loss, fused LoRA, the checkpoint function, int8 dequantization).

``llama-pipe train`` runs 20 steps of 4 packed rows (unequal fill: padding in every multi-row
micro-batch, and short rows) as 4 x 1, 2 x 2 and 1 x 4, with ``kernels: none`` and with the CPU
levers; every run's per-step loss and gradient must match the reference run's. In fp32 on CPU
the only differences are summation order, so the bounds are tight (the GPU version of this test,
tests/gpu/test_step_equivalence.py, holds the issue's 1e-3 / 0.999 in bf16).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train_fast.equivalence import LAYOUTS, compare, layout, row_lengths, run_training, write_conversations

STEPS = 20
SEQ = 192


def _settings(**kw: object):
    from llama_pipe.config import LoraSettings, TrainSettings

    base = TrainSettings(
        device="cpu", precision="fp32", lr=1e-2, warmup_steps=2, max_steps=STEPS, eval_every=STEPS, save_every=1000,
        gradient_checkpointing=True, memory="manual", seed=0,
        lora=LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["all-linear"]),
    )
    from dataclasses import replace

    return replace(base, **kw)


@pytest.fixture(scope="module")
def data(tiny_hf_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    train, val = write_conversations(tmp_path_factory.mktemp("equiv_data"), median_chars=40)
    lengths = row_lengths(tiny_hf_model_dir, train, SEQ, "")
    # What the test is about: rows of unequal length (padding when batched) and some short ones.
    assert len(lengths) >= 4 * 3 and max(lengths) > SEQ * 0.9 and min(lengths) < 0.7 * SEQ, lengths
    return train, val


def test_float_base_every_layout_and_cpu_lever_computes_the_same_steps(
    tiny_hf_model_dir: Path, data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llama_pipe.config import ChatSettings
    from llama_pipe.train.fast import FastOptions

    chat = ChatSettings(max_seq_len=SEQ, system_prompt="")
    train, val = data
    runs = {"none 4x1": run_training(monkeypatch, tiny_hf_model_dir, train, val, tmp_path / "none4", layout(_settings(kernels="none"), 4, 1), chat)}
    runs["none 1x4"] = run_training(monkeypatch, tiny_hf_model_dir, train, val, tmp_path / "none1", layout(_settings(kernels="none"), 1, 4), chat)
    for micro, accum in LAYOUTS:
        runs[f"cpu levers {micro}x{accum}"] = run_training(
            monkeypatch, tiny_hf_model_dir, train, val, tmp_path / f"fast{micro}", layout(_settings(), micro, accum), chat,
            fast_options=FastOptions(cpu=True),
        )
    ref = runs.pop("none 4x1")
    assert ref.losses[-1] < 0.95 * ref.losses[0], ref.losses  # it learns: the steps compared are not all alike
    for name, trace in runs.items():
        compare(ref, trace, loss_rtol=1e-5, min_cos=0.99999, label=name)


def test_int8_base_dequant_lever_computes_the_same_steps_in_every_layout(
    tiny_hf_model_dir: Path, data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The int8_dequant lever (dense GEMMs over exactly dequantized int8 weights) in every layout;
    against bitsandbytes' LLM.int8 path only loosely (its activation quantization differs by design)."""
    from llama_pipe.config import ChatSettings
    from llama_pipe.train.fast import FastOptions

    chat = ChatSettings(max_seq_len=SEQ, system_prompt="")
    train, val = data
    lever = FastOptions(cpu=True, int8_dequant=True)
    traces = [
        run_training(monkeypatch, tiny_hf_model_dir, train, val, tmp_path / f"int8_{m}", layout(_settings(base_storage="int8"), m, a), chat, lever)
        for m, a in (LAYOUTS[0], LAYOUTS[-1])
    ]
    for trace in traces[1:]:
        compare(traces[0], trace, loss_rtol=1e-5, min_cos=0.99999)
    plain_settings = layout(_settings(base_storage="int8", kernels="none"), 4, 1)
    plain = run_training(monkeypatch, tiny_hf_model_dir, train, val, tmp_path / "int8_plain", plain_settings, chat)
    compare(plain, traces[0], loss_rtol=2e-2, min_cos=0.98)


def test_document_boundaries_are_never_reused_for_a_new_batch_at_the_same_address() -> None:
    """The varlen attention's per-forward cache of ``cu_seqlens``: a new ``position_ids`` tensor
    in the memory of the previous one (what CUDA's caching allocator does every step with one
    micro-batch per step) must get its own boundaries, not the previous batch's."""
    import numpy as np
    import torch

    from llama_pipe.train.fast.attention import document_boundaries

    buf = np.zeros((2, 8), dtype=np.int64)
    buf[:] = [0, 1, 2, 0, 1, 2, 3, 4]
    first = torch.from_numpy(buf)
    assert document_boundaries(first, 2, 8)[0].tolist() == [0, 3, 8, 11, 16]
    assert document_boundaries(first, 2, 8)[0].tolist() == [0, 3, 8, 11, 16]  # every layer asks again
    buf[:] = [0, 1, 2, 3, 4, 5, 0, 1]  # the next step's batch, same shape, same memory
    second = torch.from_numpy(buf)
    assert second.data_ptr() == first.data_ptr() and second._version == first._version
    cu, longest = document_boundaries(second, 2, 8)
    assert cu.tolist() == [0, 6, 8, 14, 16] and longest == 6
