"""``llama-pipe gather``: the shards joined into train and validation JSONL.

``gather IN [IN ...] --train T --val V`` concatenates the inputs in the order given and sends a
record to validation when ``blake2b(seed, key) / 2**64 < val_fraction``. The key belongs to the
conversation (the base id: the id with split's ``_k`` chunk suffix removed) and is its first human
turn in the form clean deduplicates by (:func:`~llama_pipe.data.common.dedup_text`; the first
chunk's, i.e. the first record seen with that base id; the base id when it has none). So every
chunk of one conversation lands on the same side (no conversation leaks from train into
validation), and so does every conversation that starts with the same question: near-duplicates
that survived clean (``drop_duplicate_first_exchange: false``, or one question with two answers)
cannot sit on both sides and flatter the validation loss. When ``val_fraction > 0`` and the hash
leaves validation empty while there are at least two keys, the key with the smallest hash goes to
validation, so a tiny data set still gets a validation set.

``data.weights`` (one number per ``data.inputs`` entry) weighs the training side by the file each
record came from (merge's ``source``): a conversation of weight ``w`` goes into the training file
``floor(w)`` times, plus once more when its seeded draw falls under ``w``'s fraction (all chunks of
a conversation draw alike). The first copy keeps its place; copy ``k`` (id ``<id>#w<k>``) is
written in a ``k``-th pass after all of the first, so copies of one conversation are not packed
into one training row. A conversation drawn 0 times is listed in the rejects as ``weight``.
Validation is never weighted.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llama_pipe.config import DataSettings, settings_from_args
from llama_pipe.config.checks import data_errors
from llama_pipe.core.errors import ConfigError, InputError
from llama_pipe.core.record_stream import stream_records
from llama_pipe.core.records import InvalidLine, dumps
from llama_pipe.core.settings import add_settings_arguments
from llama_pipe.core.stage_writer import StageWriter
from llama_pipe.data.common import conversation_problem, dedup_text, first_human, log_settings, progress, record_id

_CHUNK_SUFFIX = re.compile(r"_\d+$")


def base_id(rid: str) -> str:
    """The conversation id of a split chunk: ``abc_3`` -> ``abc`` (one ``_k`` suffix removed)."""
    return _CHUNK_SUFFIX.sub("", rid)


def val_score(seed: int, key: str) -> float:
    """A uniform number in [0, 1) from (seed, key); below ``val_fraction`` means validation."""
    h = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def split_key(rec: dict[str, Any]) -> str:
    """What decides a conversation's side: its first human turn in dedup form (else its base id)."""
    value = first_human(rec)
    return "h:" + dedup_text(value) if value is not None else "i:" + base_id(rec["id"])


class Weights:
    """How many training copies a record gets, from ``data.weights`` and its ``source``."""

    def __init__(self, settings: DataSettings) -> None:
        errors = data_errors(settings)
        if errors:
            raise ConfigError("\n  ".join(errors))
        self.seed = settings.seed
        self.of = {os.path.normpath(p): w for p, w in zip(settings.inputs, settings.weights, strict=False)}
        self.active = any(w != 1 for w in self.of.values())  # asked once per record: computed once

    def __bool__(self) -> bool:
        return self.active

    def weight(self, rec: dict[str, Any]) -> float:
        src = rec.get("source")
        if not isinstance(src, str):
            raise InputError(f"record {rec['id']!r} has no 'source' (made by an older merge): run merge again to use "
                             "data.weights")
        w = self.of.get(os.path.normpath(src))
        if w is None:
            raise InputError(f"record {rec['id']!r} comes from {src!r}, which is not in data.inputs "
                             f"({', '.join(self.of)}): data.weights cannot weigh it")
        return w

    def copies(self, rec: dict[str, Any]) -> int:
        """``floor(w)``, plus one when the conversation's seeded draw is under ``w``'s fraction."""
        if not self:
            return 1
        w = self.weight(rec)
        whole = math.floor(w)
        return whole + (val_score(self.seed, "w:" + base_id(rec["id"])) < w - whole)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IN", help="JSONL shards (concatenated in this order)")
    parser.add_argument("--train", required=True, metavar="FILE", help="training JSONL")
    parser.add_argument("--val", required=True, metavar="FILE", help="validation JSONL")
    parser.add_argument("--rejects", metavar="FILE", help="rejects JSONL (default: TRAIN's dir/gather.rejects.jsonl)")
    parser.add_argument("--stats", metavar="FILE", help="stats JSON (default: TRAIN's dir/gather.stats.json)")
    add_settings_arguments(parser, DataSettings, "data")


