"""Reference check on the real model: one llama-pipe LoRA step on SmolLM2 gives the loss and the
gradients of plain transformers + peft on the same batch, with the reference's labels computed
independently: token by token from the tokenizer's own chat template (apply_chat_template on
growing prefixes of each conversation), not from llama-pipe's character spans."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

CONVERSATIONS = [
    {"system": "You are Llama Pipe, a helpful assistant.", "conversations": [
        {"from": "human", "value": "Who are you?"},
        {"from": "gpt", "value": "I am Llama Pipe, an assistant fine-tuned with llama-pipe."},
        {"from": "human", "value": "What is the capital of France? Answer in one word."},
        {"from": "gpt", "value": "Paris."},
    ]},
    {"conversations": [
        {"from": "human", "value": "Écris « bonjour » en japonais, s'il te plaît."},
        {"from": "gpt", "value": "こんにちは (konnichiwa)."},
    ]},
]


def _messages(rec: dict) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
    return msgs + [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in rec["conversations"]]


def _ids(tok, msgs, gen: bool = False) -> list[int]:  # type: ignore[no-untyped-def]
    out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def reference_labels(tok, msgs) -> tuple[list[int], list[int]]:  # type: ignore[no-untyped-def]
    """Ids of the whole conversation, labels = each reply's tokens through its <|im_end|>."""
    ids = _ids(tok, msgs)
    labels = [-100] * len(ids)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start, upto = len(_ids(tok, msgs[:i], gen=True)), _ids(tok, msgs[: i + 1])
        assert upto == ids[: len(upto)]  # the template renders turn by turn
        end = max(k for k in range(start, len(upto)) if upto[k] == tok.eos_token_id) + 1
        labels[start:end] = ids[start:end]
    return ids, labels


@pytest.mark.slow
def test_one_lora_step_equals_transformers_and_peft(tmp_path: Path) -> None:
    import torch
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llama_pipe.chat_template.builtin import get_template
    from llama_pipe.config import ChatSettings, LoraSettings, TrainSettings
    from llama_pipe.train.dataset import collate, load_examples, pack_examples
    from llama_pipe.train.model import build_model
    from llama_pipe.train.step import StepContext, train_step
    from llama_pipe.weights.tokenizer import load_tokenizer
    from tests.weights.smollm2 import smollm2

    _, hf = smollm2()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in CONVERSATIONS), encoding="utf-8")

    # llama-pipe: its tokenizer loading, template choice (auto -> the model's own), masking, batching, model, step.
    settings = TrainSettings(precision="fp32", lora=LoraSettings(r=4, alpha=8, dropout=0.0,
                             target_modules=["q_proj", "v_proj", "down_proj"]))
    tok = load_tokenizer(hf)
    template = get_template(ChatSettings().template, tok)
    assert template.name == "model"
    examples, _ = load_examples(data, tok, template, 512)
    batch = collate(pack_examples(examples, 512, packing=False), tok.pad_token_id)
    torch.manual_seed(0)
    ours = build_model(hf, settings, "cpu", "fp32")
    with torch.no_grad():  # B starts at zero; give every adapter weight a value so all gradients are non-trivial
        gen = torch.Generator().manual_seed(7)
        adapter = {n: torch.randn(p.shape, generator=gen) * 0.02 for n, p in ours.named_parameters() if p.requires_grad}
        for n, p in ours.named_parameters():
            if n in adapter:
                p.copy_(adapter[n])

    grads: dict[str, torch.Tensor] = {}
    trainable = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]

    class Recorder:  # stands in for the optimiser: keeps the gradients the step produced
        def step(self) -> None:
            grads.update({n: p.grad.detach().clone() for n, p in trainable})

        def zero_grad(self, set_to_none: bool = True) -> None:
            for _, p in trainable:
                p.grad = None

    targets = int((batch["labels"][:, 1:] != -100).sum())
    ctx = StepContext(Accelerator(cpu=True), ours, Recorder(), types.SimpleNamespace(get_last_lr=lambda: [0.0], step=lambda: None), 0.0)
    result = train_step(ctx, [batch], targets, step=1)

    # Reference: transformers + peft, labels from the tokenizer's chat template, HF's own loss.
    ref_tok = AutoTokenizer.from_pretrained(hf)
    rows = [reference_labels(ref_tok, _messages(r)) for r in CONVERSATIONS]
    width = max(len(i) for i, _ in rows)
    ids = torch.full((len(rows), width), ref_tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, (i, lab) in enumerate(rows):
        ids[k, : len(i)], labels[k, : len(lab)], mask[k, : len(i)] = torch.tensor(i), torch.tensor(lab), 1
    for k, (i, lab) in enumerate(rows):  # same tokens, same trained positions
        assert batch["input_ids"][k, : len(i)].tolist() == i and batch["labels"][k, : len(lab)].tolist() == lab
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    ref = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                                          task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n in adapter:
                p.copy_(adapter[n])
    assert {n for n, p in ref.named_parameters() if p.requires_grad} == set(adapter)
    loss = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()

    assert abs(result.loss - loss.item()) < 1e-5 * max(1.0, loss.item()), (result.loss, loss.item())
    # Relative error of each adapter tensor's gradient (float32 through 30 layers, two attention
    # paths: llama-pipe's position_ids with no mask, the reference's padding mask).
    errors = {n: float((grads[n] - p.grad).norm() / p.grad.norm()) for n, p in ref.named_parameters() if p.requires_grad}
    worst = max(errors, key=errors.get)
    print(f"loss {result.loss:.6f} vs {loss.item():.6f}; {len(errors)} gradients, worst relative error {errors[worst]:.2e} ({worst})")
    assert errors[worst] < 1e-4, (worst, errors[worst])
