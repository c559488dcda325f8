#!/usr/bin/env python3
"""A stand-in ``llama-pipe`` for workflow tests: writes each stage's outputs, runs no model.

It follows the stage contracts in the README (which flag or positional is the output) and
writes small files whose content is derived from the full command line, so a job's output
changes exactly when its command does. Every call is appended to ``$FAKE_LLAMA_PIPE_CALLS``
(one JSON object per line: argv, and the thread variables the job got) when that variable is
set. Like the real stages it takes options first and positional paths after ``--``: a positional
before it is an error, as is an option value glued with ``=`` to a missing name.

With ``$FAKE_TRAIN_PIDFILE`` set, ``train`` writes a partial output, its pid to that file and
then waits to be killed (the stale-product test kills it with SIGKILL).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from llama_pipe.stages import BY_NAME


def flag(argv: list[str], name: str) -> str:
    """The value of option ``name`` (``name value`` or ``name=value``), options before ``--`` only."""
    options = argv[: argv.index("--")] if "--" in argv else argv
    for i, arg in enumerate(options):
        if arg == name:
            return options[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
    raise SystemExit(f"fake llama-pipe: missing option {name} in {argv}")


def positionals(argv: list[str]) -> list[str]:
    """The paths after ``--`` (the workflow always passes them there)."""
    if "--" not in argv:
        raise SystemExit(f"fake llama-pipe: no '--' before the positional paths in {argv}")
    return argv[argv.index("--") + 1 :]


def write(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def layout(stage: str) -> str | None:
    """The stage's command line and outputs as the registry describes them (:data:`llama_pipe.stages.LAYOUTS`)."""
    s = BY_NAME.get(stage)
    return s.layout if s is not None else None


def stage_files(out: str, text: str) -> None:
    """A data stage's record file plus its stats and rejects beside it."""
    stem = out[: -len(".jsonl")]
    write(out, text)
    write(stem + ".stats.json", json.dumps({"in": 1, "out": 1, "rejected": {}}))
    write(stem + ".rejects.jsonl", "")


def main(argv: list[str]) -> int:
    calls = os.environ.get("FAKE_LLAMA_PIPE_CALLS")
    if calls:
        threads = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "RAYON_NUM_THREADS")}
        with open(calls, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"argv": argv, "env": threads}) + "\n")
    stage, rest = argv[0], argv[1:]
    text = json.dumps(argv) + "\n"
    if stage in ("make-base", "download"):
        write(Path(positionals(rest)[0]) / "params.json", text)
    elif layout(stage) == "records":
        positionals(rest)
        stage_files(flag(rest, "-o"), text)
    elif layout(stage) == "shards":
        positionals(rest)
        out = Path(flag(rest, "-o"))
        for i in range(int(flag(rest, "--n"))):
            write(out / f"shard-{i:03d}.jsonl", text)
        write(out / f"{stage}.stats.json", json.dumps({"in": 1, "out": 1, "rejected": {}}))
        write(out / f"{stage}.rejects.jsonl", "")
    elif layout(stage) == "sets":
        positionals(rest)
        train = Path(flag(rest, "--train"))
        write(flag(rest, "--val"), text)
        write(train.with_name(f"{stage}.stats.json"), json.dumps({"in": 1, "out": 1, "rejected": {}}))
        write(train.with_name(f"{stage}.rejects.jsonl"), "")
        write(train, text)
    elif stage == "train" and os.environ.get("FAKE_TRAIN_PIDFILE"):
        write(Path(flag(rest, "-o")) / "metrics.jsonl", text)  # half-written
        write(os.environ["FAKE_TRAIN_PIDFILE"], str(os.getpid()))
        while True:
            time.sleep(1)
    elif stage in ("convert", "train", "select", "merge-adapter", "eval"):
        if stage in ("convert", "select"):
            positionals(rest)
        out = Path(flag(rest, "-o"))
        write(out / "metrics.json", text)
        write(out / "metrics.jsonl", text)
        if stage == "select":
            write(out / "selection.json", text)
    elif stage == "report":
        write(Path(flag(rest, "-o")) / "loss_curve.png", text)
    else:
        print(f"fake llama-pipe: unknown stage {stage!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
