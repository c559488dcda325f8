"""``llama-pipe select``: the kept checkpoint is the best validation loss within the retention bound."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llama_pipe.cli import main
from llama_pipe.retention import ItemScore
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
    from tests.test_merge_adapter import load, logits, make_adapter, reference_sum

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
    from tests.test_merge_adapter import make_adapter

    adapter = make_adapter(tiny_hf_model_dir, tmp_path / "adapter", 6, ["q_proj"], use_dora=True)
    sel = _select(_real_run(tmp_path, adapter), tmp_path / "sel", "--scale", "0.5")
    assert sel["scale"] == 1.0 and "DoRA" in sel["scale_not_applied"]
    assert (tmp_path / "sel" / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    assert "not applied" in caplog.text


def test_the_report_says_at_what_weight_the_adapter_entered_the_product(tmp_path: Path) -> None:
    from llama_pipe.report_retention import selection_lines

    run = make_run(tmp_path, {0: 3.0, 12: 1.2}, {0: BASE, 12: BASE})
    sel = _select(run, tmp_path / "sel", "--scale", "0.5")  # a fake adapter: not LoRA, so not scaled, and said
    text = "\n".join(selection_lines(sel))
    assert "`select.scale` 0.5 was not applied" in text
    text = "\n".join(selection_lines({**sel, "scale": 0.6, "scale_not_applied": None}))
    assert "base + 0.6 x the kept step's update" in text
