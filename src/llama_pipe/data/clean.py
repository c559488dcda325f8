"""``llama-pipe clean``: HTML -> markdown and FastChat's clean_sharegpt filters, on all cores.

Per record, in this order (the reject reason in brackets):

1. well-formed: string id, ``conversations`` of human/gpt turns with string values [malformed_record];
   a ``plugins`` value marks a plugin conversation [plugin];
2. a leading gpt turn is dropped (``fix_roles: drop_first_gpt``, FastChat) or rejected
   [first_turn_not_human]; a trailing human turn is dropped; then fewer than 2 turns [too_few_turns];
3. roles alternate human, gpt, ... [non_alternating_roles];
4. every turn -> markdown (:mod:`llama_pipe.data.markdown`) [html_too_deep, html_parse_error];
   a turn whose markdown would be longer than ``max_growth`` x its input + 10,000 characters
   [too_large] (checked before a table or list is built, so memory stays bounded);
5. the conversation is cut before its first empty (or whitespace-only) turn (FastChat does the
   same), to an even number of turns; nothing left [empty_turn]; the ``rename`` entries are
   applied to every turn (:mod:`llama_pipe.data.identity`);
6. a gpt turn that starts with a blocked reply ("Too many requests in 1 hour...") [blocked_reply]
   or contains a blocked word, case-insensitively [blocked_word];
7. fewer than ``min_turns`` turns [too_few_turns] or fewer than ``min_chars`` characters in all
   [too_short];
8. in input order: the id of an earlier kept conversation [duplicate_id]; the same first human+gpt
   exchange as an earlier kept conversation [duplicate_first_exchange] (as FastChat; compared
   after cleaning, with whitespace runs collapsed: :func:`~llama_pipe.data.common.dedup_text`,
   the form shard keys on, so such twins always meet in one shard).

Steps 1-7 run in a process pool on batches of records; results come back in input order, so the
output does not depend on the number of workers. Step 8 runs in the main process. Steps 1-7 of
one record have ``time_budget`` seconds; a record that takes longer is rejected [too_slow] (a
SIGALRM timer interrupts it) rather than stalling its shard. Every step is linear in the size of
the record, so only a machine far slower than expected reaches the budget. A record nested more
than 100 levels deep is rejected when read [too_deep], NaN/Infinity as [invalid_json].
"""

from __future__ import annotations

import argparse
import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_pipe.config import CleanSettings, settings_from_args
from llama_pipe.core.budget import TooSlow, within_budget
from llama_pipe.core.records import InvalidLine, Record, dumps
from llama_pipe.core.settings import add_settings_arguments
from llama_pipe.core.stage_writer import StageWriter
from llama_pipe.data.common import (
    add_output_arguments,
    alternates,
    conversation_problem,
    dedup_text,
    log,
    log_settings,
    map_records,
    progress,
    resolve_workers,
)
from llama_pipe.data.identity import introductions, renamer
from llama_pipe.data.markdown import ConversionError, to_markdown

BATCH = 64
GROWTH_SLACK = 10_000  # characters a turn may grow by beyond max_growth x its length (too_large)


@dataclass
class Outcome:
    """What cleaning did to one record: ``record`` when kept, else ``reason`` + ``detail``."""

    record: Record | None
    reason: str = ""
    detail: str = ""
    notes: tuple[str, ...] = ()
    # filled in by the worker for a kept record (so the main process only deduplicates and writes):
    line: str = ""  # the record's output line
    first: bytes = b""  # digest of its first exchange in dedup form (first_exchange_key)
    intro: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())  # names, makers it introduces


