"""End-to-end training runs on the tiny model: output contract, exact resume after SIGKILL,
2-process DDP equivalence, qlora / int8 / full modes, and non-finite losses."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_pipe.config import ChatSettings, LoraSettings, TrainSettings
from llama_pipe.core.errors import InputError
from llama_pipe.train.checkpoint import checkpoint_root, write_manifest
from llama_pipe.train.step import NonFiniteLoss, logits_loss_sum
from llama_pipe.train.train import train

BIN = Path(sys.executable).parent


CHAT = ChatSettings(max_seq_len=256)


def _settings(**kw) -> TrainSettings:
    base = TrainSettings(
        micro_batch_size=2, grad_accum=1, max_steps=8, lr=5e-3, warmup_steps=2,
        eval_every=4, save_every=2, keep_checkpoints=2, lora=LoraSettings(r=4, alpha=8, dropout=0.1), seed=3,
    )
    return replace(base, **kw)


def _flags(s: TrainSettings) -> list[str]:
    return [
        "--max-seq-len", str(CHAT.max_seq_len), "--micro-batch-size", str(s.micro_batch_size),
        "--grad-accum", str(s.grad_accum), "--max-steps", str(s.max_steps), "--lr", str(s.lr),
        "--warmup-steps", str(s.warmup_steps), "--eval-every", str(s.eval_every), "--save-every", str(s.save_every),
        "--keep-checkpoints", str(s.keep_checkpoints), "--lora.r", str(s.lora.r), "--lora.alpha", str(s.lora.alpha),
        "--lora.dropout", str(s.lora.dropout), "--seed", str(s.seed),
    ]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def _assert_same_adapter(a: Path, b: Path, atol: float) -> None:
    ta, tb = _adapter(a), _adapter(b)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=atol, rtol=0, msg=k)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_hf_model_dir, data_files) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ref") / "run"
    summary = train(tiny_hf_model_dir, *data_files, out, _settings(), CHAT)
    return out, summary


def test_lora_run_writes_the_contracted_directory(reference_run, tiny_hf_model_dir) -> None:
    out, summary = reference_run
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "train_config.json", "metrics.jsonl", "summary.json", "checkpoints"} <= names
    assert not checkpoint_root(out).exists() and not list(out.parent.glob("run.tmp-*"))
    assert summary["val_loss_after"] < summary["val_loss_before"]
    assert json.loads((out / "summary.json").read_text())["val_loss_after"] == summary["val_loss_after"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert {"lr", "grad_norm", "tokens_per_s", "peak_mem_bytes"} <= train_rows[0].keys()
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 4, 8]
    assert train_rows[0]["lr"] < train_rows[1]["lr"]  # warm-up
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    assert (out / "checkpoints" / "step-00000006" / "adapter" / "adapter_model.safetensors").is_file()
    # Every evaluation step's adapter is kept for `llama-pipe select` (the last one is the run's own).
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step-00000004"]
    assert (out / "snapshots" / "step-00000004" / "adapter_model.safetensors").is_file()
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["train"]["lora"]["r"] == 4 and cfg["base"] == str(tiny_hf_model_dir)
    # The adapter is a working peft adapter that changes the base model's output.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template and "ASSISTANT:" in tok.chat_template
    base = AutoModelForCausalLM.from_pretrained(str(tiny_hf_model_dir))
    x = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        before = base(x).logits
        after = PeftModel.from_pretrained(base, str(out)).eval()(x).logits
    assert not torch.allclose(before, after)


class _Payload:
    """Unpickling this creates a file: proof that a loader ran a pickle without weights_only."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (os.system, (f"touch {self.path}",))


