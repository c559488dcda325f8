"""Training data: render conversations with the chat template, mask, pack, and batch.

* :func:`load_examples` reads a split JSONL, renders each conversation with the template and
  labels exactly the assistant replies plus their end-of-turn token
  (:func:`llama_pipe.chat_template.builtin.tokenize_with_labels`); everything else is ``-100``.
* :func:`pack_examples` puts several conversations into one row of at most ``max_seq_len``
  tokens. ``position_ids`` restart at 0 for every conversation; the model is called with
  ``attention_mask=None`` and these positions, which transformers 5 turns into a block-diagonal
  causal mask (``masking_utils.find_packed_sequence_indices`` for sdpa/eager/flex, varlen
  ``cu_seqlens`` for flash-attention), so no token attends across conversations. The first
  token of each conversation is a BOS whose label is ``-100``, so the last token of one
  conversation is never trained to predict the next conversation.
* :class:`StepPlan` decides which rows every optimiser step uses from the step number alone
  (a seeded permutation per epoch), so the data position of a checkpoint is just its step.
* :func:`collate` right-pads rows of a micro-batch; pads carry label ``-100`` and, because
  attention is causal and pads come last, no real token ever sees one. ``n_tokens`` counts the
  real (non-pad) tokens, for throughput figures.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_pipe.chat_template.builtin import IGNORE_INDEX, ChatTemplate, encode_conversation, to_messages
from llama_pipe.core.errors import InputError
from llama_pipe.core.records import iter_jsonl

log = logging.getLogger(__name__)

PACK_LOOKBACK = 64  # open rows searched when packing (first fit over the most recent rows)


@dataclass
class Example:
    """One tokenised conversation."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class Row:
    """One training row: one conversation, or several packed ones."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)

    def add(self, ex: Example) -> None:
        self.input_ids += ex.input_ids
        self.labels += ex.labels
        self.position_ids += list(range(len(ex.input_ids)))

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        """Tokens that contribute to the loss (labels after the one-token shift)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


@dataclass
class DataStats:
    """What happened to the conversations of one file."""

    path: str
    conversations: int = 0
    examples: int = 0
    truncated: int = 0
    no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0

    def line(self) -> str:
        return (
            f"{self.path}: {self.conversations} conversations -> {self.examples} examples, "
            f"{self.tokens} tokens ({self.target_tokens} trained), {self.truncated} truncated, "
            f"{self.no_target} without an assistant token dropped"
        )


def encode_record(
    record: dict[str, Any], tokenizer: Any, template: ChatTemplate, system_prompt: str | None
) -> Example:
    """Render and tokenise one record; labels cover exactly the assistant targets (control tokens
    only where the template wrote them: :func:`llama_pipe.chat_template.builtin.encode_conversation`)."""
    ids, labels = encode_conversation(tokenizer, template, to_messages(record), system_prompt)
    return Example(ids, labels)