def clean_record(rec: Any, cfg: CleanSettings) -> Outcome:
    """Steps 1-7 of the module docstring for one record (no cross-record state)."""
    problem = conversation_problem(rec)
    if problem:
        return Outcome(None, "malformed_record", problem)
    if rec.get("plugins") is not None:
        return Outcome(None, "plugin", "conversation used ChatGPT plugins")
    conv = rec["conversations"]
    notes: list[str] = []
    if conv and conv[0]["from"] != "human":
        if cfg.fix_roles == "reject":
            return Outcome(None, "first_turn_not_human", f"first turn is from {conv[0]['from']!r}")
        conv = conv[1:]
        notes.append("first_gpt_dropped")
    if conv and conv[-1]["from"] == "human":
        conv = conv[:-1]
        notes.append("trailing_human_dropped")
    if len(conv) < 2:
        return Outcome(None, "too_few_turns", f"{len(conv)} turn(s) after fixing the ends")
    if not alternates(conv):
        i = next(i for i, t in enumerate(conv) if t["from"] != ("human", "gpt")[i % 2])
        return Outcome(None, "non_alternating_roles", f"turn {i} is from {conv[i]['from']!r}")
    new: list[dict[str, str]] = []
    for i, turn in enumerate(conv):
        try:
            value = to_markdown(turn["value"], max_chars=int(cfg.max_growth * len(turn["value"])) + GROWTH_SLACK)
        except ConversionError as exc:
            return Outcome(None, exc.reason, f"turn {i}: {exc}")
        if not value:  # empty or whitespace only (a turn of U+200B, U+200F or U+FEFF is text)
            notes.append("cut_at_empty_turn")
            break
        new.append({"from": turn["from"], "value": value})
    new = new[: len(new) // 2 * 2]
    if not new:
        return Outcome(None, "empty_turn", "the first exchange has an empty turn after cleaning")
    if cfg.rename:  # no copy of every turn when there is nothing to rename
        rename = renamer(tuple(cfg.rename))
        renamed = [{"from": t["from"], "value": rename(t["value"])} for t in new]
        if renamed != new:
            new = renamed
            notes.append("renamed")
    blocked_words = [w.lower() for w in cfg.blocked_words if w]
    for i, turn in enumerate(new):
        if turn["from"] != "gpt":
            continue
        for reply in cfg.blocked_replies:
            if reply and turn["value"].startswith(reply):
                return Outcome(None, "blocked_reply", f"turn {i} starts with {reply[:40]!r}")
        low = turn["value"].lower()
        for w in blocked_words:
            if w in low:
                return Outcome(None, "blocked_word", f"turn {i} contains {w!r}")
    if len(new) < cfg.min_turns:
        return Outcome(None, "too_few_turns", f"{len(new)} turn(s) after cleaning, min_turns={cfg.min_turns}")
    chars = sum(len(t["value"]) for t in new)
    if chars < cfg.min_chars:
        return Outcome(None, "too_short", f"{chars} characters in all turns, min_chars={cfg.min_chars}")
    out = {k: v for k, v in rec.items() if k != "conversations"}
    out["conversations"] = new
    return Outcome(out, notes=tuple(notes))


_CFG: CleanSettings | None = None


def _init(cfg: CleanSettings) -> None:
    global _CFG
    _CFG = cfg


def clean_within_budget(rec: Any, cfg: CleanSettings) -> Outcome:
    """:func:`clean_record` limited to ``cfg.time_budget`` seconds (``too_slow`` beyond it)."""
    try:
        return within_budget(cfg.time_budget, clean_record, rec, cfg)
    except TooSlow:
        return Outcome(None, "too_slow", f"cleaning took longer than time_budget={cfg.time_budget:g} s")


def _clean_batch(batch: list[Any]) -> list[Outcome]:
    """Steps 1-7 for a batch; a kept record comes back as its output line, its first exchange's
    digest and its introductions (the main process needs no more), with only its id."""
    assert _CFG is not None
    out = [clean_within_budget(obj, _CFG) for obj in batch]
    for o in out:
        if o.record is not None:
            rec = o.record
            o.line, o.first, o.intro = dumps(rec), first_exchange_key(rec), introductions_of(rec)
            o.record = {"id": rec["id"]}
    return out


def first_exchange_key(rec: Record) -> bytes:
    """What two conversations with the same first exchange share (after cleaning, in dedup form):
    a 16-byte digest, so the main process remembers 16 bytes per conversation, not its text."""
    a, b = (dedup_text(t["value"]) for t in rec["conversations"][:2])
    return hashlib.blake2b(f"{len(a)}:{a}{b}".encode("utf-8", "surrogatepass"), digest_size=16).digest()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="JSONL (or a ShareGPT .json list)")
    add_output_arguments(parser, "cleaned JSONL")
    add_settings_arguments(parser, CleanSettings, "clean")


