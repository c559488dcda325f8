"""Retention during training: the model scored on general-knowledge items before the first step
and at every evaluation step, so the ``select`` stage can keep the best checkpoint whose retention
stays within bound of the base's (docs/evaluation.md).

Before the first step the adapters are zero (LoRA's B, DoRA's initial magnitude), so the step-0
score is the base's own: no second model is loaded. Each scoring appends one line to
``<run>.ckpt/retention.jsonl`` (moved into the run directory at the end): the step and every
item's per-choice log-likelihoods, enough for :func:`llama_pipe.evaluation.retention.compare` to give the
paired interval against step 0 without scoring again. The items are the bundled set's dev split
(the eval stage reports on its test split, which nothing here ever sees).

After step 0 a LoRA run's step is also scored at every weight select may give the adapter
(:func:`weights_to_try`), the adapter's output scaled by peft's ``rescale_adapter_scale`` -- the
same model as its B matrices times the weight, which is what select writes. Those lines carry a
``weight``; which weight holds the bound is select's decision (``select.bound`` is not read here,
so changing it re-runs only select).

Scored on one process only (under DDP every process holds the whole model; under FSDP and
DeepSpeed a forward is collective, so there retention is not scored and ``select`` keeps the last
step).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from llama_pipe.chat_template.builtin import ChatTemplate
from llama_pipe.config import SelectSettings
from llama_pipe.evaluation.retention import Item, ItemScore, load_items, score_items

log = logging.getLogger("llama_pipe.train")

FILE = "retention.jsonl"


def score_to_json(s: ItemScore) -> list[Any]:
    return [s.id, s.category, s.answer, [round(x, 5) for x in s.logprobs], list(s.chars), list(s.tokens)]


def score_from_json(row: list[Any]) -> ItemScore:
    return ItemScore(str(row[0]), str(row[1]), int(row[2]), tuple(map(float, row[3])), tuple(map(int, row[4])), tuple(map(int, row[5])))


def weights_to_try(settings: SelectSettings) -> list[float]:
    """The weights select may choose among, highest first: ``scale``, half-way to ``min_scale``,
    ``min_scale``; none when ``min_scale`` is not below ``scale`` (a fixed weight: nothing to score)."""
    top, low = settings.scale, settings.min_scale
    return [] if low >= top else [top, round((top + low) / 2, 4), low]


def read_weighted(path: Path) -> dict[int, dict[float, list[ItemScore]]]:
    """step -> weight -> the item scores of that step with the adapter at that weight; the unweighted
    scorings (the adapter as trained) under weight 1.0. A torn last line is skipped."""
    from llama_pipe.core.records import iter_jsonl

    out: dict[int, dict[float, list[ItemScore]]] = {}
    for row in iter_jsonl(path, torn_last_ok=True):
        if isinstance(row, dict) and isinstance(row.get("step"), int) and isinstance(row.get("scores"), list):
            weight = row.get("weight", 1.0)
            if isinstance(weight, (int, float)) and not isinstance(weight, bool):
                out.setdefault(row["step"], {})[float(weight)] = [score_from_json(r) for r in row["scores"]]
    return out


def read_scores(path: Path) -> dict[int, list[ItemScore]]:
    """step -> the item scores of that step with the adapter as trained, from a run's ``retention.jsonl``."""
    return {step: by[1.0] for step, by in read_weighted(path).items() if 1.0 in by}


def _accuracy(scores: list[ItemScore]) -> float:
    """The share of items answered correctly, in points."""
    return 100.0 * sum(s.correct() for s in scores) / max(len(scores), 1)


class RetentionProbe:
    """Scores the model in training on the retention items; one line per scoring in ``path``.
    ``weights``: the weights to score a step's adapter at too (empty: only as trained)."""

    def __init__(self, settings: SelectSettings, tokenizer: Any, template: ChatTemplate, system: str | None, path: Path,
                 weights: list[float] | None = None) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.template = template
        self.system = system
        self.path = path
        items: list[Item] = load_items(settings.items, split=None if settings.items else "dev")
        self.items = items[: settings.max_items] if settings.max_items else items
        self.weights = weights or []

    def done_steps(self) -> set[int]:
        """Steps already scored (a resumed run keeps them)."""
        return set(read_scores(self.path)) if self.path.is_file() else set()

    def _score(self, acc: Any, model: Any, step: int, weight: float | None) -> list[ItemScore]:
        import torch

        inner = acc.unwrap_model(model)
        was_training = inner.training
        inner.eval()
        at = "" if weight is None else f", weight {weight:g}"
        try:
            with torch.no_grad(), acc.autocast():
                scores = score_items(inner, self.tokenizer, self.template, self.items, self.settings.batch_size, self.system,
                                     desc=f"retention (step {step}{at})")
        finally:
            if was_training:
                inner.train()
        row: dict[str, Any] = {"step": step, "scores": [score_to_json(s) for s in scores]}
        if weight is not None:
            row["weight"] = weight
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        return scores

    def score(self, acc: Any, model: Any, step: int) -> float:
        """Score ``model`` (as prepared by accelerate) at ``step``, and after step 0 at :attr:`weights`;
        returns the accuracy as trained, in points."""
        scores = self._score(acc, model, step, None)
        accuracy = _accuracy(scores)
        log.info("step %d: retention %.1f%% of %d items", step, accuracy, len(scores))
        if step:
            self.score_weights(acc, model, step)
        return accuracy

    def score_weights(self, acc: Any, model: Any, step: int) -> None:
        """Score the adapter at each of :attr:`weights` (its output rescaled, then restored)."""
        from peft.helpers import rescale_adapter_scale

        for weight in self.weights:
            with rescale_adapter_scale(acc.unwrap_model(model), weight):
                scores = self._score(acc, model, step, weight)
            log.info("step %d: retention at weight %g: %.1f%%", step, weight, _accuracy(scores))