def load_examples(
    path: str | Path,
    tokenizer: Any,
    template: ChatTemplate,
    max_seq_len: int,
    system_prompt: str | None = None,
) -> tuple[list[Example], DataStats]:
    """Tokenised examples of a split JSONL file (conversations longer than ``max_seq_len`` are cut)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: training data file not found (expected the JSONL written by `llama-pipe gather`)")
    stats = DataStats(str(path))
    examples: list[Example] = []
    for n, record in enumerate(iter_jsonl(path), start=1):
        stats.conversations += 1
        try:
            ex = encode_record(record, tokenizer, template, system_prompt)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"{path}: record {n} (id {record.get('id') if isinstance(record, dict) else '?'}) is not a "
                f"conversation this template can render: {exc!r}; run the data stages (merge/clean/split) on it first"
            ) from None
        if len(ex.input_ids) > max_seq_len:
            stats.truncated += 1
            ex = Example(ex.input_ids[:max_seq_len], ex.labels[:max_seq_len])
        if ex.n_targets == 0:
            stats.no_target += 1
            continue
        stats.examples += 1
        stats.tokens += len(ex.input_ids)
        stats.target_tokens += ex.n_targets
        examples.append(ex)
    if not examples:
        raise InputError(f"{path}: no usable conversation (need at least one assistant reply); {stats.line()}")
    return examples, stats


def pack_examples(examples: Sequence[Example], max_seq_len: int, packing: bool = True) -> list[Row]:
    """Rows for training. With ``packing``: first fit over the last :data:`PACK_LOOKBACK` open rows.

    Deterministic: the same examples in the same order always give the same rows.
    """
    rows: list[Row] = []
    if not packing:
        for ex in examples:
            row = Row()
            row.add(ex)
            rows.append(row)
        return rows
    open_rows: list[Row] = []
    for ex in examples:
        n = len(ex.input_ids)
        target = next((r for r in open_rows if len(r) + n <= max_seq_len), None)
        if target is None:
            target = Row()
            rows.append(target)
            open_rows.append(target)
            if len(open_rows) > PACK_LOOKBACK:
                open_rows.pop(0)
        target.add(ex)
    return rows


class StepPlan:
    """Which rows each optimiser step trains on: a function of the step number only.

    The row stream is epoch 0's permutation, then epoch 1's, ... (``torch.randperm`` seeded with
    ``seed + epoch``); step ``s`` takes stream positions ``[s * G, (s + 1) * G)`` with
    ``G = micro_batch_size * grad_accum * world_size``. Within a step, micro-batch ``j`` of rank
    ``r`` is the slice starting at ``(j * world_size + r) * micro_batch_size``.
    """

    def __init__(self, n_rows: int, micro_batch_size: int, grad_accum: int, world_size: int, seed: int) -> None:
        self.n_rows = n_rows
        self.micro = micro_batch_size
        self.accum = grad_accum
        self.world = world_size
        self.seed = seed
        self.global_rows = micro_batch_size * grad_accum * world_size
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        import torch

        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perms = {epoch: torch.randperm(self.n_rows, generator=g).tolist()}
        return self._perms[epoch]

    def total_steps(self, max_steps: int | None, epochs: float) -> int:
        if max_steps is not None:
            return max_steps
        return max(1, int(epochs * self.n_rows) // self.global_rows)

    def step_rows(self, step: int) -> list[int]:
        """Global row indices of optimiser step ``step`` (0-based)."""
        out = []
        for k in range(step * self.global_rows, (step + 1) * self.global_rows):
            out.append(self._perm(k // self.n_rows)[k % self.n_rows])
        return out

    def rank_micro_batches(self, step: int, rank: int) -> list[list[int]]:
        rows = self.step_rows(step)
        return [
            rows[(j * self.world + rank) * self.micro : (j * self.world + rank + 1) * self.micro]
            for j in range(self.accum)
        ]

    def epoch_of(self, step: int) -> float:
        return step * self.global_rows / self.n_rows


def rank_eval_batches(rows: Sequence[Row], rank: int, world: int, micro: int, pad_id: int, flatten: bool = False) -> list[dict[str, Any]]:
    """Process ``rank``'s share of the validation rows as micro-batches; every rank gets as many.

    Under FSDP and DeepSpeed ZeRO-3 every forward pass gathers weights from all processes, so a
    process with one batch fewer would leave the others waiting forever. A rank whose share is
    short runs filler batches: a copy of the first row with every label ignored (adds nothing
    to the loss sum or the token count).
    """
    mine = list(rows[rank::world])
    batches = [collate(mine[i : i + micro], pad_id, flatten=flatten) for i in range(0, len(mine), micro)]
    if rows:
        per_rank = -(-len(rows) // world)
        filler = Row(list(rows[0].input_ids), [IGNORE_INDEX] * len(rows[0]), list(rows[0].position_ids))
        batches += [collate([filler], pad_id, flatten=flatten) for _ in range(-(-per_rank // micro) - len(batches))]
    return batches


def collate(rows: Sequence[Row], pad_id: int, pad_to_multiple_of: int = 8, flatten: bool = False) -> dict[str, Any]:
    """Right-padded tensors ``input_ids``, ``labels``, ``position_ids`` for one micro-batch.

    Pad positions start again at 0 in a packed row (a separate, ignored "conversation") and
    continue the count in an unpacked row (so an unpacked batch is never mistaken for a packed one).

    ``flatten`` puts all rows end to end in one row of shape ``(1, total)`` with no padding.
    flash-attention needs this: transformers 5 only treats restarting ``position_ids`` as
    separate sequences when the batch size is 1 (``_is_packed_sequence``), so a ``(B, L)``
    packed batch would attend across conversations there.
    """
    import torch

    if flatten:
        ids = torch.tensor([[t for r in rows for t in r.input_ids]], dtype=torch.long)
        labels = torch.tensor([[t for r in rows for t in r.labels]], dtype=torch.long)
        pos = torch.tensor([[t for r in rows for t in r.position_ids]], dtype=torch.long)
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "n_tokens": torch.tensor(ids.numel())}
    longest = max(len(r) for r in rows)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        pos[i, :n] = torch.tensor(r.position_ids)
        packed = r.position_ids.count(0) > 1
        pos[i, n:] = torch.arange(length - n) if packed else torch.arange(n, length)
    real = torch.tensor(sum(len(r) for r in rows))
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "n_tokens": real}