def test_sigkill_then_resume_gives_the_same_adapter(reference_run, tmp_path, tiny_hf_model_dir, data_files) -> None:
    ref_out, ref_summary = reference_run
    out = tmp_path / "run"
    s = _settings()
    cmd = [str(BIN / "llama-pipe"), "train", "--base", str(tiny_hf_model_dir), "--train-data", str(data_files[0]),
           "--val-data", str(data_files[1]), "-o", str(out), *_flags(s)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = checkpoint_root(out) / "checkpoints"
    deadline = time.time() + 120
    while not (ckpts / "step-00000004").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not out.exists()  # nothing complete-looking ...
    assert (ckpts / "step-00000004").is_dir()  # ... but the checkpoints survive
    # Damage the newest checkpoint: resume must notice and fall back to step 2.
    victim = ckpts / "step-00000004" / "trainable.safetensors"
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x55
    victim.write_bytes(bytes(data))
    # Someone who can write the checkpoint directory plants a pickle where accelerate would look
    # for registered objects, with a manifest that vouches for it: resume must never unpickle it.
    marker = tmp_path / "payload-ran"
    torch.save(_Payload(str(marker)), ckpts / "step-00000002" / "custom_checkpoint_0.pkl")
    (ckpts / "step-00000002" / "manifest.json").unlink()
    write_manifest(ckpts / "step-00000002")
    with pytest.raises(InputError, match="step-00000002: cannot restore"):
        train(tiny_hf_model_dir, *data_files, out, s, CHAT)
    assert not marker.exists(), "resume unpickled a planted file"
    (ckpts / "step-00000002" / "custom_checkpoint_0.pkl").unlink()
    (ckpts / "step-00000002" / "manifest.json").unlink()
    write_manifest(ckpts / "step-00000002")
    summary = train(tiny_hf_model_dir, *data_files, out, s, CHAT)
    assert summary["resumed_from"] == 2
    _assert_same_adapter(out, ref_out, atol=1e-6)
    assert summary["val_loss_after"] == pytest.approx(ref_summary["val_loss_after"], abs=1e-6)
    assert summary["val_loss_before"] == ref_summary["val_loss_before"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))  # no duplicated steps
    assert summary["train_tokens"] == ref_summary["train_tokens"]


