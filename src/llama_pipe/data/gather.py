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
"""

from __future__ import annotations

import argparse
import hashlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llama_pipe.config import DataSettings, settings_from_args
from llama_pipe.core.errors import InputError
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
    n_train = n_val = 0
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
            else:
                w.keep(obj)
                n_train += 1
        w.extra.update(train=n_train, val=n_val, val_path=str(val), val_fraction=settings.val_fraction,
                       seed=settings.seed, conversations_val=len(to_val),
                       conversations_train=len(score_of) - len(to_val))
    return w


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, DataSettings, "data")
    log_settings("gather", settings, inputs=args.inputs, train=args.train, val=args.val)
    w = gather_files(args.inputs, args.train, args.val, settings, args.rejects, args.stats,
                     also_read=[args.config] if args.config else [])
    print(f"gather: records in={w.n_in} train={w.extra['train']} val={w.extra['val']} "
          f"rejected={sum(w.rejected.values())} -> {args.train}, {args.val}")
    return 0
