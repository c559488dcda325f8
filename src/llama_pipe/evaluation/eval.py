"""``llama-pipe eval``: base vs tuned perplexity on the held-out split, and sample answers.

Perplexity: every validation record is rendered with the tuned model's chat template (and the
system prompt it was trained with) and tokenised once with the tuned model's tokenizer through
:func:`llama_pipe.chat_template.builtin.tokenize_with_labels`; both models are scored on exactly those
tokens, on the assistant tokens only: ``ppl = exp(sum NLL / n_target_tokens)``. A record with a
token id the base's embedding cannot hold (a tokenizer grown by an adapter) is left out for
both, and counted.

Answers: MT-bench style questions (``question_id``, ``category``, ``turns``) are answered turn
by turn - turn 2 sees the model's own turn-1 answer - with fixed sampling settings (greedy by
default) and a seed per turn (the same seeds for both models), through the same generation code
as ``chat`` and ``serve``. A question with ``expected`` answers is scored (see
:mod:`llama_pipe.evaluation.heldout`); the default questions are the bundled held-out set (identity
paraphrases and general knowledge), found inside the installed package.

Each model answers, and is scored for retention, through its *own* chat template (the one
recorded with it, else its tokenizer's): a base is judged as its users talk to it.

Retention (``eval.retention``): base and tuned scored on multiple-choice items training never saw
(the bundled item bank's test split, and public benchmark files the workflow fetches), by
log-likelihood, compared item by item with a paired 95% interval per category
(:mod:`llama_pipe.evaluation.retention`). Style: the most common three-word opening of each model's answers to
the non-identity questions and its share, and distinct-2. Held-out text: the perplexity of both
models on the base's own answers to the held-out questions (coherent text that is not the
training distribution; a tuned model that drifted from its base finds it less likely).

Output directory (built in ``OUT.tmp-*``, renamed when complete): ``metrics.json`` (with
``scores``: per category and model, correct / scored / rate; ``retention``, ``style``,
``heldout_text``) and ``answers.jsonl`` (one row per model and question, FastChat's answer layout
plus the questions and ``correct``).
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from llama_pipe.chat_template.builtin import IGNORE_INDEX, encode_conversation, to_messages
from llama_pipe.chat_template.resolve import recorded_system_prompt, resolve_template
from llama_pipe.config import ChatSettings, EvalSettings, settings_from_args
from llama_pipe.core.atomic import atomic_dir, check_output_dir, write_json_atomic
from llama_pipe.core.errors import InputError
from llama_pipe.core.records import dumps, iter_jsonl, read_records
from llama_pipe.core.settings import add_settings_arguments, describe, to_dict
from llama_pipe.evaluation.heldout import bundled_questions, check_expected, score_rows
from llama_pipe.evaluation.retention import BENCHMARKS, Item, ItemScore, compare, load_items, load_oe_eval, score_items, style
from llama_pipe.models.generation import ChatModel, SamplingParams, pick_device, target_logits
from llama_pipe.models.model_dir import check_model_dir, load_config, load_float_base
from llama_pipe.weights.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="HF_DIR", help="the base model directory")
    parser.add_argument("--tuned", required=True, metavar="HF_DIR", help="the tuned (merged) model directory")
    parser.add_argument("--val", required=True, metavar="JSONL", help="held-out split written by `llama-pipe gather`")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="writes metrics.json and answers.jsonl here")
    parser.add_argument("--benchmark", action="append", default=[], metavar="NAME=FILE",
                        help="where a public benchmark named in eval.retention_items was fetched (the workflow passes it)")
    add_settings_arguments(parser, EvalSettings, "eval")
    add_settings_arguments(parser, ChatSettings, "chat", config_flag=False, only=("template", "system_prompt"))


# ----------------------------------------------------------------------------- inputs


def read_questions(path: str | Path | None, limit: int = 0) -> list[dict[str, Any]]:
    """MT-bench style questions; each needs a unique ``question_id`` and a non-empty list of string
    ``turns``, and may have ``expected`` answers. ``path`` None reads the bundled held-out set."""
    questions, seen = [], set()
    for where, q in read_records(bundled_questions() if path is None else path):
        if not isinstance(q, dict) or not isinstance(q.get("turns"), list) or not q["turns"] \
                or not all(isinstance(t, str) and t.strip() for t in q["turns"]) or "question_id" not in q:
            raise InputError(f"{where}: expected {{\"question_id\", \"category\", \"turns\": [non-empty strings]}}")
        if (why := check_expected(q)) is not None:
            raise InputError(f"{where}: {why}")
        if str(q["question_id"]) in seen:
            raise InputError(f"{where}: question_id {q['question_id']!r} appears twice; give each question its own id")
        seen.add(str(q["question_id"]))
        questions.append(q)
    return questions[:limit] if limit else questions


def encode_val(path: Path, tokenizer: Any, template: Any, system: str | None, max_len: int) -> tuple[list[tuple[list[int], list[int]]], dict[str, int]]:
    """(ids, labels) of every usable validation record, and counts of what was left out."""
    if not path.is_file():
        raise InputError(f"{path}: validation file not found (expected the val.jsonl `llama-pipe gather` writes, results/data/gather/<key>/ in the workflow)")
    rows, counts = [], {"read": 0, "truncated": 0, "no_target": 0}
    for n, record in enumerate(iter_jsonl(path), start=1):
        counts["read"] += 1
        try:
            ids, labels = encode_conversation(tokenizer, template, to_messages(record), system)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: record {n} is not a conversation the template can render ({exc!r})") from None
        if len(ids) > max_len:
            counts["truncated"] += 1
            ids, labels = ids[:max_len], labels[:max_len]
        if all(lab == IGNORE_INDEX for lab in labels[1:]):
            counts["no_target"] += 1
            continue
        rows.append((ids, labels))
    if not rows:
        raise InputError(f"{path}: no record with assistant tokens to score ({counts['read']} records read)")
    return rows, counts


def retention_sets(specs: list[str], limit: int = 0, fetched: dict[str, Path] | None = None) -> dict[str, list[Item]]:
    """The retention sets by name: ``bundled`` (the bundled bank's test split, named ``llama_pipe``),
    a public benchmark of :data:`llama_pipe.evaluation.retention.BENCHMARKS` (``arc_easy-test``: its file as
    fetched, given in ``fetched``), an OLMES ``requests.jsonl.gz``, or a JSONL of items."""
    out: dict[str, list[Item]] = {}
    for spec in specs:
        path = Path(spec)
        if spec in BENCHMARKS:
            source, sha = BENCHMARKS[spec]
            if spec not in (fetched or {}):
                raise InputError(f"eval.retention_items: {spec!r} is a public benchmark: fetch it with `llama-pipe download "
                                 f"--source '{source}' --sha256 {sha} -- DIR` (the workflow does) and pass --benchmark {spec}=DIR/"
                                 f"{source.rsplit('/', 1)[-1]}")
            out[spec] = load_oe_eval((fetched or {})[spec], split="test")
            out[spec] = out[spec][:limit] if limit else out[spec]
            continue
        if spec == "bundled":
            name, items = "llama_pipe", load_items(None, split="test")
        elif path.name.endswith(".gz"):
            name, items = path.parent.name if path.name.startswith("requests") else path.name.split(".")[0], load_oe_eval(path)
        else:
            name, items = path.stem, load_items(path)
        out[name] = items[:limit] if limit else items
    return out


# ----------------------------------------------------------------------------- scoring


def nll_sum(model: Any, rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> tuple[float, int]:
    """Summed next-token NLL over the target tokens of ``rows`` and how many targets there were."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    total, count = 0.0, 0
    with torch.inference_mode():
        for b in tqdm(range(0, len(order), batch_size), desc="perplexity", unit="batch", disable=None):
            batch = [rows[i] for i in order[b : b + batch_size]]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (i, lab) in enumerate(batch):
                ids[r, : len(i)] = torch.tensor(i)
                labels[r, : len(lab)] = torch.tensor(lab)
                mask[r, : len(i)] = 1
            labels = labels.to(device)
            logits, targets = target_logits(model, labels, input_ids=ids.to(device), attention_mask=mask.to(device))
            total += float(F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"))
            count += int((labels[:, 1:] != -100).sum())
    return total, count


def qa_rows(pairs: list[tuple[str, str]], tokenizer: Any, template: Any, system: str | None) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of one-turn conversations (question, answer), the answer's tokens as targets."""
    rows = []
    for q, a in pairs:
        if a.strip():
            ids, labels = encode_conversation(tokenizer, template, [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                              system)
            rows.append((ids, labels))
    return rows


def answer_questions(chat: Any, questions: list[dict[str, Any]], settings: EvalSettings, label: str) -> list[dict[str, Any]]:
    """Multi-turn answers: each turn sees the model's previous answers.

    Turn by turn, the questions still going are answered together, ``settings.batch_size`` per
    forward pass; each question's turn keeps its own seed, so the answers do not depend on the
    batching beyond float rounding.
    """
    from tqdm import tqdm

    histories: list[list[dict[str, str]]] = [[] for _ in questions]
    answers: list[list[str]] = [[] for _ in questions]
    finishes: list[list[str | None]] = [[] for _ in questions]
    going = set(range(len(questions)))
    with tqdm(total=sum(len(q["turns"]) for q in questions), desc=f"answers ({label})", unit="turn", disable=None) as bar:
        for ti in range(max((len(q["turns"]) for q in questions), default=0)):
            asked = [qi for qi in sorted(going) if ti < len(questions[qi]["turns"])]
            for qi in asked:
                histories[qi].append({"role": "user", "content": questions[qi]["turns"][ti]})
            params = [SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                     top_p=settings.top_p, seed=settings.seed * 100_003 + qi * 101 + ti) for qi in asked]
            done = chat.complete_batch([histories[qi] for qi in asked], params, settings.batch_size, bar.update)
            for qi, res in zip(asked, done):
                if res.error is not None:  # the conversation outgrew the context: the question ends here
                    answers[qi].append("")
                    finishes[qi].append(f"error: {res.error}")
                    going.discard(qi)
                    continue
                histories[qi].append({"role": "assistant", "content": res.text})
                answers[qi].append(res.text)
                finishes[qi].append(res.finish_reason)
    return [
        {
            "question_id": q["question_id"], "answer_id": f"{label}-{q['question_id']}", "model_id": label,
            "category": q.get("category"), "turns": q["turns"], "expected": q.get("expected"),
            "choices": [{"index": 0, "turns": answers[qi]}], "finish_reasons": finishes[qi], "tstamp": time.time(),
        }
        for qi, q in enumerate(questions)
    ]


# ----------------------------------------------------------------------------- the stage


class Scorer(NamedTuple):
    """One model as retention scores it: the model, its tokenizer, template and system prompt."""

    model: Any
    tokenizer: Any
    template: Any
    system: str | None


def score_retention(sets: dict[str, list[Item]], scorers: dict[str, Scorer], batch_size: int) -> dict[str, dict[str, list[ItemScore]]]:
    """Every retention set scored by every model: ``{label: {set: scores}}``.

    Two or more CPU models score side by side, each on its share of the threads (their matrix
    products leave the GIL): on 2 cores this took 25.0 s where one model after the other on both
    took 30.5 s (300 ARC-Easy items, bf16; docs/benchmarks.md). The log-likelihoods are those of
    another thread count: equal there, in fp32 equal to rounding (tests/evaluation/test_retention.py)."""
    import torch

    def score(label: str) -> dict[str, list[ItemScore]]:
        s = scorers[label]
        if side_by_side:
            torch.set_num_threads(share)  # this thread's operator pool
        return {name: score_items(s.model, s.tokenizer, s.template, items, batch_size, s.system, desc=f"retention {name} ({label})")
                for name, items in sets.items()}

    threads = torch.get_num_threads()
    on_cpu = all(next(s.model.parameters()).device.type == "cpu" for s in scorers.values())
    side_by_side = on_cpu and 1 < len(scorers) <= threads
    share = threads // max(1, len(scorers))
    if not side_by_side:
        return {label: score(label) for label in scorers}
    try:
        with ThreadPoolExecutor(len(scorers), thread_name_prefix="retention") as pool:
            futures = {label: pool.submit(score, label) for label in scorers}
            return {label: f.result() for label, f in futures.items()}
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    import torch

    settings = settings_from_args(args, EvalSettings, "eval")
    chat = settings_from_args(args, ChatSettings, "chat")
    log.info("eval settings:\n%s", describe(settings))
    base, tuned, val, out = Path(args.base), Path(args.tuned), Path(args.val), Path(args.output)
    t0 = time.time()
    inputs: list[str | Path] = [base, tuned, val, *([settings.questions] if settings.questions else []),
                                *(p for p in settings.retention_items if p != "bundled" and p not in BENCHMARKS),
                                *(pair.partition("=")[2] for pair in args.benchmark)]
    check_output_dir(out, inputs, "eval")  # before any model is loaded
    device = pick_device(settings.device)
    check_model_dir(base, "base model")
    check_model_dir(tuned, "tuned model")
    questions = read_questions(settings.questions, settings.max_questions)
    tokenizer = load_tokenizer(tuned)
    template = resolve_template(chat.template, [tuned], tokenizer)
    system = chat.system_prompt if chat.system_prompt is not None else recorded_system_prompt([tuned])
    configs = []
    for path in (base, tuned):
        configs.append(load_config(path))
    max_len = min(int(getattr(c, "max_position_embeddings", 2048)) for c in configs)
    rows, counts = encode_val(val, tokenizer, template, system, max_len)
    vocab = min(int(c.vocab_size) for c in configs)
    usable = [r for r in rows if max(r[0]) < vocab]  # ids only a grown tokenizer has: not comparable
    counts["out_of_vocab"] = len(rows) - len(usable)
    if not usable:
        raise InputError(f"{val}: every record uses tokens beyond the base vocabulary of {vocab}; perplexities are not comparable")
    rows = usable
    fetched = {}
    for pair in args.benchmark:
        name, sep, file = pair.partition("=")
        if not sep or not name or not file:
            raise InputError(f"--benchmark {pair!r}: expected NAME=FILE")
        fetched[name] = Path(file)
    sets = retention_sets(settings.retention_items, settings.retention_max_items, fetched) if settings.retention else {}
    results: dict[str, dict[str, Any]] = {}
    answers: list[dict[str, Any]] = []
    scorers: dict[str, Scorer] = {}
    by_label: dict[str, dict[str, list[ItemScore]]] = {}
    heldout: list[tuple[str, str]] = []  # (question, the base's answer): coherent text outside the training data
    own: dict[str, dict[str, Any]] = {}
    phases: dict[str, float] = {}  # wall seconds per part, for the log and metrics.json

    def timed(name: str, since: float) -> float:
        now = time.time()
        phases[name] = round(phases.get(name, 0.0) + now - since, 2)
        return now

    for label, path in (("base", base), ("tuned", tuned)):
        t = time.time()
        tok_m = tokenizer if path == tuned else load_tokenizer(path)
        tmpl_m = template if path == tuned else resolve_template(chat.template, [path], tok_m)
        sys_m = system if path == tuned else (chat.system_prompt if chat.system_prompt is not None else recorded_system_prompt([path]))
        own[label] = {"template": tmpl_m.name, "system_prompt": sys_m}
        model = load_float_base(path)
        if device == "cuda":
            model = model.to(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        model = model.to(device).eval()
        t = timed("load", t)
        total, n = nll_sum(model, rows, tokenizer.pad_token_id, settings.batch_size)
        results[label] = {"nll": total / n, "ppl": math.exp(total / n), "tokens": n}
        log.info("%s: perplexity %.3f over %d assistant tokens", label, results[label]["ppl"], n)
        t = timed("perplexity", t)
        rows_m = answer_questions(ChatModel(model, tok_m, tmpl_m, label, sys_m), questions, settings, label)
        t = timed("answers", t)
        answers += rows_m
        if label == "base":
            heldout = [(q["turns"][0], r["choices"][0]["turns"][0]) for q, r in zip(questions, rows_m) if q.get("category") != "identity"]
        h_total, h_n = nll_sum(model, qa_rows(heldout, tok_m, tmpl_m, sys_m), tok_m.pad_token_id, settings.batch_size) if heldout else (0.0, 0)
        results[label]["heldout_text_ppl"] = math.exp(h_total / h_n) if h_n else None
        t = timed("perplexity", t)
        if sets and device == "cpu":  # multiple choice by log-likelihood: bf16 picks the same answers at half the CPU time
            scorers[label] = Scorer(model.to(torch.bfloat16), tok_m, tmpl_m, sys_m)  # scored side by side below
        elif sets:  # one model in GPU memory at a time
            by_label |= score_retention(sets, {label: Scorer(model, tok_m, tmpl_m, sys_m)}, settings.batch_size)
        timed("retention", t)
        del model
        gc.collect()
    t = time.time()
    by_label |= score_retention(sets, scorers, settings.batch_size)
    timed("retention", t)
    log.info("eval seconds by part: %s", ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    scorers.clear()
    ret_scores = {name: {label: scores[name] for label, scores in by_label.items()} for name in sets}
    scores = score_rows(answers, questions)
    retention = {name: compare(by["base"], by["tuned"], bound=settings.retention_bound) for name, by in ret_scores.items()}
    general = {label: [a["choices"][0]["turns"][0] for a in answers if a["model_id"] == label and a.get("category") != "identity"]
               for label in ("base", "tuned")}
    metrics = {
        "base_ppl": results["base"]["ppl"], "tuned_ppl": results["tuned"]["ppl"],
        "base_nll": results["base"]["nll"], "tuned_nll": results["tuned"]["nll"],
        "ppl_ratio": results["tuned"]["ppl"] / results["base"]["ppl"],
        "tokens": results["tuned"]["tokens"], "records_scored": len(rows), **{f"records_{k}": v for k, v in counts.items()},
        "template": template.name, "system_prompt": system, "own_templates": own, "questions": len(questions),
        "questions_file": str(settings.questions or "(bundled held-out set)"), "scores": scores,
        "retention": retention, "retention_kept": all(r["overall"]["holds"] for r in retention.values()) if retention else None,
        "style": {label: style(texts) for label, texts in general.items()},
        "heldout_text": {"what": "the base's answers to the non-identity held-out questions", "pairs": len(heldout),
                         "base_ppl": results["base"]["heldout_text_ppl"], "tuned_ppl": results["tuned"]["heldout_text_ppl"]},
        "generation": {k: getattr(settings, k) for k in ("max_new_tokens", "temperature", "top_p", "seed")},
        "models": {"base": str(base), "tuned": str(tuned)}, "val": str(val), "device": device, "seconds": round(time.time() - t0, 2),
        "phase_seconds": phases,
        "settings": to_dict(settings),
    }
    with atomic_dir(out, stage="eval", inputs=inputs) as tmp:
        write_json_atomic(tmp / "metrics.json", metrics)
        (tmp / "answers.jsonl").write_text("".join(dumps(a) + "\n" for a in answers), encoding="utf-8")
    print(
        f"eval: perplexity base {metrics['base_ppl']:.3f} -> tuned {metrics['tuned_ppl']:.3f} "
        f"on {metrics['tokens']} assistant tokens ({len(rows)} records); {len(answers)} answer rows -> {out}"
    )
    for category, cell in sorted(scores.items()):
        print(f"eval: {category}: " + ", ".join(f"{m} {c['correct']}/{c['scored']} correct" for m, c in sorted(cell.items())))
    for name, r in retention.items():
        o = r["overall"]
        print(f"eval: retention {name} ({o['n']} items): base {o['base']:.1f} -> tuned {o['tuned']:.1f} ({o['diff']:+.1f} points, "
              f"95% CI [{o['ci95'][0]:+.1f}, {o['ci95'][1]:+.1f}]) {'kept' if o['holds'] else 'NOT KEPT'} within {settings.retention_bound} points")
    st = metrics["style"]["tuned"]
    print(f"eval: style of the tuned answers: {st['top_opening_share']:.0%} open with {st['top_opening']!r}, distinct-2 {st['distinct_2']:.2f}")
    return 0