def test_sigterm_checkpoints_the_current_step_and_resumes(reference_run, tmp_path, tiny_hf_model_dir, data_files) -> None:
    ref_out, _ = reference_run
    out = tmp_path / "run"
    s = _settings(save_every=100)  # no periodic checkpoint: the one written on SIGTERM is all there is
    cmd = [str(BIN / "llama-pipe"), "train", "--base", str(tiny_hf_model_dir), "--train-data", str(data_files[0]),
           "--val-data", str(data_files[1]), "-o", str(out), *_flags(s)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    live = checkpoint_root(out) / "metrics.jsonl"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if live.exists() and any('"loss"' in x for x in live.read_text().splitlines()):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM after step" in err
    # No terminal: one progress line per step in the log (issue 28: the log was silent until the first checkpoint).
    assert re.search(r"step 1/8: loss \d+\.\d{4}, [\d,]+ tok/s, \d+ s elapsed, ETA (\d+ min )?\d+ s", err), err[-2000:]
    saved = sorted(p.name for p in (checkpoint_root(out) / "checkpoints").iterdir())
    assert len(saved) == 1 and not out.exists()
    summary = train(tiny_hf_model_dir, *data_files, out, s, CHAT)
    assert summary["resumed_from"] == int(saved[0].split("-")[1]) >= 1
    _assert_same_adapter(out, ref_out, atol=1e-6)


def test_two_process_ddp_matches_one_process(tmp_path, tiny_hf_model_dir, data_files) -> None:
    s1 = _settings(grad_accum=2, max_steps=4, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    one = train(tiny_hf_model_dir, *data_files, tmp_path / "one", s1, CHAT)
    s2 = replace(s1, grad_accum=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port, so parallel test runs do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(BIN / "llama-pipe"), "train", "--base", str(tiny_hf_model_dir), "--train-data", str(data_files[0]),
           "--val-data", str(data_files[1]), "-o", str(tmp_path / "two"), "--device", "cpu", *_flags(s2)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    _assert_same_adapter(tmp_path / "two", tmp_path / "one", atol=1e-5)
    assert two["val_loss_after"] == pytest.approx(one["val_loss_after"], abs=1e-5)
    assert "train: 4 steps" in res.stdout and "val loss" in res.stdout


@pytest.mark.parametrize("storage", ["nf4", "int8"])
def test_quantised_bases_train(storage, tmp_path, tiny_hf_model_dir, data_files) -> None:
    s = _settings(base_storage=storage, max_steps=6, lr=1e-2, eval_every=6, save_every=100)
    summary = train(tiny_hf_model_dir, *data_files, tmp_path / storage, s, CHAT)
    assert summary["val_loss_after"] < summary["val_loss_before"]
    assert summary["trainable_params"] < summary["total_params"] / 5
    assert (tmp_path / storage / "adapter_model.safetensors").is_file()


def test_full_method_saves_a_loadable_model(tmp_path, tiny_hf_model_dir, data_files) -> None:
    from transformers import AutoModelForCausalLM

    s = _settings(method="full", max_steps=3, lr=1e-3, eval_every=3, save_every=100)
    summary = train(tiny_hf_model_dir, *data_files, tmp_path / "full", s, CHAT)
    assert summary["trainable_params"] == summary["total_params"]
    assert summary["val_loss_after"] < summary["val_loss_before"]
    tuned = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_hf_model_dir))
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


class NanAtStep:
    """A loss function that returns NaN for the training forward passes of one step."""

    def __init__(self, step: int) -> None:
        self.step, self.calls = step, 0

    def __call__(self, model, batch):
        loss, n = logits_loss_sum(model, batch)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.step:
                return loss * float("nan"), n
        return loss, n


def test_nonfinite_loss_stops_naming_the_step(tmp_path, tiny_hf_model_dir, data_files) -> None:
    s = _settings(max_steps=5, save_every=100, eval_every=5)
    with pytest.raises(NonFiniteLoss, match=r"^step 3: the loss is not finite"):
        train(tiny_hf_model_dir, *data_files, tmp_path / "nan", s, CHAT, loss_fn=NanAtStep(3))
    assert not (tmp_path / "nan").exists()


def test_nonfinite_loss_skip_drops_only_that_step(tmp_path, tiny_hf_model_dir, data_files) -> None:
    s = _settings(max_steps=5, save_every=100, eval_every=5, on_nonfinite="skip")
    summary = train(tiny_hf_model_dir, *data_files, tmp_path / "skip", s, CHAT, loss_fn=NanAtStep(3))
    rows = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == [3]
    assert summary["val_loss_after"] < summary["val_loss_before"]
    assert all(torch.isfinite(t).all() for t in _adapter(tmp_path / "skip").values())


def test_dora_rslora_with_gradient_checkpointing(tmp_path, tiny_hf_model_dir, data_files) -> None:
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], rslora=True)
    plain = train(tiny_hf_model_dir, *data_files, tmp_path / "a", _settings(method="dora", max_steps=2, lora=lora, save_every=100), CHAT)
    ckpt = train(tiny_hf_model_dir, *data_files, tmp_path / "b",
                 _settings(method="dora", max_steps=2, lora=lora, save_every=100, gradient_checkpointing=True), CHAT)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["use_dora"] and cfg["use_rslora"] and set(cfg["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    assert any("lora_magnitude_vector" in k for k in _adapter(tmp_path / "a"))
    # Recomputing activations changes nothing but memory.
    _assert_same_adapter(tmp_path / "b", tmp_path / "a", atol=1e-6)
    assert ckpt["val_loss_after"] == pytest.approx(plain["val_loss_after"], abs=1e-6)


def test_unknown_target_module_is_a_config_error(tmp_path, tiny_hf_model_dir, data_files) -> None:
    from llama_pipe.core.errors import ConfigError

    with pytest.raises(ConfigError, match="train.lora"):
        train(tiny_hf_model_dir, *data_files, tmp_path / "x", _settings(lora=LoraSettings(target_modules=["qkv_proj"])), CHAT)


def test_adapter_verification_catches_bad_adapters(reference_run, tmp_path, tiny_hf_model_dir) -> None:
    import shutil

    from safetensors.torch import save_file

    from llama_pipe.train.output import VerificationError, verify_adapter

    out, _ = reference_run
    good = _adapter(out)
    assert verify_adapter(out, tiny_hf_model_dir, good) == len(good)
    changed = dict(good)
    key = next(k for k in good if ".lora_A." in k)
    changed[key] = good[key] + 1e-3
    with pytest.raises(VerificationError, match="differs from the trained value"):
        verify_adapter(out, tiny_hf_model_dir, changed)
    with pytest.raises(VerificationError, match="missing"):
        verify_adapter(out, tiny_hf_model_dir, {**good, key.replace("layers.0", "layers.9"): good[key]})
    # An adapter whose B matrix never moved from its zero init is refused.
    zero_dir = tmp_path / "zero"
    shutil.copytree(out, zero_dir, ignore=shutil.ignore_patterns("checkpoints"))
    zeroed = dict(good)
    bkey = next(k for k in good if ".lora_B." in k)
    zeroed[bkey] = torch.zeros_like(good[bkey])
    save_file(zeroed, str(zero_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(VerificationError, match="all zeros"):
        verify_adapter(zero_dir, tiny_hf_model_dir, zeroed)


def test_adapter_verification_runs_on_one_process_of_a_zero3_run(reference_run, tiny_hf_model_dir, monkeypatch) -> None:
    """Under ZeRO-3 transformers builds models inside deepspeed.zero.Init, a collective; the
    check runs on the main process alone and must not enter it (it hung a 2-GPU run once)."""
    import weakref

    from transformers.integrations import deepspeed as hf_ds

    from llama_pipe.train.output import verify_adapter

    class Zero3:  # what accelerate registers with transformers for a ZeRO-3 run
        def is_zero3(self) -> bool:
            return True

    registered = Zero3()
    monkeypatch.setattr(hf_ds, "_hf_deepspeed_config_weak_ref", weakref.ref(registered))
    assert hf_ds.is_deepspeed_zero3_enabled()
    out, _ = reference_run
    good = _adapter(out)
    assert verify_adapter(out, tiny_hf_model_dir, good) == len(good)
    assert hf_ds.is_deepspeed_zero3_enabled()  # the run's registration is restored afterwards


def test_low_precision_rope_buffers_are_restored_to_fp32(tiny_hf_model_dir) -> None:
    """ZeRO-3 loading (deepspeed.zero.Init) creates RoPE's inv_freq in bf16; training must not use that."""
    from transformers import AutoModelForCausalLM

    from llama_pipe.train.model import restore_fp32_rope

    model = AutoModelForCausalLM.from_pretrained(str(tiny_hf_model_dir))
    rot = model.model.rotary_emb
    exact = rot.inv_freq.clone()
    assert exact.dtype == torch.float32 and restore_fp32_rope(model) == 0
    rot.inv_freq = rot.inv_freq.to(torch.bfloat16)  # what zero.Init leaves behind
    rot.original_inv_freq = rot.original_inv_freq.to(torch.bfloat16)
    assert not torch.equal(rot.inv_freq.float(), exact)
    assert restore_fp32_rope(model) == 1
    assert rot.inv_freq.dtype == rot.original_inv_freq.dtype == torch.float32
    assert torch.equal(rot.inv_freq, exact) and torch.equal(rot.original_inv_freq, exact)


def test_8bit_adamw_trains_and_resumes_exactly(tmp_path, tiny_hf_model_dir, data_files) -> None:
    """train.optimizer: adamw_8bit keeps 8-bit moments, learns, and resumes from its checkpoint."""
    import shutil

    s = _settings(optimizer="adamw_8bit", max_steps=4, save_every=2, eval_every=4, lr=1e-2,
                  lora=LoraSettings(r=64, alpha=64, dropout=0.0))  # lora_B of the MLP: 192 x 64 >= 4096 elements
    a = tmp_path / "a"
    summary = train(tiny_hf_model_dir, *data_files, a, s, CHAT)
    assert summary["val_loss_after"] < summary["val_loss_before"]
    state = torch.load(a / "checkpoints" / "step-00000002" / "optimizer.bin", weights_only=True)["state"]

    def moments(d):  # bitsandbytes nests them under its own key
        for k, v in d.items():
            if isinstance(v, dict):
                yield from moments(v)
            elif k in ("state1", "state2"):
                yield v

    assert torch.uint8 in {m.dtype for st in state.values() for m in moments(st)}  # the big tensors' moments are 8-bit

    b = tmp_path / "b"  # a run that stopped after step 2, then resumed
    shutil.copytree(a / "checkpoints" / "step-00000002", checkpoint_root(b) / "checkpoints" / "step-00000002")
    resumed = train(tiny_hf_model_dir, *data_files, b, s, CHAT)
    assert resumed["resumed_from"] == 2
    _assert_same_adapter(b, a, atol=1e-6)


def test_paged_optimizer_needs_a_gpu(tmp_path, tiny_hf_model_dir, data_files) -> None:
    from llama_pipe.core.errors import ConfigError

    with pytest.raises(ConfigError, match="paged_adamw_8bit"):
        train(tiny_hf_model_dir, *data_files, tmp_path / "p", _settings(optimizer="paged_adamw_8bit", device="cpu"), CHAT)
    assert not (tmp_path / "p").exists()


def test_two_process_ddp_resumes_from_its_checkpoint(tmp_path, tiny_hf_model_dir, data_files) -> None:
    """A 2-process run restarted from its step-2 checkpoint ends with the uninterrupted run's adapter."""
    import shutil

    s = _settings(grad_accum=1, max_steps=4, save_every=2, eval_every=4, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(out: Path) -> subprocess.CompletedProcess[str]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
               str(BIN / "llama-pipe"), "train", "--base", str(tiny_hf_model_dir), "--train-data", str(data_files[0]),
               "--val-data", str(data_files[1]), "-o", str(out), "--device", "cpu", *_flags(s)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    launch(tmp_path / "full")
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-00000002",
                    checkpoint_root(resumed) / "checkpoints" / "step-00000002")
    res = launch(resumed)
    assert "resumed from step 2" in res.stdout
    assert json.loads((resumed / "summary.json").read_text())["resumed_from"] == 2
    _assert_same_adapter(resumed, tmp_path / "full", atol=1e-6)

