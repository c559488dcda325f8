"""``llama-pipe shard`` (scatter) and ``llama-pipe gather`` (train/validation assignment).

``shard IN --n N -o DIR`` writes ``DIR/shard-000.jsonl`` ... ``DIR/shard-(N-1).jsonl``: a record
goes to shard ``blake2b(key) mod N`` where the key is its first human turn (stripped; the id when it
has none). So conversations that ``clean`` would drop as duplicate first exchanges always meet in
the same shard (merge already removed duplicate ids across the whole input), the assignment
depends on the record alone (adding records never moves others), and it is the same on every
machine and Python version. ``DIR/shard.stats.json``
and ``DIR/shard.rejects.jsonl`` account for every input record; the directory appears atomically.

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
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from llama_pipe.atomic import atomic_dir, write_json_atomic
from llama_pipe.config import DataSettings, settings_from_args
from llama_pipe.data.common import conversation_problem, log_settings, progress, record_id
from llama_pipe.errors import InputError, OutputError
from llama_pipe.records import InvalidLine, dumps, read_records
from llama_pipe.settings import add_settings_arguments
from llama_pipe.stage_writer import StageWriter

_CHUNK_SUFFIX = re.compile(r"_\d+$")


def shard_key(rec: dict[str, Any]) -> str:
    """What a record is sharded by: its first human turn, stripped (else its id)."""
    conv = rec.get("conversations")
    if isinstance(conv, list):
        for turn in conv:
            if isinstance(turn, dict) and turn.get("from") == "human" and isinstance(turn.get("value"), str):
                return "h:" + turn["value"].strip()
    return "i:" + str(rec.get("id"))


def shard_of(key: str, n: int) -> int:
    """Shard index of a key: stable across runs, machines and Python versions."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") % n


def base_id(rid: str) -> str:
    """The conversation id of a split chunk: ``abc_3`` -> ``abc`` (one ``_k`` suffix removed)."""
    return _CHUNK_SUFFIX.sub("", rid)


def val_score(seed: int, rid: str) -> float:
    """A uniform number in [0, 1) from (seed, base id); below ``val_fraction`` means validation."""
    h = hashlib.blake2b(f"{seed}\x00{base_id(rid)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


# ----------------------------------------------------------------------------- shard


def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="JSONL written by merge")
    parser.add_argument("--n", type=int, required=True, metavar="N", help="number of shards (>= 1)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory (replaced atomically)")


def shard_file(inp: str | Path, n: int, out_dir: str | Path) -> dict[str, Any]:
    """Write the shards; returns the stats (also written to ``DIR/shard.stats.json``)."""
    if n < 1:
        raise InputError(f"--n must be at least 1, got {n}")
    out_dir = Path(out_dir)
    items = list(read_records(inp))  # a malformed file fails here, before anything is written
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory; shard writes a directory of shards")
    created = False  # whether the temporary directory exists: a failure to make it says so
    try:
        with atomic_dir(out_dir) as tmp:  # also removes the DIR.tmp-<pid>-* of killed runs
            created = True
            stats = _write_shards(tmp, items, n)
    except OSError as exc:
        if not created:
            raise OutputError(f"{out_dir}: cannot create the shard directory: {exc.strerror or exc}") from None
        raise OutputError(f"{out_dir}: cannot write the shards: {exc.strerror or exc}; nothing was written "
                          "(an older directory, if any, is unchanged)") from None
    return stats


def _write_shards(tmp: Path, items: list[tuple[str, Any]], n: int) -> dict[str, Any]:
    """Write the shards, their rejects and stats into the temporary directory ``tmp``."""
    files = [open(tmp / f"shard-{i:03d}.jsonl", "w", encoding="utf-8", newline="\n") for i in range(n)]
    counts = [0] * n
    rejected: Counter[str] = Counter()
    seen: set[str] = set()
    with open(tmp / "shard.rejects.jsonl", "w", encoding="utf-8", newline="\n") as rej:
        for where, obj in progress(items, "shard"):
            rid = record_id(obj)
            reason = detail = ""
            if isinstance(obj, InvalidLine):
                reason, detail = obj.reason, obj.error
            elif rid is None:
                reason, detail = "missing_id", "record has no string id"
            elif rid in seen:
                reason, detail = "duplicate_id", f"id {rid!r} seen before"
            if reason:
                rejected[reason] += 1
                row = {"id": rid, "stage": "shard", "reason": reason, "detail": f"{where}: {detail}",
                       "record": obj.text if isinstance(obj, InvalidLine) else obj}
                try:
                    line = dumps(row)
                except (RecursionError, ValueError):  # defensive: read_records screens depth
                    line = dumps({**row, "record": str(row["record"])[:1000]})
                rej.write(line + "\n")
                continue
            assert rid is not None
            seen.add(rid)
            k = shard_of(shard_key(obj), n)
            files[k].write(dumps(obj) + "\n")
            counts[k] += 1
        rej.flush()
        os.fsync(rej.fileno())
    for f in files:  # on disk before the directory is renamed into place
        f.flush()
        os.fsync(f.fileno())
        f.close()
    stats = {"stage": "shard", "unit": "records", "in": len(items), "out": sum(counts),
             "rejected": dict(sorted(rejected.items())), "shards": counts}
    if stats["in"] != stats["out"] + sum(rejected.values()):  # pragma: no cover - a bug guard
        raise RuntimeError("shard: accounting error; nothing written")
    write_json_atomic(tmp / "shard.stats.json", stats)
    return stats


def run_shard(args: argparse.Namespace) -> int:
    log_settings("shard", DataSettings(), input=args.input, n=args.n, output=args.output)
    s = shard_file(args.input, args.n, args.output)
    print(f"shard: records in={s['in']} out={s['out']} rejected={sum(s['rejected'].values())} "
          f"shards={s['shards']} -> {args.output}")
    return 0


# ----------------------------------------------------------------------------- gather


def add_gather_arguments(parser: argparse.ArgumentParser) -> None:
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


def run_gather(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, DataSettings, "data")
    log_settings("gather", settings, inputs=args.inputs, train=args.train, val=args.val)
    w = gather_files(args.inputs, args.train, args.val, settings, args.rejects, args.stats)
    print(f"gather: records in={w.n_in} train={w.extra['train']} val={w.extra['val']} "
          f"rejected={sum(w.rejected.values())} -> {args.train}, {args.val}")
    return 0
