"""``llama-pipe split``: whole human/gpt pairs into chunks of at most ``max_length`` tokens
(``split.max_length``, else ``chat.max_seq_len``: the rows training takes).

FastChat's rule (consecutive pairs fill a chunk until the next pair would overflow it; chunk ``k``
of record ``ID`` gets id ``ID_k``), with three differences:

* a chunk is measured exactly as the trainer will see it: the chunk rendered with the chat
  template (``chat.template``; system = the record's ``system``, else ``chat.system_prompt``, else
  the template's default) and tokenized with the BOS, so a chunk of <= ``max_length`` tokens fits a
  ``chat.max_seq_len`` of the same value. (FastChat counts each turn alone plus 6.)
* never an empty chunk, and never a silently dropped pair: a pair that alone renders longer than
  ``max_length`` is rejected with reason ``pair_too_long`` (``on_long_pair: reject``) or its gpt
  turn is cut to fit (``truncate``; a human turn that alone does not fit is still rejected);
* every chunk id gets its ``_k``, also a record that fits in one chunk (``ID_0``), so ids stay
  unique and ``gather`` can find a conversation's chunks by stripping one ``_k``.

Accounting unit: **pairs**. ``in`` = pairs read, ``out`` = pairs written inside chunks,
``rejected`` = pairs rejected (a malformed record counts as ``max(1, turns // 2)`` pairs).
The stats also give ``records_in``, ``chunks_out``, ``pairs_truncated`` and ``max_chunk_tokens``.

How chunks are planned and measured fast (tokenized in batches, quadratic renders and giant turns
avoided): :mod:`llama_pipe.data.split_plan`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_pipe.chat_template.builtin import MODEL, ChatTemplate
from llama_pipe.chat_template.resolve import pick_template, resolve_template
from llama_pipe.config import ChatSettings, SplitSettings, settings_from_args
from llama_pipe.core.errors import InputError
from llama_pipe.core.records import InvalidLine, Record, dumps
from llama_pipe.core.settings import add_settings_arguments, describe
from llama_pipe.core.stage_writer import StageWriter
from llama_pipe.data.common import (
    add_output_arguments,
    alternates,
    conversation_problem,
    log,
    log_settings,
    map_records,
    progress,
    resolve_workers,
)
from llama_pipe.data.rust_tokenizer import load_rust_tokenizer, why_not_rust
from llama_pipe.data.split_plan import SplitRecord, Splitter
from llama_pipe.weights.tokenizer import load_tokenizer

RECORDS_PER_STEP = 64
def _prepare(obj: Any, system_prompt: str | None) -> SplitRecord | str:
    problem = conversation_problem(obj)
    if problem:
        return problem
    conv = obj["conversations"]
    if len(conv) < 2 or len(conv) % 2 or not alternates(conv):
        return f"{len(conv)} turns; expected human/gpt pairs (run clean first)"
    pairs = [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv), 2)]
    system = obj.get("system") if isinstance(obj.get("system"), str) and obj.get("system") else system_prompt
    return SplitRecord(obj, pairs, system)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="JSONL written by filter-lang (or clean)")
    add_output_arguments(parser, "JSONL of chunks")
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory (the converted HF base)")
    add_settings_arguments(parser, SplitSettings, "split")
    add_settings_arguments(parser, ChatSettings, "chat", config_flag=False)


def split_file(inp: str | Path, out: str | Path, tokenizer: Any, cfg: SplitSettings,
               rejects: str | Path | None = None, stats: str | Path | None = None,
               chat: ChatSettings | None = None, template: ChatTemplate | None = None,
               also_read: Iterable[str | Path] = ()) -> StageWriter:
    """Run the stage with a loaded tokenizer; returns the finished writer (stats on disk).

    ``chat`` (None: the defaults) gives the template, the default system prompt and, when
    ``cfg.max_length`` is null, the chunk length; ``template`` (None: ``chat.template`` resolved as
    train resolves it, :func:`llama_pipe.chat_template.resolve.resolve_template`) the template itself. ``also_read``:
    further paths the run reads (the tokenizer directory, its ``--config``), which no output may replace."""
    chat = chat or ChatSettings()
    if template is None:
        template = resolve_template(chat.template, [], tokenizer)
    global _JOB
    splitter = Splitter(tokenizer, cfg, template, cfg.max_length or chat.max_seq_len)
    _JOB = (splitter, chat.system_prompt)  # set before the workers fork: they inherit the tokenizer
    workers, results = map_records(inp, _split_batch, resolve_workers(cfg.workers), RECORDS_PER_STEP)
    records_in = chunks_out = truncated = split_records = max_tokens = tokens_out = 0
    with StageWriter("split", out, rejects, stats, unit="pairs", inputs=[inp, *also_read]) as w:
        for where, obj, res in progress(results, "split"):
            records_in += 1
            if not isinstance(res, _Done):
                prep = "not valid JSON: " + obj.error if isinstance(obj, InvalidLine) else res
                conv = obj.get("conversations") if isinstance(obj, dict) else None
                units = max(1, len(conv) // 2) if isinstance(conv, list) else 1
                w.count_in(units)
                reason = obj.reason if isinstance(obj, InvalidLine) and obj.reason != "invalid_json" else "malformed_record"
                w.reject(obj, reason, f"{where}: {prep}", count=units)
                continue
            w.count_in(res.pairs)
            for pair_rec, detail in res.rejects:
                w.reject(pair_rec, "pair_too_long", detail)
            split_records += len(res.lines) > 1
            truncated += res.cut
            for line, n_pairs in res.lines:
                w.keep_line(line, counts=False)
                w.n_out += n_pairs
                chunks_out += 1
            max_tokens = max([max_tokens, *res.sizes])
            tokens_out += sum(res.sizes)
        w.extra.update(records_in=records_in, chunks_out=chunks_out, records_split=split_records,
                       pairs_truncated=truncated, max_chunk_tokens=max_tokens, tokens_out=tokens_out,
                       max_length=splitter.max_length, template=splitter.template.name, workers=workers)
    return w


_JOB: tuple[Splitter, str | None] | None = None  # the splitter and the default system prompt of this run


@dataclass
class _Done:
    """A record split (by a worker): its pairs, the pairs rejected as too long (record, detail),
    its chunks as output lines with their pairs, the gpt turns cut, the chunks' token counts."""

    pairs: int
    rejects: list[tuple[Record, str]]
    lines: list[tuple[str, int]]
    cut: int
    sizes: list[int]


