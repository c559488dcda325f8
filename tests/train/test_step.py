"""The default training loss: the output layer only where a labelled token is predicted, and the
same sum (and gradients) as cross entropy over the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llama_pipe.chat_template.builtin import IGNORE_INDEX
from llama_pipe.train.dataset import Example, collate, pack_examples
from llama_pipe.train.step import logits_loss_sum


def _full_logits_sum(model, batch):
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    logits, labels = out.logits[:, :-1, :].float(), batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


class NoKeep(torch.nn.Module):
    """A causal LM whose forward takes no ``logits_to_keep`` (the fallback: full logits)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, position_ids=None, use_cache=False):
        return self.inner(input_ids=input_ids, position_ids=position_ids, use_cache=use_cache)


def _examples(vocab: int) -> list[Example]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n, start, stop in ((40, 10, 25), (23, 5, 23), (31, 20, 31), (12, 12, 12)):  # the last has no label
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append(Example(ids, [t if start <= j < stop else IGNORE_INDEX for j, t in enumerate(ids)]))
    return out


@pytest.mark.parametrize("packing", [True, False])
def test_kept_positions_give_the_full_logits_loss_and_gradients(tiny_hf_model_dir, packing) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_hf_model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    rows = pack_examples(_examples(base.config.vocab_size), max_seq_len=64, packing=packing)
    batch = collate(rows, pad_id=0, flatten=packing)
    n_labels = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert 0 < n_labels < batch["labels"].numel() // 2  # most positions are skipped

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    ref = _full_logits_sum(model, batch)
    ref_grads = grads(ref)
    plain = NoKeep(model)
    for wrapped in (model, plain):
        loss, n = logits_loss_sum(wrapped, batch)
        assert int(n) == n_labels
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
        for k, g in grads(loss).items():
            torch.testing.assert_close(g, ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)
    assert model._llama_pipe_keeps_logits is True and plain._llama_pipe_keeps_logits is False
