"""``llama-pipe shard``: scatter a JSONL into N shards (:mod:`llama_pipe.data.gather` joins them again).

``shard IN --n N -o DIR`` writes ``DIR/shard-000.jsonl`` ... ``DIR/shard-(N-1).jsonl``: a record
goes to shard ``blake2b(key) mod N`` where the key is its first human turn *as clean will leave it*
(HTML converted to markdown by the same code, whitespace collapsed:
:func:`~llama_pipe.data.common.dedup_text`; the raw text when the conversion fails or takes longer
than clean's default ``time_budget``, since clean then rejects the record; the id when it has no
human turn). So conversations that ``clean`` would drop as duplicate first exchanges always meet in
the same shard, also twins that differ only in their HTML (merge already removed duplicate ids
across the whole input), the assignment depends on the record alone (adding records never moves
others), and it is the same on every machine and Python version. ``DIR/shard.stats.json``
and ``DIR/shard.rejects.jsonl`` account for every input record; the directory appears atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections import Counter
from pathlib import Path
from typing import Any

from llama_pipe.config import CleanSettings, DataSettings
from llama_pipe.core.atomic import atomic_dir, write_json_atomic
from llama_pipe.core.budget import TooSlow, within_budget
from llama_pipe.core.errors import InputError, OutputError
from llama_pipe.core.records import InvalidLine, dumps, read_records
from llama_pipe.data.clean import GROWTH_SLACK
from llama_pipe.data.common import dedup_text, first_human, log_settings, progress, record_id
from llama_pipe.data.markdown import ConversionError, to_markdown


def cleaned_text(value: str, cfg: CleanSettings | None = None) -> str:
    """``value`` as clean converts it (markdown, for dedup: whitespace collapsed); ``value`` itself
    when the conversion fails or runs past ``time_budget`` (clean rejects such a record anyway)."""
    cfg = cfg or _CLEAN
    try:
        md = within_budget(cfg.time_budget, to_markdown, value, int(cfg.max_growth * len(value)) + GROWTH_SLACK)
    except (ConversionError, TooSlow):
        md = value
    return dedup_text(md)


_CLEAN = CleanSettings()


def shard_key(rec: dict[str, Any]) -> str:
    """What a record is sharded by: its first human turn as clean will leave it (else its id)."""
    value = first_human(rec)
    if value is not None:
        return "h:" + cleaned_text(value)
    return "i:" + str(rec.get("id"))


def shard_of(key: str, n: int) -> int:
    """Shard index of a key: stable across runs, machines and Python versions."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") % n


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
        # Refused before anything is written: a DIR that holds IN, or files shard did not write.
        # Also removes the DIR.tmp-<pid>-* of killed runs.
        with atomic_dir(out_dir, stage="shard", inputs=[inp]) as tmp:
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
    stats: dict[str, Any] = {"stage": "shard", "unit": "records", "in": len(items), "out": sum(counts),
                             "rejected": dict(sorted(rejected.items())), "shards": counts}
    if stats["in"] != stats["out"] + sum(rejected.values()):  # pragma: no cover - a bug guard
        raise RuntimeError("shard: accounting error; nothing written")
    write_json_atomic(tmp / "shard.stats.json", stats)
    return stats


def run(args: argparse.Namespace) -> int:
    log_settings("shard", DataSettings(), input=args.input, n=args.n, output=args.output)
    s = shard_file(args.input, args.n, args.output)
    print(f"shard: records in={s['in']} out={s['out']} rejected={sum(s['rejected'].values())} "
          f"shards={s['shards']} -> {args.output}")
    return 0
