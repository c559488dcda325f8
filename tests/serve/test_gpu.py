"""The CUDA paths of generation and eval (skipped on CPU; run on a GPU machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_pipe.cli import main
from llama_pipe.models.generation import SamplingParams, load_chat_model

pytestmark = pytest.mark.gpu

HELLO = [{"role": "user", "content": "Hello!"}]


def test_generation_on_cuda_is_seeded_and_streams(tiny_hf_model_dir: Path) -> None:
    model = load_chat_model(tiny_hf_model_dir, device="cuda")
    assert model.device.type == "cuda"
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3)
    a, b = model.complete(HELLO, params), model.complete(HELLO, params)
    assert a.token_ids == b.token_ids and a.completion_tokens > 0
    assert "".join(a.pieces) == a.text


def test_eval_on_cuda(tiny_hf_model_dir: Path, tmp_path: Path) -> None:
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there."}]}) + "\n")
    qs = tmp_path / "q.jsonl"
    qs.write_text(json.dumps({"question_id": 1, "turns": ["Hi", "Again?"]}) + "\n")
    out = tmp_path / "eval"
    assert main(["eval", "--base", str(tiny_hf_model_dir), "--tuned", str(tiny_hf_model_dir), "--val", str(val), "-o", str(out),
                 "--questions", str(qs), "--max-new-tokens", "4", "--device", "cuda",
                 "--retention-items", '["bundled"]']) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["device"] == "cuda" and m["base_ppl"] == pytest.approx(m["tuned_ppl"])