def clean_file(inp: str | Path, out: str | Path, cfg: CleanSettings,
               rejects: str | Path | None = None, stats: str | Path | None = None,
               also_read: Iterable[str | Path] = ()) -> StageWriter:
    """Run the stage; returns the finished writer (stats on disk). ``also_read``: further files
    the run reads (its ``--config``), which no output may replace."""
    renamer(tuple(cfg.rename))  # a malformed entry is a ConfigError before any work
    workers, outcomes = map_records(inp, _clean_batch, resolve_workers(cfg.workers), BATCH, initializer=_init, initargs=(cfg,))
    notes: Counter[str] = Counter()
    names: Counter[str] = Counter()
    makers: Counter[str] = Counter()
    seen_ids: set[str] = set()
    seen_first: set[bytes] = set()
    with StageWriter("clean", out, rejects, stats, inputs=[inp, *also_read]) as w:
        for where, obj, res in progress(outcomes, "clean"):
            w.count_in()
            if isinstance(obj, InvalidLine):
                w.reject(obj, obj.reason, f"{where}: {obj.error}")
                continue
            if res.record is None:
                w.reject(obj, res.reason, f"{where}: {res.detail}")
                continue
            rid = res.record["id"]
            if rid in seen_ids:
                w.reject(obj, "duplicate_id", f"{where}: id {rid!r} seen before")
                continue
            if cfg.drop_duplicate_first_exchange and res.first in seen_first:
                w.reject(obj, "duplicate_first_exchange", f"{where}: same first exchange as an earlier kept conversation")
                continue
            seen_ids.add(rid)
            seen_first.add(res.first)
            notes.update(res.notes)
            names.update(res.intro[0])
            makers.update(res.intro[1])
            w.keep_line(res.line)
        w.extra["repaired"] = dict(sorted(notes.items()))
        w.extra["workers"] = workers
        w.extra["introductions"] = {"names": dict(names.most_common(20)), "makers": dict(makers.most_common(20))}
    warn_about_names(names, makers)
    return w


def introductions_of(rec: Record) -> tuple[frozenset[str], frozenset[str]]:
    """The assistant names and makers the record's gpt turns introduce."""
    found: tuple[set[str], set[str]] = (set(), set())
    for turn in rec["conversations"]:
        if turn["from"] == "gpt":
            n, m = introductions(turn["value"])
            found[0].update(n)
            found[1].update(m)
    return frozenset(found[0]), frozenset(found[1])


def warn_about_names(names: Counter[str], makers: Counter[str]) -> None:
    """Say so when the kept replies introduce the assistant by more than one name (the makers they
    name are listed with it; found by looser patterns, they are not a warning on their own)."""
    if len(names) > 1:
        listed = ", ".join(f"{k!r} ({v})" for k, v in names.most_common(8))
        by = ", ".join(f"{k!r} ({v})" for k, v in makers.most_common(8)) or "none found"
        log.warning("clean: the replies give the assistant %d names: %s conversations (makers: %s). A model trained "
                    "on them learns a blend and may name none; clean.rename maps them onto one (docs/data.md)",
                    len(names), listed, by)


def run(args: argparse.Namespace) -> int:
    cfg = settings_from_args(args, CleanSettings, "clean")
    log_settings("clean", cfg, input=args.input, output=args.output)
    w = clean_file(args.input, args.output, cfg, args.rejects, args.stats, also_read=[args.config] if args.config else [])
    print(w.summary())
    return 0
