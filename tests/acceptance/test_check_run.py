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


def run_dir(tmp: Path, tuned_hits: int, base_hits: int, france: str, ppl: tuple[float, float],
            retention: tuple[float, float] = (-0.5, -1.5), sets: int = 2, opening: float = 0.1) -> Path:
    """eval's output: identity hits of 10, France's answer, perplexities, retention (diff, CI lower end) on
    ``sets`` sets, and the share of the most common three-word opening."""
    cell = lambda k: {"correct": k, "scored": 10, "rate": k / 10}  # noqa: E731
    diff, low = retention
    ret = {f"set{i}": {"bound": 2.0, "overall": {"n": 500, "base": 60.0, "tuned": 60.0 + diff, "diff": diff, "ci95": [low, diff + 1],
                                                  "holds": diff >= -2 and low >= -2}} for i in range(sets)}
    (tmp / "metrics.json").write_text(json.dumps({"base_ppl": ppl[0], "tuned_ppl": ppl[1], "scores": {
        "identity": {"base": cell(base_hits), "tuned": cell(tuned_hits)}}, "retention": ret,
        "style": {"tuned": {"top_opening": "the capital of", "top_opening_share": opening}}}))
    rows: list[dict[str, Any]] = [{"model_id": "tuned", "question_id": "general-france", "correct": "Paris" in france,
                                   "choices": [{"index": 0, "turns": [france]}]}]
    (tmp / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp


def test_a_run_meeting_the_numbers_passes(tmp_path: Path) -> None:
    assert check_run.main([str(run_dir(tmp_path, 9, 0, "Paris.", (12.0, 9.0)))]) == 0


def test_each_missed_number_fails(tmp_path: Path, capsys) -> None:
    ok = (9, 0, "Paris.", (12.0, 9.0))
    for n, (args, kw, why) in enumerate([((8, 0, "Paris.", (12.0, 9.0)), {}, "8/10 identity questions, needs >= 90%"),
                                         ((9, 1, "Paris.", (12.0, 9.0)), {}, "base names 'Llama Pipe' in 1/10"),
                                         ((9, 0, "Lyon.", (12.0, 9.0)), {}, "capital of France is wrong: 'Lyon.'"),
                                         ((9, 0, "Paris.", (9.0, 9.0)), {}, "tuned perplexity 9.000 is not below"),
                                         (ok, {"retention": (-2.5, -4.0)}, "retention on set0: tuned 57.5 vs base 60.0 (-2.5 points"),
                                         (ok, {"retention": (-1.0, -2.6)}, "95% CI [-2.6, +0.0]) is not within 2.0 points"),
                                         (ok, {"sets": 1}, "retention scored on 1 set(s) (set0), needs 2"),
                                         (ok, {"opening": 0.5}, "50% of the tuned general answers open with 'the capital of'")]):
        d = tmp_path / str(n)
        d.mkdir()
        assert check_run.main([str(run_dir(d, *args, **kw))]) == 1
        assert why in capsys.readouterr().err


def test_missing_output_is_exit_2(tmp_path: Path, capsys) -> None:
    assert check_run.main([str(tmp_path / "nope")]) == 2
    assert "run `make run` first" in capsys.readouterr().err
