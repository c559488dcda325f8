"""The llama.cpp check that .ci/run applies to the default run's GGUF exports (the check itself runs
in CI on real files; tests/weights/test_gguf_export_smollm2.py runs the same comparison on SmolLM2)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("check_export", Path(__file__).with_name("check_export.py"))
assert spec and spec.loader
check_export = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_export)


def test_missing_exports_exit_2_naming_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}")
    (tmp_path / "val.jsonl").write_text("")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.f16.gguf").write_bytes(b"")
    assert check_export.main([str(tmp_path / "merged"), str(tmp_path / "export"), "--val", str(tmp_path / "val.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "model.q8_0.gguf" in err and "model.f16.gguf" not in err


def test_the_held_out_split_is_the_one_the_runs_eval_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --val: the validation file named in <run>/eval/metrics.json (data products are keyed by
    their settings, results/data/gather/<key>/val.jsonl); no metrics: exit 2 naming the file."""
    import json

    run = tmp_path / "results" / "default"
    (run / "merged").mkdir(parents=True)
    (run / "merged" / "config.json").write_text("{}")
    assert check_export.main([str(run / "merged"), str(tmp_path / "export")]) == 2
    assert str(run / "eval" / "metrics.json") in capsys.readouterr().err
    val = tmp_path / "results" / "data" / "gather" / "abc" / "val.jsonl"
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps({"val": str(val)}))
    assert check_export.run_val(run / "merged") == val
    assert check_export.main([str(run / "merged"), str(tmp_path / "export")]) == 2
    assert str(val) in capsys.readouterr().err  # named as missing: the split itself, not a stale default


def test_validation_rows_follow_the_chat_template_up_to_the_token_budget(tmp_path: Path) -> None:
    """Each validation conversation rendered through the model's chat template, rows taken until 2,500 tokens."""
    import json

    class Tok:
        def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool) -> str:
            return "".join(f"<{m['role']}>{m['content']}" for m in messages)

        def __call__(self, text: str, add_special_tokens: bool = True) -> object:
            return type("Enc", (), {"input_ids": list(range(len(text)))})()

    record = {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x" * 1000}]}
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(record) + "\n" for _ in range(10)))
    rows = check_export.heldout_rows(Tok(), tmp_path / "val.jsonl")
    assert [len(r) for r in rows] == [check_export.MAX_TOKENS] * 7  # 6 rows hold 2,304 tokens, the 7th passes 2,500