def gather_files(inputs: list[str | Path], train: str | Path, val: str | Path, settings: DataSettings,
                 rejects: str | Path | None = None, stats: str | Path | None = None,
                 also_read: Iterable[str | Path] = ()) -> StageWriter:
    """Run the stage; returns the finished writer (stats on disk). ``also_read``: further files
    the run reads (its ``--config``), which no output may replace."""
    train, val = Path(train), Path(val)
    # Pass 1 (a first read of the inputs): which conversations go to validation. Each base id gets
    # the score of its first record's key; one key, one score, so one side for all its conversations.
    score_of: dict[str, float] = {}
    for p in inputs:
        for _, obj in stream_records(p):
            rid = record_id(obj)
            if rid is not None and base_id(rid) not in score_of and not conversation_problem(obj):
                score_of[base_id(rid)] = val_score(settings.seed, split_key(obj))
    scores = set(score_of.values())
    val_scores = {u for u in scores if u < settings.val_fraction}
    if settings.val_fraction > 0 and not val_scores and len(scores) >= 2:
        val_scores = {min(scores)}
    to_val = {b for b, u in score_of.items() if u in val_scores}
    # Pass 2: write. The validation file is one more output of the writer: train, val, rejects and
    # stats are renamed into place together, or (on any failure) none of them.
    if val.resolve() == train.resolve():
        raise InputError(f"{val}: --train and --val must be different files")
    weights = Weights(settings)
    n_train = n_val = 0
    repeat: dict[str, int] = {}  # id -> copies, for the records written more than once
    by_input: dict[str, int] = {}  # training lines per source
    with StageWriter("gather", train, rejects or train.with_name("gather.rejects.jsonl"),
                     stats or train.with_name("gather.stats.json"), inputs=[*inputs, *also_read], out_flag="--train") as w:
        vf = w.add_output(val, "--val")
        seen: set[str] = set()
        items = ((where, obj) for p in inputs for where, obj in stream_records(p))
        for where, obj in progress(items, "gather"):
            w.count_in()
            if isinstance(obj, InvalidLine):
                w.reject(obj, obj.reason, f"{where}: {obj.error}")
                continue
            problem = conversation_problem(obj)
            if problem:
                w.reject(obj, "malformed_record", f"{where}: {problem}")
                continue
            rid = obj["id"]
            if rid in seen:
                w.reject(obj, "duplicate_id", f"{where}: id {rid!r} seen before")
                continue
            seen.add(rid)
            if base_id(rid) in to_val:
                vf.write(dumps(obj) + "\n")
                w.n_out += 1
                w.lines_out += 1
                n_val += 1
                continue
            n = weights.copies(obj)
            if n == 0:
                w.reject(obj, "weight", f"{where}: data.weights gives {obj.get('source')} {weights.weight(obj)}; "
                         "this conversation was not drawn")
                continue
            w.keep(obj)
            n_train += 1
            if weights:
                by_input[obj["source"]] = by_input.get(obj["source"], 0) + n
            if n > 1:
                repeat[rid] = n
        # Copy k of every record that has one, in a k-th pass over the inputs (see the module docstring).
        for k in range(2, max(repeat.values(), default=1) + 1):
            done: set[str] = set()
            for p in inputs:
                for _, obj in stream_records(p):
                    rid = record_id(obj) if not isinstance(obj, InvalidLine) else None
                    if rid is not None and repeat.get(rid, 0) >= k and rid not in done:
                        done.add(rid)
                        w.keep({**obj, "id": f"{rid}#w{k}"}, counts=False)
        w.extra.update(train=n_train, val=n_val, val_path=str(val), val_fraction=settings.val_fraction,
                       seed=settings.seed, conversations_val=len(to_val),
                       conversations_train=len(score_of) - len(to_val))
        if weights:
            w.extra.update(weighted_copies=sum(n - 1 for n in repeat.values()), train_lines_by_input=by_input)
    return w


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, DataSettings, "data")
    log_settings("gather", settings, inputs=args.inputs, train=args.train, val=args.val)
    w = gather_files(args.inputs, args.train, args.val, settings, args.rejects, args.stats,
                     also_read=[args.config] if args.config else [])
    copies = f" (+{w.extra['weighted_copies']} weighted copies)" if "weighted_copies" in w.extra else ""
    print(f"gather: records in={w.n_in} train={w.extra['train']}{copies} val={w.extra['val']} "
          f"rejected={sum(w.rejected.values())} -> {args.train}, {args.val}")
    return 0
