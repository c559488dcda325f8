"""Helpers shared by the data stages: record checks, worker pools, progress bars, stage logging."""

from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

from llama_pipe.core.settings import describe

T = TypeVar("T")
R = TypeVar("R")

ROLES = ("human", "gpt")

log = logging.getLogger("llama_pipe.data")


def conversation_problem(rec: Any) -> str | None:
    """Why ``rec`` is not a well-formed llama-pipe record (``None`` when it is).

    Well-formed: an object with a string ``id``, a ``system`` that is a string when present (and
    not null), and a non-empty list ``conversations`` of objects with string ``from`` in human/gpt
    and string ``value``. Order and alternation are not checked here.
    """
    if not isinstance(rec, dict):
        return f"record is a {type(rec).__name__}, expected an object"
    if not isinstance(rec.get("id"), str) or not rec["id"]:
        return "missing or non-string 'id'"
    if rec.get("system") is not None and not isinstance(rec["system"], str):
        return f"'system' is {type(rec['system']).__name__}, expected a string"
    conv = rec.get("conversations")
    if not isinstance(conv, list):
        return "missing 'conversations' list"
    if not conv:
        return "'conversations' is empty"
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            return f"turn {i} is not an object"
        if turn.get("from") not in ROLES:
            return f"turn {i}: role {turn.get('from')!r} is not human/gpt"
        if not isinstance(turn.get("value"), str):
            return f"turn {i}: 'value' is not a string"
    return None


def alternates(conv: list[dict[str, Any]]) -> bool:
    """True when turns go human, gpt, human, gpt, ... from the first one."""
    return all(t["from"] == ROLES[i % 2] for i, t in enumerate(conv))


def add_output_arguments(parser: Any, output_help: str) -> None:
    """``-o OUT`` plus the ``--rejects`` / ``--stats`` overrides every data stage takes."""
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help=output_help)
    parser.add_argument("--rejects", metavar="FILE", help="rejects JSONL (default: OUT with .rejects.jsonl)")
    parser.add_argument("--stats", metavar="FILE", help="stats JSON (default: OUT with .stats.json)")


def resolve_workers(workers: int) -> int:
    """``0`` means every core this process may use."""
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def stream_map(
    func: Callable[[list[T]], R],
    batches: Iterable[list[T]],
    workers: int,
    batch: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> tuple[int, Iterator[R]]:
    """``(workers used, map(func, batches))`` in input order, holding at most a few batches per
    worker at a time (the input is read as the results are taken, so memory does not grow with
    it). As many workers as there are full batches of ``batch`` items among the first
    ``workers`` batches, at most ``workers`` (in-process when 1)."""
    it = iter(batches)
    head: list[list[T]] = []
    for b in it:
        head.append(b)
        if len(head) >= workers:
            break
    used = min(workers, max(1, sum(len(b) >= batch for b in head)))
    return used, _stream_map(func, head, it, used, initializer, initargs)


def _stream_map(func: Callable[[list[T]], R], head: list[list[T]], rest: Iterator[list[T]], workers: int,
                initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> Iterator[R]:
    items = itertools.chain(head, rest)
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(func, items)
        return
    ctx = get_context("fork") if hasattr(os, "fork") else get_context()
    with ctx.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        pending: deque[Any] = deque()
        for b in items:
            pending.append(pool.apply_async(func, (b,)))
            if len(pending) >= 3 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def map_records(inp: str | Path, func: Callable[[list[Any]], list[R]], workers: int, batch: int,
                initializer: Callable[..., None] | None = None, initargs: tuple[Any, ...] = ()
                ) -> tuple[int, Iterator[tuple[str, Any, R]]]:
    """``(workers used, (where, obj, func's result for obj) for each record of inp)``, streamed:
    ``func`` takes a batch of records (None for an :class:`~llama_pipe.core.records.InvalidLine`)
    on up to ``workers`` processes (:func:`stream_map`), and only the batches in flight are held."""
    from llama_pipe.core.record_stream import stream_records
    from llama_pipe.core.records import InvalidLine

    held: deque[list[tuple[str, Any]]] = deque()

    def objs() -> Iterator[list[Any]]:
        for items in batched(stream_records(inp), batch):
            held.append(items)
            yield [None if isinstance(obj, InvalidLine) else obj for _, obj in items]

    used, results = stream_map(func, objs(), workers, batch, initializer, initargs)

    def joined() -> Iterator[tuple[str, Any, R]]:
        for res in results:
            for (where, obj), r in zip(held.popleft(), res):
                yield where, obj, r

    return used, joined()


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "rec") -> Iterator[T]:
    """A tqdm bar on a terminal, nothing in a log file (``disable=None``)."""
    from tqdm import tqdm

    yield from tqdm(iterable, desc=desc, total=total, unit=unit, disable=None, dynamic_ncols=True)


def log_settings(stage: str, settings: Any, **paths: Any) -> None:
    """The resolved settings and paths at the start of a stage."""
    for key, value in paths.items():
        log.info("%s: %s = %s", stage, key, value)
    log.info("%s: settings\n%s", stage, describe(settings))


def dedup_text(text: str) -> str:
    """The form in which two cleaned turns count as the same text: whitespace runs collapsed to one
    space, ends stripped. clean's duplicate check, shard's key and gather's validation key all
    compare turns in this form, so twins that clean would call duplicates meet in one shard and
    land on one side of the train/validation split."""
    return " ".join(text.split())


def first_human(rec: Any) -> str | None:
    """The value of a record's first human turn (clean drops a leading gpt turn), if any."""
    conv = rec.get("conversations") if isinstance(rec, dict) else None
    if isinstance(conv, list):
        for turn in conv:
            if isinstance(turn, dict) and turn.get("from") == "human" and isinstance(turn.get("value"), str):
                return str(turn["value"])
    return None


def record_id(rec: Any) -> str | None:
    """The record's id when it is a usable string."""
    if isinstance(rec, dict) and isinstance(rec.get("id"), str) and rec["id"]:
        return rec["id"]
    return None
