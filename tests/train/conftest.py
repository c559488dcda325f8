"""Fixtures for the training tests: small train/val JSONL files and a clean accelerate state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample" / "sharegpt_sample.json"


def _usable(rec: object) -> bool:
    """Records that already look like the output of the data stages (alternating human/gpt)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list) or not rec["conversations"]:
        return False
    turns = rec["conversations"]
    if len(turns) % 2 or not all(isinstance(t, dict) and isinstance(t.get("value"), str) and t["value"] for t in turns):
        return False
    return all(t.get("from") == ("human" if i % 2 == 0 else "gpt") for i, t in enumerate(turns))


@pytest.fixture(scope="session")
def chat_records() -> list[dict]:
    recs = [r for r in json.loads(SAMPLE.read_text(encoding="utf-8")) if _usable(r)]
    # Short chunks (the first two pairs) keep the tiny runs fast.
    return [{"id": r["id"], "conversations": r["conversations"][:4]} for r in recs]


@pytest.fixture(scope="session")
def data_files(tmp_path_factory: pytest.TempPathFactory, chat_records: list[dict]) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("train_data")
    train, val = d / "train.jsonl", d / "val.jsonl"
    train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chat_records[:48]), encoding="utf-8")
    val.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chat_records[48:60]), encoding="utf-8")
    return train, val


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; forget the previous one's settings."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
