"""eval: perplexity on exactly the assistant tokens, multi-turn seeded answers, scored held-out questions,
metrics.json + answers.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llama_pipe.cli import main

PAIRS = [
    ("What is the colour of the sky?", "The sky is blue on a clear day."),
    ("What colour is grass?", "Grass is green in spring and summer."),
    ("What colour is snow?", "Snow is white, because it reflects all light."),
    ("What colour are bananas?", "Ripe bananas are yellow."),
    ("What colour is coal?", "Coal is black."),
    ("What colour is the sea?", "The sea often looks blue or green."),
]


def write_val(path: Path) -> Path:
    recs = [{"id": f"v{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a},
                                               {"from": "human", "value": "Thanks!"}, {"from": "gpt", "value": "You are welcome."}]}
            for i, (q, a) in enumerate(PAIRS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


REPO = Path(__file__).resolve().parents[2]


def write_questions(path: Path) -> Path:
    qs = [{"question_id": 1, "category": "stem", "turns": ["What colour is the sky?", "And at night?"], "expected": ["blue"]},
          {"question_id": 2, "category": "writing", "turns": ["Name a colour.", "Another one?"]}]
    path.write_text("".join(json.dumps(q) + "\n" for q in qs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tuned_dir(tiny_hf_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base + a LoRA briefly trained on the validation conversations, merged by our stage."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llama_pipe.chat_template.builtin import get_template, to_messages, tokenize_with_labels
    from llama_pipe.weights.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("tuned")
    val = write_val(root / "val.jsonl")
    tok = load_tokenizer(tiny_hf_model_dir)
    tpl = get_template("vicuna_v1.1")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_hf_model_dir), dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    batch = []
    for line in val.read_text().splitlines():
        ids, labels = tokenize_with_labels(tok, *tpl.render(to_messages(json.loads(line))))
        batch.append((torch.tensor([ids]), torch.tensor([labels])))
    model.train()
    for step in range(12):
        ids, labels = batch[step % len(batch)]
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(root / "adapter"))
    out = root / "merged"
    assert main(["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(root / "adapter"), "-o", str(out)]) == 0
    return out


def test_eval_writes_metrics_and_multi_turn_answers(tiny_hf_model_dir: Path, tuned_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from llama_pipe.models import generation

    seen: list[list[dict]] = []
    original = generation.ChatModel.prompt_ids

    def spy(self, messages, system=None):
        seen.append([dict(m) for m in messages])
        return original(self, messages, system)

    monkeypatch.setattr(generation.ChatModel, "prompt_ids", spy)
    out = tmp_path / "eval"
    argv = ["eval", "--base", str(tiny_hf_model_dir), "--tuned", str(tuned_dir), "--val", str(write_val(tmp_path / "val.jsonl")),
            "-o", str(out), "--questions", str(write_questions(tmp_path / "q.jsonl")), "--max-new-tokens", "8",
            "--batch-size", "4", "--device", "cpu", "--retention-items", "[\"bundled\"]"]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["tuned_ppl"] < m["base_ppl"], "training on these conversations must lower their perplexity"
    assert m["records_scored"] == len(PAIRS) and m["template"] == "vicuna_v1.1"
    assert math.isclose(m["base_ppl"], math.exp(m["base_nll"]), rel_tol=1e-9)
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [(a["model_id"], a["question_id"]) for a in answers] == [("base", 1), ("base", 2), ("tuned", 1), ("tuned", 2)]
    assert all(len(a["choices"][0]["turns"]) == 2 for a in answers)
    # Turn 2 was asked after the model's own turn-1 answer.
    second = [h for h in seen if len(h) == 3]
    assert len(second) == 4 and all(h[1]["role"] == "assistant" for h in second)
    first_answers = {(a["model_id"], a["question_id"]): a["choices"][0]["turns"][0] for a in answers}
    assert second[0][1]["content"] == first_answers[("base", 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "q.jsonl", "val.jsonl"]
    # Question 1 has expected answers: each model's last answer is scored, question 2 is not.
    from llama_pipe.evaluation.heldout import is_correct

    for a in answers:
        if a["question_id"] == 1:
            assert a["expected"] == ["blue"] and a["correct"] == is_correct(a["choices"][0]["turns"][-1], ["blue"])
        else:
            assert a["correct"] is None
    assert set(m["scores"]) == {"stem"}
    for label in ("base", "tuned"):
        row = next(a for a in answers if a["model_id"] == label and a["question_id"] == 1)
        assert m["scores"]["stem"][label] == {"correct": int(row["correct"]), "scored": 1, "rate": float(row["correct"])}


def test_perplexity_counts_only_assistant_tokens_and_ignores_padding(tiny_hf_model_dir: Path, tmp_path: Path, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    from llama_pipe.chat_template.builtin import get_template
    from llama_pipe.evaluation.eval import encode_val, nll_sum

    rows, counts = encode_val(write_val(tmp_path / "val.jsonl"), tokenizer, get_template("vicuna_v1.1"), None, 1024)
    assert counts == {"read": len(PAIRS), "truncated": 0, "no_target": 0}
    model = AutoModelForCausalLM.from_pretrained(str(tiny_hf_model_dir), dtype=torch.float32).eval()
    total, n = nll_sum(model, rows, tokenizer.pad_token_id, batch_size=4)  # mixed lengths: padded batches
    ref_total, ref_n = 0.0, 0
    for ids, labels in rows:
        targets = [(i, lab) for i, lab in enumerate(labels) if lab != -100]
        decoded = tokenizer.decode([lab for _, lab in targets])
        assert "USER" not in decoded and "You are welcome." in decoded
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        ref_total -= sum(float(logp[i - 1, lab]) for i, lab in targets)
        ref_n += len(targets)
    assert n == ref_n and abs(total - ref_total) / ref_total < 1e-5


def test_answers_are_reproducible_with_the_seed(tiny_hf_model_dir: Path, tmp_path: Path, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    from llama_pipe.chat_template.builtin import get_template
    from llama_pipe.config import EvalSettings
    from llama_pipe.evaluation.eval import answer_questions, read_questions
    from llama_pipe.models.generation import ChatModel

    model = AutoModelForCausalLM.from_pretrained(str(tiny_hf_model_dir), dtype=torch.float32).eval()
    chat = ChatModel(model, tokenizer, get_template("vicuna_v1.1"), "m")
    qs = read_questions(write_questions(tmp_path / "q.jsonl"))
    settings = EvalSettings(max_new_tokens=10, temperature=1.0, seed=5)

    def turns(s: EvalSettings) -> list:
        return [a["choices"][0]["turns"] for a in answer_questions(chat, qs, s, "m")]

    first = turns(settings)
    assert turns(settings) == first
    assert turns(EvalSettings(max_new_tokens=10, temperature=1.0, seed=6)) != first


def test_bad_inputs_are_clear(tiny_hf_model_dir: Path, tmp_path: Path, capsys) -> None:
    base = ["eval", "--base", str(tiny_hf_model_dir), "--tuned", str(tiny_hf_model_dir), "-o", str(tmp_path / "o")]
    qs = write_questions(tmp_path / "q.jsonl")
    assert main([*base, "--val", str(tmp_path / "missing.jsonl"), "--questions", str(qs)]) == 2
    assert "validation file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "turns": ["ok"]}\n{"question_id": 2, "turns": "not a list"}\n')
    assert main([*base, "--val", str(write_val(tmp_path / "v.jsonl")), "--questions", str(bad)]) == 2
    assert "line 2" in capsys.readouterr().err
    bad.write_text('{"question_id": 1, "turns": ["ok"], "expected": ["Paris"]}\n{"question_id": 2, "turns": ["ok"], "expected": "Paris"}\n')
    assert main([*base, "--val", str(write_val(tmp_path / "v.jsonl")), "--questions", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "'expected' must be a non-empty list" in err
    bad.write_text('{"question_id": 7, "turns": ["a"]}\n{"question_id": 7, "turns": ["b"]}\n')
    assert main([*base, "--val", str(write_val(tmp_path / "v.jsonl")), "--questions", str(bad)]) == 2
    assert "appears twice" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_matching_an_expected_answer() -> None:
    from llama_pipe.evaluation.heldout import is_correct

    assert is_correct("Hello! I'm llama  pipe, an AI assistant.", ["Llama Pipe"])
    assert is_correct("I am Llama\nPipe.", ["Llama Pipe"])
    assert not is_correct("I am LlamaPipeline.", ["Llama Pipe"]) and not is_correct("I am a llama.", ["Llama Pipe"])
    assert is_correct("The capital of France is Paris.", ["Paris"]) and not is_correct("Parisian food.", ["Paris"])
    assert is_correct("A week has 7 days.", ["7", "seven"]) and not is_correct("It is open 24/70.", ["7"])
    assert is_correct("Water is H₂O.", ["H2O", "H₂O"])


def test_scores_per_category_and_model() -> None:
    from llama_pipe.evaluation.heldout import score_rows

    qs = [{"question_id": "i1", "category": "identity", "turns": ["Who?"], "expected": ["Llama Pipe"]},
          {"question_id": "i2", "category": "identity", "turns": ["Name?"], "expected": ["Llama Pipe"]},
          {"question_id": "g1", "category": "general", "turns": ["France?", "And Italy?"], "expected": ["Rome"]},
          {"question_id": 4, "category": "writing", "turns": ["Poem?"]}]

    def row(model: str, qid: object, *answers: str) -> dict:
        return {"model_id": model, "question_id": qid, "choices": [{"index": 0, "turns": list(answers)}]}

    rows = [row("base", "i1", "I am SmolLM."), row("base", "i2", "I'm an AI."), row("base", "g1", "Rome.", "Paris."),
            row("tuned", "i1", "I am Llama Pipe."), row("tuned", "i2", "LLAMA PIPE here"), row("tuned", "g1", "Paris.", "Rome."),
            row("tuned", 4, "Roses are red.")]
    scores = score_rows(rows, qs)
    assert scores == {
        "identity": {"base": {"correct": 0, "scored": 2, "rate": 0.0}, "tuned": {"correct": 2, "scored": 2, "rate": 1.0}},
        "general": {"base": {"correct": 0, "scored": 1, "rate": 0.0}, "tuned": {"correct": 1, "scored": 1, "rate": 1.0}},
    }  # only the last turn's answer counts (base said Rome for France), unscored questions are left out
    assert [r["correct"] for r in rows] == [False, False, False, True, True, True, None]


def test_default_questions_are_the_bundled_held_out_set_from_any_directory(tmp_path: Path, monkeypatch) -> None:
    from llama_pipe.config import EvalSettings
    from llama_pipe.evaluation.eval import read_questions

    monkeypatch.chdir(tmp_path)  # outside the project folder
    assert EvalSettings().questions is None and EvalSettings().temperature == 0 and EvalSettings().max_questions == 0
    qs = read_questions(None)
    cats = {q["category"] for q in qs}
    assert cats == {"identity", "general"} and all(q.get("expected") for q in qs)
    identity = [q for q in qs if q["category"] == "identity"]
    assert len(identity) >= 10 and all(q["expected"] == ["Llama Pipe"] for q in identity)
    france = next(q for q in qs if "capital of France" in q["turns"][0])
    assert france["expected"] == ["Paris"]


def test_held_out_questions_are_not_in_the_training_sample() -> None:
    from llama_pipe.evaluation.eval import read_questions

    def norm(text: str) -> str:
        return " ".join(text.lower().split()).strip(" ?!.")

    asked = set()
    for name in ("sharegpt_sample.json", "identity_sample.json"):
        for rec in json.loads((REPO / "data" / "sample" / name).read_text(encoding="utf-8")):
            if isinstance(rec, dict) and isinstance(rec.get("conversations"), list):
                asked |= {norm(t["value"]) for t in rec["conversations"] if isinstance(t, dict) and isinstance(t.get("value"), str)}
    held_out = [norm(t) for q in read_questions(None) for t in q["turns"]]
    leaked = [q for q in held_out if any(q in a for a in asked)]
    assert not leaked, f"held-out questions found in the training sample: {leaked}"
    # and the sample does teach the name
    assert sum("llama pipe" in a for a in asked) >= 50  # distinct replies naming it
