"""The command line: every stage is listed and has working --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llama_pipe.cli import main
from llama_pipe.stages import BY_NAME


def test_help_lists_every_stage() -> None:
    out = subprocess.run([sys.executable, "-m", "llama_pipe.cli", "--help"], capture_output=True, text=True, check=True)
    for name in BY_NAME:
        assert name in out.stdout


def test_help_imports_no_stage_and_no_heavy_library() -> None:
    """``llama-pipe --help`` stays light: no stage module, no torch/transformers (they are imported
    inside a stage's ``run``)."""
    code = (
        "import sys\n"
        "from llama_pipe.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('modules:', ' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(out.rsplit("modules:", 1)[1].split())
    assert not loaded & {"torch", "transformers", "peft", "accelerate", "numpy"}, sorted(loaded)
    assert not loaded & {st.module for st in BY_NAME.values()}, sorted(loaded & {st.module for st in BY_NAME.values()})


@pytest.mark.parametrize("stage", sorted(BY_NAME))
def test_stage_help(stage: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([stage, "--help"])
    assert exit_info.value.code == 0
    assert "usage: llama-pipe" in capsys.readouterr().out


def test_config_error_exits_2(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text("schema: 1\n", encoding="utf-8")
    # `schema` takes no config; use a stage that reads settings through --config.
    assert main(["merge", str(tmp_path / "missing.json"), "-o", str(tmp_path / "o.jsonl"), "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "llama-pipe merge: error:" in err
