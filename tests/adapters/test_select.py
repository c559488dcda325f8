"""``llama-pipe select``: the kept checkpoint is the best validation loss within the retention bound."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llama_pipe.cli import main
from llama_pipe.evaluation.retention import ItemScore
from llama_pipe.train.retention_probe import score_to_json


def _scores(correct: list[bool]) -> list[list]:
    """Item scores whose choice 0 wins exactly where ``correct`` (answer 0) holds."""
    return [score_to_json(ItemScore(f"q{i}", "cat", 0, (0.0, -1.0) if ok else (-1.0, 0.0), (4, 4), (1, 1)))
            for i, ok in enumerate(correct)]


def make_run(root: Path, val: dict[int, float], retention: dict[int, list[bool]] | None, last: int = 12) -> Path:
    run = root / "train"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"steps": last}))
    (run / "train_config.json").write_text(json.dumps({"train": {"run": "r"}}))
    (run / "tokenizer_config.json").write_text("{}")
    (run / "adapter_config.json").write_text(json.dumps({"step": last}))
    (run / "adapter_model.safetensors").write_bytes(f"final {last}".encode())
    rows = [{"step": 1, "loss": 2.0}] + [{"step": s, "val_loss": v} for s, v in sorted(val.items())]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for step in val:
        if 0 < step < last:
            snap = run / "snapshots" / f"step-{step:08d}"
            snap.mkdir(parents=True)
            (snap / "adapter_config.json").write_text(json.dumps({"step": step}))
            (snap / "adapter_model.safetensors").write_bytes(f"snapshot {step}".encode())
    if retention is not None:
        (run / "retention.jsonl").write_text("".join(json.dumps({"step": s, "scores": _scores(c)}) + "\n" for s, c in retention.items()))
    return run


N = 200
BASE = [True] * 150 + [False] * 50  # 75 %


def _drop(points: float) -> list[bool]:
    """The base's answers with ``points`` percent of the items turned wrong."""
    k = int(points * N / 100)
    return [False] * k + BASE[k:]


def _select(run: Path, out: Path, *flags: str) -> dict:
    assert main(["select", str(run), "-o", str(out), *flags]) == 0
    return json.loads((out / "selection.json").read_text())


def test_keeps_the_best_validation_loss_whose_retention_stays_within_the_bound(tmp_path: Path) -> None:
    run = make_run(tmp_path, {0: 3.0, 4: 2.0, 8: 1.5, 12: 1.2}, {0: BASE, 4: BASE, 8: _drop(0.5), 12: _drop(15)})
    sel = _select(run, tmp_path / "sel")
    assert sel["kept_step"] == 8 and sel["within_bound"] and sel["retention_used"]
    by_step = {c["step"]: c for c in sel["candidates"]}
    assert by_step[12]["retention"]["within"] is False and by_step[12]["retention"]["diff"] == pytest.approx(-15.0)
    assert by_step[8]["retention"]["diff"] == pytest.approx(-0.5)
    # the kept step's adapter, with the run's tokenizer and records
    assert (tmp_path / "sel" / "adapter_model.safetensors").read_bytes() == b"snapshot 8"
    assert (tmp_path / "sel" / "train_config.json").is_file() and (tmp_path / "sel" / "tokenizer_config.json").is_file()
    assert not (tmp_path / "sel" / "metrics.jsonl").exists()


def test_the_last_step_when_it_keeps_retention(tmp_path: Path) -> None:
    run = make_run(tmp_path, {0: 3.0, 6: 2.0, 12: 1.5}, {0: BASE, 6: _drop(1), 12: BASE})
    sel = _select(run, tmp_path / "sel")
    assert sel["kept_step"] == 12
    assert (tmp_path / "sel" / "adapter_model.safetensors").read_bytes() == b"final 12"


def test_none_within_the_bound_keeps_the_least_loss_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path, {0: 3.0, 6: 2.0, 12: 1.5}, {0: BASE, 6: _drop(8), 12: _drop(20)})
    sel = _select(run, tmp_path / "sel")
    assert sel["kept_step"] == 6 and sel["within_bound"] is False
    assert "lost least" in sel["reason"]


def test_a_wider_bound_keeps_a_later_step(tmp_path: Path) -> None:
    """A 1-point drop on 200 items is within 2 points (though its interval reaches about -2.4), 10 points is not."""
    run = make_run(tmp_path, {0: 3.0, 6: 2.0, 12: 1.5}, {0: BASE, 6: _drop(1), 12: _drop(10)})
    assert _select(run, tmp_path / "a")["kept_step"] == 6
    assert _select(run, tmp_path / "b", "--bound", "20")["kept_step"] == 12


