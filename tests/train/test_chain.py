"""Chaining trained adapters: each run records what it was trained on, merge-adapter accepts a sound
chain (B trained on A's merged model) and refuses B trained on the base chained after A.

Three short runs on the tiny model: A on the base, B on A's merged model, C on the base (with
other data, like seed 002's second adapter).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llama_pipe.cli import main
from llama_pipe.config import ChatSettings, LoraSettings, TrainSettings
from llama_pipe.core.errors import InputError
from llama_pipe.core.hashing import file_digest
from llama_pipe.models.lineage import trained_on
from llama_pipe.train.train import train
from llama_pipe.weights.fingerprint import weights_fingerprint

CHAT = ChatSettings(max_seq_len=128)
TEXT = "USER: What is the capital of France? ASSISTANT: Paris is the capital.</s>"


def _settings(seed: int) -> TrainSettings:
    return TrainSettings(micro_batch_size=2, max_steps=3, lr=2e-2, warmup_steps=0, eval_every=3, save_every=3,
                         lora=LoraSettings(r=4, alpha=8, dropout=0.0), seed=seed)


def _logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    from llama_pipe.weights.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = load_tokenizer(path)(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_hf_model_dir: Path, data_files: tuple[Path, Path]) -> dict[str, Path]:
    from accelerate.state import AcceleratorState, GradientState

    root = tmp_path_factory.mktemp("chain")
    train_path, val_path = data_files
    other = root / "other.jsonl"  # C's data: the same conversations in another order
    other.write_text("".join(reversed(train_path.read_text(encoding="utf-8").splitlines(keepends=True))), encoding="utf-8")
    out = {"base": tiny_hf_model_dir, "a": root / "a", "merged_a": root / "merged_a", "b": root / "b", "c": root / "c"}

    def run(base: Path, data: Path, dest: Path, seed: int) -> None:
        train(base, data, val_path, dest, _settings(seed), CHAT)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    run(tiny_hf_model_dir, train_path, out["a"], 1)
    assert main(["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(out["a"]), "-o", str(out["merged_a"])]) == 0
    run(out["merged_a"], train_path, out["b"], 2)
    run(tiny_hf_model_dir, other, out["c"], 3)
    return out


def test_each_run_records_the_weights_it_was_trained_on(runs: dict[str, Path]) -> None:
    base_fp = weights_fingerprint(runs["base"])
    a, b = trained_on(runs["a"]), trained_on(runs["b"])
    assert a is not None and b is not None
    assert a.fingerprint == base_fp and a.lineage.root == base_fp and a.lineage.steps == ()
    # B's base is A's merged model: its own weights, and what they are made of
    side = json.loads((runs["merged_a"] / "llama_pipe.json").read_text())
    assert side["fingerprint"] == weights_fingerprint(runs["merged_a"]) == b.fingerprint != base_fp
    assert b.lineage.root == base_fp
    assert [s.adapters[0].sha256 for s in b.lineage.steps] == [file_digest(runs["a"] / "adapter_model.safetensors")]


def test_a_sound_chain_merges_and_equals_b_merged_into_merged_a(runs: dict[str, Path], tmp_path: Path) -> None:
    base, a, b, merged_a = (str(runs[k]) for k in ("base", "a", "b", "merged_a"))
    chained, onto_a = tmp_path / "chained", tmp_path / "onto_a"
    assert main(["merge-adapter", "--base", base, "--adapter", a, "--adapter", b, "-o", str(chained)]) == 0
    assert main(["merge-adapter", "--base", merged_a, "--adapter", b, "-o", str(onto_a)]) == 0
    ref = _logits(onto_a)
    assert (_logits(chained) - ref).abs().max() < 1e-4
    assert (ref - _logits(runs["merged_a"])).abs().max() > 1e-3, "B must change the model for this test to mean anything"
    # Both record the same lineage: the base, then A, then B.
    lineages = [json.loads((d / "llama_pipe.json").read_text())["lineage"] for d in (chained, onto_a)]
    assert lineages[0] == lineages[1]
    assert [s["adapter"] for s in lineages[0]["steps"]] == [a, b]


def test_an_adapter_trained_on_the_base_is_refused_after_another(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    base, a, c = (str(runs[k]) for k in ("base", "a", "c"))
    out = tmp_path / "x"
    assert main(["merge-adapter", "--base", base, "--adapter", a, "--adapter", c, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{c} was trained on {base} [weights " in err and f"+ {a} [" in err and "], which it would be merged into here" in err
    assert f"llama-pipe merge-adapter --base {base} --adapter {a} -o MERGED, then llama-pipe train --base MERGED" in err
    assert "train.base_run" in err and "--combine cat" in err
    # the same adapter straight onto A's merged model
    assert main(["merge-adapter", "--base", str(runs["merged_a"]), "--adapter", c, "-o", str(out)]) == 2
    assert f"merge it into the model it was trained on (--base {base})" in capsys.readouterr().err
    # and B (trained on base + A) alone on the base
    assert main(["merge-adapter", "--base", base, "--adapter", str(runs["b"]), "-o", str(out)]) == 2
    assert not out.exists()


def test_chat_and_serve_refuse_the_same_chain(runs: dict[str, Path]) -> None:
    from llama_pipe.models.generation import load_chat_model

    with pytest.raises(InputError, match="was trained on"):
        load_chat_model(runs["base"], [runs["a"], runs["c"]], device="cpu")


def test_independent_adapters_combine_only_explicitly(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    base, a, b, c = (str(runs[k]) for k in ("base", "a", "b", "c"))
    out = tmp_path / "combined"
    assert main(["merge-adapter", "--base", base, "--adapter", a, "--adapter", c, "--combine", "cat", "--weights", "0.5,0.5",
                 "-o", str(out)]) == 0
    step = json.loads((out / "llama_pipe.json").read_text())["lineage"]["steps"]
    assert len(step) == 1 and step[0]["combine"] == "cat" and step[0]["weights"] == [0.5, 0.5]
    # B was trained on A's merged model, not on the base: it is no independent adapter of the base
    assert main(["merge-adapter", "--base", base, "--adapter", a, "--adapter", b, "--combine", "cat", "--weights", "1,1",
                 "-o", str(tmp_path / "x")]) == 2
    assert f"{b} was trained on" in capsys.readouterr().err


def test_a_base_that_changed_since_training_is_named(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    """B's base was rebuilt at the same path with other weights (here: base + C): train B again."""
    import shutil

    rebuilt = tmp_path / "merged_a"
    assert main(["merge-adapter", "--base", str(runs["base"]), "--adapter", str(runs["c"]), "-o", str(rebuilt)]) == 0
    b = tmp_path / "b"
    shutil.copytree(runs["b"], b)
    cfg = json.loads((b / "train_config.json").read_text())
    cfg["trained_on"]["path"] = str(rebuilt)
    (b / "train_config.json").write_text(json.dumps(cfg))
    assert main(["merge-adapter", "--base", str(rebuilt), "--adapter", str(b), "-o", str(tmp_path / "x")]) == 2
    assert f"train it again on {rebuilt}: that model changed since this adapter was trained on it" in capsys.readouterr().err
