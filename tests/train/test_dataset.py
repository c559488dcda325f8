"""Training data: labels through the dataset path, packing equivalence, and the step plan."""

from __future__ import annotations

import json

import pytest
import torch

from llama_pipe.chat_template.builtin import IGNORE_INDEX, get_template
from llama_pipe.core.errors import InputError
from llama_pipe.train.dataset import StepPlan, collate, encode_record, load_examples, pack_examples
from llama_pipe.train.step import logits_loss_sum


def test_chinese_record_labels_only_the_reply(tokenizer) -> None:
    rec = {"id": "zh", "conversations": [{"from": "human", "value": "你好吗？"}, {"from": "gpt", "value": "我很好，谢谢！"}]}
    ex = encode_record(rec, tokenizer, get_template("vicuna_v1.1"), None)
    target = [i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]
    assert tokenizer.decode(target, skip_special_tokens=False) == "我很好，谢谢！</s>"
    assert target[-1] == tokenizer.eos_token_id != tokenizer.pad_token_id


def test_load_examples_truncates_and_reports(tmp_path, tokenizer, chat_records) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chat_records[:10]), encoding="utf-8")
    examples, stats = load_examples(f, tokenizer, get_template("vicuna_v1.1"), max_seq_len=160)
    assert all(len(e.input_ids) <= 160 for e in examples)
    assert stats.conversations == 10 and stats.examples + stats.no_target == 10 and stats.truncated > 0
    assert stats.target_tokens == sum(e.n_targets for e in examples)


def test_unrenderable_record_names_file_and_record(tmp_path, tokenizer) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"id": "x", "conversations": [{"from": "robot", "value": "hi"}]}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.jsonl: record 1 \(id x\)"):
        load_examples(f, tokenizer, get_template("vicuna_v1.1"), 128)


def _loss(model, rows, pad_id, flatten: bool = False) -> tuple[float, int]:
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), 3):
            s, n = logits_loss_sum(model, collate(rows[i : i + 3], pad_id, flatten=flatten))
            total, count = total + float(s), count + int(n)
    return total, count


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(tiny_hf_model_dir, tokenizer, chat_records, attn: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_hf_model_dir), attn_implementation=attn, dtype=torch.float32).eval()
    with torch.no_grad():  # sharpen the random weights so the loss depends strongly on the context
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(8.0)
    t = get_template("vicuna_v1.1")
    first_pairs = [{"conversations": r["conversations"][:2]} for r in chat_records]
    examples = [encode_record(r, tokenizer, t, "Be brief.") for r in first_pairs]
    examples = [e for e in examples if len(e.input_ids) <= 250][:16]
    assert len(examples) == 16 and sum(e.n_targets for e in examples) > 16 * 20
    unpacked = pack_examples(examples, 512, packing=False)
    packed = pack_examples(examples, 512, packing=True)
    assert len(packed) < len(unpacked) / 2  # several conversations per row
    assert sorted(len(r) for r in packed)[-1] <= 512
    ref_sum, ref_n = _loss(model, unpacked, tokenizer.pad_token_id)
    got_sum, got_n = _loss(model, packed, tokenizer.pad_token_id)
    assert got_n == ref_n
    assert got_sum == pytest.approx(ref_sum, rel=1e-6)
    # The flattened (1, total) layout used with flash-attention is the same computation.
    flat_sum, flat_n = _loss(model, packed, tokenizer.pad_token_id, flatten=True)
    assert flat_n == ref_n and flat_sum == pytest.approx(ref_sum, rel=1e-6)
    # Control: the same packed rows without restarting positions (attention leaks across
    # conversations) give a different loss, so the equality above is not vacuous.
    for r in packed:
        r.position_ids = list(range(len(r)))
    leak_sum, _ = _loss(model, packed, tokenizer.pad_token_id)
    assert abs(leak_sum - ref_sum) > 1e-5 * abs(ref_sum)  # observed ~1.4e-4; packing error ~1e-7


def test_step_plan_covers_each_row_once_per_epoch_and_splits_ranks() -> None:
    plan = StepPlan(n_rows=24, micro_batch_size=2, grad_accum=3, world_size=2, seed=7)
    assert plan.global_rows == 12
    seen = plan.step_rows(0) + plan.step_rows(1)
    assert sorted(seen) == list(range(24))
    assert plan.step_rows(2) != plan.step_rows(0)  # epoch 2 is reshuffled
    for step in range(3):
        parts = plan.rank_micro_batches(step, 0) + plan.rank_micro_batches(step, 1)
        assert sorted(i for mb in parts for i in mb) == sorted(plan.step_rows(step))
        assert all(len(mb) == 2 for mb in parts)
    assert plan.total_steps(None, 2.0) == 4 and plan.total_steps(5, 2.0) == 5
    # Stateless: a fresh plan (as after a resume) gives the same rows for a step.
    assert StepPlan(24, 2, 3, 2, 7).step_rows(5) == plan.step_rows(5)


@pytest.mark.parametrize("n_rows, world, micro", [(5, 2, 2), (1, 2, 4), (7, 3, 1), (8, 2, 4)])
def test_eval_batches_are_equal_per_rank_and_count_every_target_once(n_rows, world, micro) -> None:
    """Under FSDP/ZeRO-3 each eval forward is collective: a rank with fewer batches would hang."""
    from llama_pipe.train.dataset import Row, rank_eval_batches

    rows = [Row(list(range(1, 4 + i)), [IGNORE_INDEX] + list(range(2, 4 + i)), list(range(3 + i))) for i in range(n_rows)]
    per_rank = [rank_eval_batches(rows, r, world, micro, pad_id=0) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1
    rows_per_rank = -(-n_rows // world)
    assert len(per_rank[0]) == -(-rows_per_rank // micro)
    targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for bs in per_rank for b in bs)
    assert targets == sum(r.n_targets for r in rows)
