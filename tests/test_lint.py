"""The code habits are enforced by the test suite (and so by CI, which runs ``make test``):
``ruff check`` (pyflakes, pycodestyle, import order, pyupgrade, bugbear; ``[tool.ruff]``) on the
whole repository and ``mypy`` on the typed core (``[tool.mypy]``), both configured in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = BIN / tool
    if not exe.exists():
        pytest.fail(f"{exe} is missing: install the test extra (pip install -e '.[test]')")
    return subprocess.run([str(exe), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    proc = _run("ruff", "check", "--no-fix", "--output-format", "concise")
    assert proc.returncode == 0, f"ruff check:\n{proc.stdout}{proc.stderr}"


def test_mypy_finds_nothing() -> None:
    proc = _run("mypy")
    assert proc.returncode == 0, f"mypy:\n{proc.stdout}{proc.stderr}"
