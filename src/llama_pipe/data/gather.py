"""``llama-pipe gather``: the shards joined into train and validation JSONL.

``gather IN [IN ...] --train T --val V`` concatenates the inputs in the order given and sends a
record to validation when ``blake2b(seed, base id) / 2**64 < val_fraction``. The base id is the id
with split's ``_k`` chunk suffix removed, so every chunk of one conversation lands on the same side
(no conversation leaks from train into validation). When ``val_fraction > 0`` and the hash leaves
validation empty while there are at least two conversations, the conversation with the smallest
hash goes to validation, so a tiny data set still gets a validation set.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

from llama_pipe.config import DataSettings, settings_from_args
from llama_pipe.data.common import conversation_problem, log_settings, progress, record_id
from llama_pipe.errors import InputError
from llama_pipe.records import InvalidLine, dumps, read_records
from llama_pipe.settings import add_settings_arguments
from llama_pipe.stage_writer import StageWriter

_CHUNK_SUFFIX = re.compile(r"_\d+$")


def base_id(rid: str) -> str:
    """The conversation id of a split chunk: ``abc_3`` -> ``abc`` (one ``_k`` suffix removed)."""
    return _CHUNK_SUFFIX.sub("", rid)


def val_score(seed: int, rid: str) -> float:
    """A uniform number in [0, 1) from (seed, base id); below ``val_fraction`` means validation."""
    h = hashlib.blake2b(f"{seed}\x00{base_id(rid)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IN", help="JSONL shards (concatenated in this order)")
    parser.add_argument("--train", required=True, metavar="FILE", help="training JSONL")
    parser.add_argument("--val", required=True, metavar="FILE", help="validation JSONL")
    parser.add_argument("--rejects", metavar="FILE", help="rejects JSONL (default: TRAIN's dir/gather.rejects.jsonl)")
    parser.add_argument("--stats", metavar="FILE", help="stats JSON (default: TRAIN's dir/gather.stats.json)")
    add_settings_arguments(parser, DataSettings, "data")


def gather_files(inputs: list[str | Path], train: str | Path, val: str | Path, settings: DataSettings,
                 rejects: str | Path | None = None, stats: str | Path | None = None) -> StageWriter:
    """Run the stage; returns the finished writer (stats on disk)."""
    train, val = Path(train), Path(val)
    items = [item for p in inputs for item in read_records(p)]
    # Pass 1: which conversations go to validation.
    scores: dict[str, float] = {}
    for _, obj in items:
        rid = record_id(obj)
        if rid is not None:
            scores.setdefault(base_id(rid), val_score(settings.seed, rid))
    to_val = {b for b, u in scores.items() if u < settings.val_fraction}
    if settings.val_fraction > 0 and not to_val and len(scores) >= 2:
        to_val = {min(scores, key=lambda b: (scores[b], b))}
    # Pass 2: write. The validation file is one more output of the writer: train, val, rejects and
    # stats are renamed into place together, or (on any failure) none of them.
    if val.resolve() == train.resolve():
        raise InputError(f"{val}: --train and --val must be different files")
    n_train = n_val = 0
    with StageWriter("gather", train, rejects or train.with_name("gather.rejects.jsonl"),
                     stats or train.with_name("gather.stats.json")) as w:
        vf = w.add_output(val)
        seen: set[str] = set()
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
                       conversations_train=len(scores) - len(to_val))
    return w


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, DataSettings, "data")
    log_settings("gather", settings, inputs=args.inputs, train=args.train, val=args.val)
    w = gather_files(args.inputs, args.train, args.val, settings, args.rejects, args.stats)
    print(f"gather: records in={w.n_in} train={w.extra['train']} val={w.extra['val']} "
          f"rejected={sum(w.rejected.values())} -> {args.train}, {args.val}")
    return 0
