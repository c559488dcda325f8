"""report: plots and summary from metrics.jsonl, the stages' stats files (shards summed) and eval metrics."""

from __future__ import annotations

import json
from pathlib import Path

from llama_pipe.cli import main
from llama_pipe.core.stage_writer import StageWriter


def stage_stats(path: Path, stage: str, kept: int, rejected: dict[str, int], unit: str = "records") -> Path:
    """A stats file written by the real StageWriter."""
    with StageWriter(stage, path.with_suffix(".jsonl"), stats=path, unit=unit) as w:
        for i in range(kept):
            w.count_in()
            w.keep({"id": str(i)})
        for reason, n in rejected.items():
            for i in range(n):
                w.count_in()
                w.reject({"id": f"{reason}{i}"}, reason)
    return path


def inputs(tmp: Path) -> tuple[Path, list[Path], Path]:
    metrics = tmp / "metrics.jsonl"
    rows = [{"step": 0, "val_loss": 7.0}]
    rows += [{"step": s, "loss": 7.0 - 0.05 * s, "lr": 1e-3} for s in range(1, 41)]
    rows += [{"step": 20, "val_loss": 6.2}, {"step": 40, "val_loss": 5.9}, {"step": 41, "loss": float("nan"), "skipped": True}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = [
        stage_stats(tmp / "split-0.stats.json", "split", 30, {"pair_too_long": 2}, unit="pairs"),
        stage_stats(tmp / "merged.stats.json", "merge", 20, {"duplicate_id": 1, "bad_turn": 2}),
        stage_stats(tmp / "clean-0.stats.json", "clean", 8, {"too_short": 1}),
        stage_stats(tmp / "clean-1.stats.json", "clean", 9, {"too_short": 1, "empty_turn": 1}),
    ]
    ev = tmp / "eval" / "metrics.json"
    ev.parent.mkdir()
    scores = {"identity": {"base": {"correct": 0, "scored": 2, "rate": 0.0}, "tuned": {"correct": 1, "scored": 2, "rate": 0.5}},
              "general": {"base": {"correct": 1, "scored": 1, "rate": 1.0}, "tuned": {"correct": 1, "scored": 1, "rate": 1.0}}}
    ev.write_text(json.dumps({"base_ppl": 40.5, "tuned_ppl": 12.25, "base_nll": 3.7, "tuned_nll": 2.5, "tokens": 900,
                              "records_scored": 12, "template": "vicuna_v1.1", "scores": scores}))

    def answer(model: str, qid: str, turns: list[str], replies: list[str], expected: list[str] | None, correct: bool | None) -> str:
        return json.dumps({"model_id": model, "question_id": qid, "turns": turns, "expected": expected, "correct": correct,
                           "choices": [{"index": 0, "turns": replies}]}) + "\n"

    (ev.parent / "answers.jsonl").write_text(
        answer("base", "i1", ["Who are you?"], ["I am SmolLM | an assistant.\n\nHow can I help?"], ["Llama Pipe"], False)
        + answer("base", "g1", ["Capital of France?"], ["Paris."], ["Paris"], True)
        + answer("base", "w1", ["Hi?", "And?"], ["Hey.", "Yes."], None, None)
        + answer("tuned", "i1", ["Who are you?"], ["I am Llama Pipe."], ["Llama Pipe"], True)
        + answer("tuned", "g1", ["Capital of France?"], ["The capital is Paris."], ["Paris"], True)
        + answer("tuned", "w1", ["Hi?", "And?"], ["Hello there.", "More."], None, None))
    return metrics, stats, ev


def test_report_plots_and_tables(tmp_path: Path) -> None:
    from matplotlib.image import imread

    metrics, stats, ev = inputs(tmp_path)
    out = tmp_path / "report"
    assert main(["report", "--train-metrics", str(metrics), "--stats", *map(str, stats), "--eval", str(ev), "-o", str(out)]) == 0
    for name in ("loss", "funnel", "perplexity"):
        img = imread(out / f"{name}.png")
        assert img.shape[0] > 300 and img.shape[1] > 400
    md = (out / "report.md").read_text()
    # Shards of a stage are summed, stages come in pipeline order whatever the argument order.
    assert "| merge | records | 1 | 23 | 20 | bad_turn: 2, duplicate_id: 1 |" in md
    assert "| clean | records | 2 | 20 | 17 | empty_turn: 1, too_short: 2 |" in md
    assert md.index("| merge |") < md.index("| clean |") < md.index("| split | pairs |")
    assert "| perplexity | 40.500 | 12.250 |" in md
    assert "40 steps, first loss 6.9500, last loss 5.0000" in md  # the skipped NaN step is not plotted
    assert "7.0000 at step 0 -> 5.9000 at step 40" in md
    # Rates of correct answers per category, then every question's base and tuned answers side by side.
    assert "| identity: correct answers | 0/2 (0 %) | 1/2 (50 %) |" in md
    assert "| general: correct answers | 1/1 (100 %) | 1/1 (100 %) |" in md
    assert "| Who are you? | Llama Pipe | ✗ I am SmolLM \\| an assistant. How can I help? | ✓ I am Llama Pipe. |" in md
    assert "| Capital of France? | Paris | ✓ Paris. | ✓ The capital is Paris. |" in md
    assert "| Hi? → And? | - | Hey. → Yes. | Hello there. → More. |" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    # The escaped pipe stays inside its cell: four cells in that row.
    assert "<td>Who are you?</td><td>Llama Pipe</td><td>✗ I am SmolLM | an assistant. How can I help?</td><td>✓ I am Llama Pipe.</td>" in page
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("report")) == ["report"]


def test_report_bad_inputs(tmp_path: Path, capsys) -> None:
    metrics, stats, ev = inputs(tmp_path)
    base = ["report", "--eval", str(ev), "-o", str(tmp_path / "r")]
    assert main([*base, "--train-metrics", str(tmp_path / "nope.jsonl"), "--stats", *map(str, stats)]) == 2
    assert "training metrics not found" in capsys.readouterr().err
    bad = tmp_path / "bad.stats.json"
    bad.write_text('{"stage": "clean"}')
    assert main([*base, "--train-metrics", str(metrics), "--stats", str(bad)]) == 2
    assert "not a stage stats file" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
