"""Held-out questions with expected answers, and how eval scores answers against them.

A question (one JSONL row, MT-bench layout) may carry ``"expected": ["Paris", ...]``: its answer
is correct when the last turn's answer contains one of these strings as a whole phrase,
case-insensitive, whitespace collapsed (``"Llama Pipe"`` matches "I'm llama  pipe." but not
"LlamaPipeline"). Questions without ``expected`` are answered but not scored.

The bundled set (:data:`BUNDLED`, package data, so it resolves from any directory) holds
paraphrases of "who are you?" that are not in the training sample (category ``identity``:
expected "Llama Pipe") and general-knowledge questions (category ``general``).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

BUNDLED_NAME = "heldout_questions.jsonl"


def bundled_questions() -> Path:
    """Path of the bundled held-out questions file inside the installed package."""
    path = Path(str(resources.files("llama_pipe") / "assets" / BUNDLED_NAME))
    if not path.is_file():  # a broken install, not a user error
        raise FileNotFoundError(f"{path}: the bundled held-out questions are missing; reinstall llama-pipe")
    return path


def check_expected(question: dict[str, Any]) -> str | None:
    """Why the question's ``expected`` field is malformed, or None (absent or a list of non-empty strings)."""
    exp = question.get("expected")
    if exp is None:
        return None
    if not isinstance(exp, list) or not exp or not all(isinstance(e, str) and e.strip() for e in exp):
        return "'expected' must be a non-empty list of non-empty strings"
    return None


def _phrase(text: str) -> str:
    return " ".join(text.split())


def is_correct(answer: str, expected: list[str]) -> bool:
    """Whether ``answer`` contains one of ``expected`` as a whole phrase (case-insensitive)."""
    text = _phrase(answer)
    for e in expected:
        pattern = r"(?<!\w)" + re.escape(_phrase(e)).replace(r"\ ", r"\s") + r"(?!\w)"
        if re.search(pattern, text, flags=re.IGNORECASE):
            return True
    return False


def score_rows(rows: list[dict[str, Any]], questions: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Mark each answer row ``correct`` (True/False; None when its question has no ``expected``)
    and return ``{category: {model: {"correct", "scored", "rate"}}}`` over the scored rows."""
    by_id = {str(q["question_id"]): q for q in questions}
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        q = by_id[str(row["question_id"])]
        expected = q.get("expected")
        answers = row["choices"][0]["turns"]
        if not expected:
            row["correct"] = None
            continue
        row["correct"] = bool(answers) and is_correct(answers[-1], expected)
        cell = scores.setdefault(str(q.get("category") or "uncategorised"), {}).setdefault(
            row["model_id"], {"correct": 0, "scored": 0, "rate": 0.0})
        cell["scored"] += 1
        cell["correct"] += int(row["correct"])
        cell["rate"] = cell["correct"] / cell["scored"]
    return scores
