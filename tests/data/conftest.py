"""Helpers for the data-stage tests: run the CLI, read outputs, check the accounting."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from llama_pipe.cli import main

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample" / "sharegpt_sample.json"


def cli(*argv: Any) -> int:
    """``llama-pipe ARGV`` in-process; returns the exit code."""
    return main([str(a) for a in argv])


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def stats_of(out: Path, name: str | None = None) -> dict[str, Any]:
    """The stats file beside ``out``; asserts ``in == out + sum(rejected)`` and the rejects file agrees."""
    stem = out.name.removesuffix(".jsonl")
    stats = json.loads((out.parent / (name or f"{stem}.stats.json")).read_text())
    assert stats["in"] == stats["out"] + sum(stats["rejected"].values()), stats
    return stats


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def turns(*values: str) -> list[dict[str, str]]:
    """Alternating human/gpt turns."""
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


@pytest.fixture(scope="session")
def make_sample() -> ModuleType:
    """The sample generator module (its code snippets and HTML builders are the test oracle)."""
    spec = importlib.util.spec_from_file_location("make_sample", REPO / "data" / "sample" / "make_sample.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def sample() -> Path:
    return SAMPLE
