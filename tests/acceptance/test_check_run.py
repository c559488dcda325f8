"""The acceptance check that .ci/run applies to the default DAG's eval output."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

spec = importlib.util.spec_from_file_location("check_run", Path(__file__).with_name("check_run.py"))
assert spec and spec.loader
check_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_run)


def run_dir(tmp: Path, tuned_hits: int, base_hits: int, france: str, ppl: tuple[float, float]) -> Path:
    cell = lambda k: {"correct": k, "scored": 10, "rate": k / 10}  # noqa: E731
    (tmp / "metrics.json").write_text(json.dumps({"base_ppl": ppl[0], "tuned_ppl": ppl[1], "scores": {
        "identity": {"base": cell(base_hits), "tuned": cell(tuned_hits)}}}))
    rows: list[dict[str, Any]] = [{"model_id": "tuned", "question_id": "general-france", "correct": "Paris" in france,
                                   "choices": [{"index": 0, "turns": [france]}]}]
    (tmp / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp


def test_a_run_meeting_the_numbers_passes(tmp_path: Path) -> None:
    assert check_run.main([str(run_dir(tmp_path, 7, 0, "Paris.", (12.0, 9.0)))]) == 0


def test_each_missed_number_fails(tmp_path: Path, capsys) -> None:
    for n, (args, why) in enumerate([((6, 0, "Paris.", (12.0, 9.0)), "6/10 identity questions, needs >= 70%"),
                                     ((9, 1, "Paris.", (12.0, 9.0)), "base names 'Llama Pipe' in 1/10"),
                                     ((9, 0, "Lyon.", (12.0, 9.0)), "capital of France is wrong: 'Lyon.'"),
                                     ((9, 0, "Paris.", (9.0, 9.0)), "tuned perplexity 9.000 is not below")]):
        d = tmp_path / str(n)
        d.mkdir()
        assert check_run.main([str(run_dir(d, *args))]) == 1
        assert why in capsys.readouterr().err


def test_missing_output_is_exit_2(tmp_path: Path, capsys) -> None:
    assert check_run.main([str(tmp_path / "nope")]) == 2
    assert "run `make run` first" in capsys.readouterr().err
