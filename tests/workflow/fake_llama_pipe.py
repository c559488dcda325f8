#!/usr/bin/env python3
"""A stand-in ``llama-pipe`` for workflow tests: writes each stage's outputs, runs no model.

It follows the stage contracts in the README (which flag or positional is the output) and
writes small files whose content is derived from the full command line, so a job's output
changes exactly when its command does. Every call is appended to ``$FAKE_LLAMA_PIPE_CALLS``
(one JSON argv per line) when that variable is set.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def write(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def stage_files(out: str, text: str) -> None:
    """A data stage's record file plus its stats and rejects beside it."""
    stem = out[: -len(".jsonl")]
    write(out, text)
    write(stem + ".stats.json", json.dumps({"in": 1, "out": 1, "rejected": {}}))
    write(stem + ".rejects.jsonl", "")


def main(argv: list[str]) -> int:
    calls = os.environ.get("FAKE_LLAMA_PIPE_CALLS")
    if calls:
        with open(calls, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(argv) + "\n")
    stage, rest = argv[0], argv[1:]
    text = json.dumps(argv) + "\n"
    if stage in ("make-base", "download"):
        positional = [a for a in rest if not a.startswith("-")]
        write(Path(positional[0]) / "params.json", text)
    elif stage in ("merge", "clean", "filter-lang", "split"):
        stage_files(flag(rest, "-o"), text)
    elif stage == "shard":
        out = Path(flag(rest, "-o"))
        for i in range(int(flag(rest, "--n"))):
            write(out / f"shard-{i:03d}.jsonl", text)
        write(out / "shard.stats.json", json.dumps({"in": 1, "out": 1, "rejected": {}}))
        write(out / "shard.rejects.jsonl", "")
    elif stage == "gather":
        train = Path(flag(rest, "--train"))
        write(flag(rest, "--val"), text)
        write(train.with_name("gather.stats.json"), json.dumps({"in": 1, "out": 1, "rejected": {}}))
        write(train.with_name("gather.rejects.jsonl"), "")
        write(train, text)
    elif stage in ("convert", "train", "merge-adapter", "eval"):
        out = Path(flag(rest, "-o"))
        write(out / "metrics.json", text)
        write(out / "metrics.jsonl", text)
    elif stage == "report":
        write(Path(flag(rest, "-o")) / "loss_curve.png", text)
    else:
        print(f"fake llama-pipe: unknown stage {stage!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