@pytest.mark.parametrize("retention", [None, "off"])
def test_without_retention_scores_the_last_step(tmp_path: Path, retention: str | None) -> None:
    run = make_run(tmp_path, {0: 3.0, 6: 1.0, 12: 1.5}, None if retention is None else {0: BASE, 6: BASE, 12: _drop(30)})
    flags = ("--retention", "false") if retention == "off" else ()
    sel = _select(run, tmp_path / "sel", *flags)
    assert sel["kept_step"] == 12 and not sel["retention_used"]


def test_not_a_training_run_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x").mkdir()
    assert main(["select", str(tmp_path / "x"), "-o", str(tmp_path / "sel")]) == 2
    assert "not a finished training run" in capsys.readouterr().err


def _real_run(root: Path, adapter: Path) -> Path:
    """A finished run around a real peft adapter (no retention scores: select keeps the last step)."""
    run = root / "train"
    shutil.copytree(adapter, run)
    (run / "summary.json").write_text(json.dumps({"steps": 4}))
    (run / "train_config.json").write_text(json.dumps({"train": {"run": "r"}}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 4, "val_loss": 1.0}) + "\n")
    return run


def test_scale_puts_the_product_on_the_line_between_base_and_tuned(tiny_hf_model_dir: Path, tmp_path: Path, tokenizer) -> None:
    """select.scale 0.5, merged: base + 0.5 x the adapter's update, exactly (what WiSE-FT interpolation means)."""
    from tests.adapters.test_merge_adapter import load, logits, make_adapter, reference_sum

    adapter = make_adapter(tiny_hf_model_dir, tmp_path / "adapter", 5, ["q_proj", "v_proj", "down_proj"])
    run = _real_run(tmp_path, adapter)
    sel = _select(run, tmp_path / "sel", "--scale", "0.5")
    assert sel["scale"] == 0.5 and sel["scale_not_applied"] is None
    assert main(["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(tmp_path / "sel"), "-o", str(tmp_path / "m")]) == 0
    base = logits(load(tiny_hf_model_dir), tokenizer)
    ref_half = logits(reference_sum(tiny_hf_model_dir, [(adapter, 0.5)]), tokenizer)
    got = logits(load(tmp_path / "m"), tokenizer)
    assert (ref_half - base).abs().max() > 1e-2  # the update is not negligible
    assert (got - ref_half).abs().max() < 1e-4
    # the run's own adapter is untouched (linked files are never written through)
    assert (run / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()


def test_scale_is_not_applied_to_a_dora_adapter_and_says_why(tiny_hf_model_dir: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    from tests.adapters.test_merge_adapter import make_adapter

    adapter = make_adapter(tiny_hf_model_dir, tmp_path / "adapter", 6, ["q_proj"], use_dora=True)
    sel = _select(_real_run(tmp_path, adapter), tmp_path / "sel", "--scale", "0.5")
    assert sel["scale"] == 1.0 and "DoRA" in sel["scale_not_applied"]
    assert (tmp_path / "sel" / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    assert "not applied" in caplog.text


def test_the_report_says_at_what_weight_the_adapter_entered_the_product(tmp_path: Path) -> None:
    from llama_pipe.report.retention import selection_lines

    run = make_run(tmp_path, {0: 3.0, 12: 1.2}, {0: BASE, 12: BASE})
    sel = _select(run, tmp_path / "sel", "--scale", "0.5")  # a fake adapter: not LoRA, so not scaled, and said
    text = "\n".join(selection_lines(sel))
    assert "`select.scale` 0.5 was not applied" in text
    text = "\n".join(selection_lines({**sel, "scale": 0.6, "scale_not_applied": None}))
    assert "base + 0.6 x the kept step's update" in text


def _weighted_run(root: Path, adapter: Path, full: list[bool], weighted: dict[float, list[bool]]) -> Path:
    """A run around a real adapter whose last step (4) training scored as trained and at ``weighted``."""
    run = _real_run(root, adapter)
    rows = [{"step": 0, "scores": _scores(BASE)}, {"step": 4, "scores": _scores(full)}]
    rows += [{"step": 4, "weight": w, "scores": _scores(c)} for w, c in weighted.items()]
    (run / "retention.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _b_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path)).items() if ".lora_B." in k}


def test_select_lowers_the_weight_to_the_highest_one_within_the_bound(tiny_hf_model_dir: Path, tmp_path: Path) -> None:
    """As trained and at 0.5 the step loses 10 and 5 points; at 0.375 one: 0.375 is kept, the B matrices times 0.375."""
    from tests.adapters.test_merge_adapter import make_adapter

    adapter = make_adapter(tiny_hf_model_dir, tmp_path / "adapter", 7, ["q_proj", "v_proj"])
    run = _weighted_run(tmp_path, adapter, _drop(10), {0.5: _drop(5), 0.375: _drop(1)})
    sel = _select(run, tmp_path / "sel", "--scale", "0.5", "--min_scale", "0.25")
    assert sel["scale"] == 0.375
    assert [(w["weight"], w["within"]) for w in sel["weights"]] == [(0.5, False), (0.375, True)]
    got, trained = _b_tensors(tmp_path / "sel" / "adapter_model.safetensors"), _b_tensors(adapter / "adapter_model.safetensors")
    assert got.keys() == trained.keys() and all(torch_allclose(got[k], 0.375 * trained[k]) for k in got)
    from llama_pipe.report.retention import selection_lines

    assert "0.5: -5.0 (out of bound), 0.375: -1.0; the highest within 2 points is kept" in "\n".join(selection_lines(sel))


def test_select_keeps_the_lowest_weight_when_none_holds_and_says_so(tiny_hf_model_dir: Path, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    from tests.adapters.test_merge_adapter import make_adapter

    adapter = make_adapter(tiny_hf_model_dir, tmp_path / "adapter", 8, ["q_proj"])
    run = _weighted_run(tmp_path, adapter, _drop(10), {0.5: _drop(8), 0.375: _drop(6), 0.25: _drop(4)})
    sel = _select(run, tmp_path / "sel", "--scale", "0.5", "--min_scale", "0.25")
    assert sel["scale"] == 0.25 and not any(w["within"] for w in sel["weights"])
    assert "out of bound" in caplog.text
    # without weighted scores (an older run, or min_scale = scale) the weight is select.scale
    (run / "retention.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"step": 0, "scores": _scores(BASE)},
                                                                              {"step": 4, "scores": _scores(_drop(10))}]))
    assert _select(run, tmp_path / "sel2", "--scale", "0.5")["scale"] == 0.5
    # select.scale 1 (the adapter as trained) with min_scale below it: the weights are chosen among too
    run = _weighted_run(tmp_path / "s1", adapter, _drop(10), {1.0: _drop(10), 0.625: _drop(1), 0.25: BASE})
    assert _select(run, tmp_path / "sel3", "--scale", "1", "--min_scale", "0.25")["scale"] == 0.625


def torch_allclose(a, b) -> bool:  # noqa: ANN001 - tensors
    import torch

    return bool(torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-6))


def test_weights_are_scored_only_when_min_scale_is_below_scale() -> None:
    from llama_pipe.config import SelectSettings
    from llama_pipe.train.retention_probe import weights_to_try

    assert weights_to_try(SelectSettings()) == []  # the default: a fixed weight, nothing more scored in training
    assert weights_to_try(SelectSettings(scale=0.5, min_scale=0.25)) == [0.5, 0.375, 0.25]
    assert weights_to_try(SelectSettings(scale=0.2, min_scale=0.25)) == []


def test_the_probe_scores_a_weight_as_the_adapter_select_writes(tiny_hf_model_dir: Path, tmp_path: Path) -> None:
    """Training scores a weight by rescaling the adapter's output; select writes B x weight: the same model,
    so the same log-likelihoods."""
    import contextlib

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llama_pipe.adapters.select import write_scaled
    from llama_pipe.chat_template.resolve import resolve_template
    from llama_pipe.config import SelectSettings
    from llama_pipe.train.retention_probe import RetentionProbe, read_weighted
    from llama_pipe.weights.tokenizer import load_tokenizer
    from tests.adapters.test_merge_adapter import make_adapter

    class Acc:  # what the probe uses of accelerate's Accelerator
        def unwrap_model(self, m):  # noqa: ANN001, ANN202
            return m

        def autocast(self):  # noqa: ANN202
            return contextlib.nullcontext()

    adapter = make_adapter(tiny_hf_model_dir, tmp_path / "adapter", 9, ["q_proj", "v_proj", "down_proj"])
    tok = load_tokenizer(tiny_hf_model_dir)
    template = resolve_template("auto", [tiny_hf_model_dir], tok)

    def model_with(adapter_dir: Path):  # noqa: ANN202
        base = AutoModelForCausalLM.from_pretrained(str(tiny_hf_model_dir), dtype=torch.float32)
        return PeftModel.from_pretrained(base, str(adapter_dir))

    probe = RetentionProbe(SelectSettings(max_items=12), tok, template, None, tmp_path / "retention.jsonl", weights=[0.5])
    model = model_with(adapter)
    probe.score(Acc(), model, 4)
    scaled = tmp_path / "scaled"
    shutil.copytree(adapter, scaled)
    write_scaled(adapter / "adapter_model.safetensors", scaled / "adapter_model.safetensors", 0.5)
    direct = probe._score(Acc(), model_with(scaled), 5, None)
    scored = read_weighted(tmp_path / "retention.jsonl")[4]
    at_half, trained = scored[0.5], scored[1.0]
    flat = lambda scores: [x for s in scores for x in s.logprobs]  # noqa: E731
    assert flat(at_half) == pytest.approx(flat(direct), abs=1e-3)
    assert max(abs(a - b) for a, b in zip(flat(at_half), flat(trained))) > 1e-2  # the weight changed them, and was restored:
    assert flat(probe._score(Acc(), model, 6, None)) == pytest.approx(flat(trained), abs=1e-5)