def _split_batch(batch: list[Any]) -> list[_Done | str]:
    """Split a batch of records (None: an unreadable line); a record that cannot be split gives
    the reason (a string)."""
    assert _JOB is not None
    splitter, system_prompt = _JOB
    preps = [_prepare(obj, system_prompt) for obj in batch]
    ready = [r for r in preps if isinstance(r, SplitRecord)]
    splitter.plan(ready)
    out: list[_Done | str] = []
    for r in preps:
        if isinstance(r, str):
            out.append(r)
            continue
        base = {k: v for k, v in r.rec.items() if k not in ("id", "conversations")}
        rejects = [({"id": r.rec["id"], "pair_index": j,
                     "conversations": [{"from": "human", "value": r.pairs[j][0]}, {"from": "gpt", "value": r.pairs[j][1]}]}, detail)
                   for j, detail in sorted(r.long.items())]
        lines = []
        for k, chunk in enumerate(r.chunks):
            conv = []
            for j in chunk:
                q, a = splitter.pair(r, j)
                conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
            lines.append((dumps({"id": f"{r.rec['id']}_{k}", **base, "conversations": conv}), len(chunk)))
        out.append(_Done(len(r.pairs), rejects, lines, len(r.cut), r.sizes))
    return out


def load_split_tokenizer(path: str | Path, template: str | None = None) -> Any:
    """The tokenizer split measures with: the Rust tokenizer alone when it is known to give the
    transformers ids (:mod:`llama_pipe.data.rust_tokenizer`, ~2 s less start-up) and ``template``
    (chat.template) does not resolve to the model's own Jinja (rendered with the transformers
    tokenizer's special tokens), else :func:`llama_pipe.weights.tokenizer.load_tokenizer`."""
    tok = load_rust_tokenizer(path)
    if tok is not None and pick_template(template, [Path(path)], tok) != MODEL:
        log.info("split: tokenizer loaded with the tokenizers library alone")
        return tok
    log.info("split: tokenizer loaded through transformers (%s)", why_not_rust(path) or "the model's own chat template")
    return load_tokenizer(path)


def run(args: argparse.Namespace) -> int:
    cfg = settings_from_args(args, SplitSettings, "split")
    chat = settings_from_args(args, ChatSettings, "chat")
    log_settings("split", cfg, input=args.input, output=args.output, tokenizer=args.tokenizer)
    log.info("split: chat settings\n%s", describe(chat))
    tok = load_split_tokenizer(args.tokenizer, chat.template)
    if not getattr(tok, "is_fast", True):
        raise InputError(f"{args.tokenizer}: not a fast tokenizer (no tokenizer.json); split needs one for batched, offset-aware tokenization")
    template = resolve_template(chat.template, [Path(args.tokenizer)], tok)  # as train resolves it for the same directory
    log.info("split: chat template %s", template.name)
    w = split_file(args.input, args.output, tok, cfg, args.rejects, args.stats, chat, template,
                   also_read=[args.tokenizer, *([args.config] if args.config else [])])
    print(w.summary() + f"; records in={w.extra['records_in']} chunks out={w.extra['chunks_out']}")
    return 0
