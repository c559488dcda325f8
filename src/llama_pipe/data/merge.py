"""``llama-pipe merge``: validate and normalise ShareGPT / OpenAI-messages / Alpaca files into one JSONL.

Each input record becomes ``{"id", "source", ["system",] "conversations": [{"from": "human"|"gpt", "value"}]}``
(``source``: the input file as it was given, which ``gather`` weighs by ``data.weights``):

* ShareGPT ``{"id", "conversations": [{"from", "value"}]}``; roles human/user -> ``human``,
  gpt/assistant/chatgpt/bing/bard -> ``gpt`` (case-insensitive); leading ``system`` turns become
  the record's ``system``.
* OpenAI ``{"messages": [{"role", "content"}]}``; ``content`` may be a string or a list of
  ``{"type": "text", "text"}`` parts.
* Alpaca ``{"instruction", "input", "output"}`` -> one human turn (instruction, a blank line and
  the input when there is one) and one gpt turn.

A record without an id (missing, null or blank) gets ``auto-<16 hex digits of sha1 of its
content>`` (identical content, identical id, so exact copies are caught as duplicates); an integer
id becomes its decimal string; any other id type (a list, an object, a float, a boolean) is
rejected as ``bad_id``. Other keys of the input are not carried over; a ``system`` that is not a string
is rejected (``bad_record``).

Ids across files (:class:`IdResolver`): a record whose id was already used is a duplicate
(``duplicate_id``: the first is kept, or every copy with ``dedupe: reject_all``) when it is the
same conversation (same system and turns) or comes from the same file; a different conversation
from another file keeps its place as ``<file stem>:<id>`` (e.g. ``gitcloner_dummy_en:identity_0``),
so files that each number their records from ``identity_0`` merge without losing any. The stats
count these as ``renamed``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from llama_pipe.config import MergeSettings, settings_from_args
from llama_pipe.core.records import InvalidLine, Record, check_input_file, dumps
from llama_pipe.core.settings import add_settings_arguments
from llama_pipe.core.stage_writer import StageWriter
from llama_pipe.data.common import add_output_arguments, log_settings, map_records, progress, resolve_workers

HUMAN = {"human", "user"}
GPT = {"gpt", "assistant", "chatgpt", "bing", "bard"}


class RecordProblem(Exception):
    """A record that cannot be converted: ``reason`` is the rejects/stats key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # sent back from a worker process
        return RecordProblem, (self.reason, self.detail)


def _role(raw: Any, i: int) -> str:
    if not isinstance(raw, str):
        raise RecordProblem("bad_turn", f"turn {i}: role is {type(raw).__name__}, expected a string")
    r = raw.strip().lower()
    if r in HUMAN:
        return "human"
    if r in GPT:
        return "gpt"
    if r == "system":
        return "system"
    raise RecordProblem("unknown_role", f"turn {i}: role {raw!r} is none of human/user, gpt/assistant/chatgpt/bing/bard, system")


def _content(raw: Any, i: int) -> str:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):  # OpenAI content parts
        texts = []
        for part in raw:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RecordProblem("non_text_content", f"turn {i}: content part of type {kind!r} (only text is supported)")
        return "\n".join(texts)
    raise RecordProblem("bad_turn", f"turn {i}: value is {type(raw).__name__}, expected a string")


def _turns(items: Any, role_key: str, value_key: str) -> list[tuple[str, str]]:
    if not isinstance(items, list):
        raise RecordProblem("bad_record", f"'{'conversations' if role_key == 'from' else 'messages'}' is not a list")
    out = []
    for i, t in enumerate(items):
        if not isinstance(t, dict):
            raise RecordProblem("bad_turn", f"turn {i} is a {type(t).__name__}, expected an object")
        if role_key not in t or value_key not in t:
            raise RecordProblem("bad_turn", f"turn {i}: missing '{role_key}' or '{value_key}'")
        out.append((_role(t[role_key], i), _content(t[value_key], i)))
    return out


def normalise(obj: Any) -> Record:
    """One input record in any supported format -> a llama-pipe record (raises RecordProblem)."""
    if not isinstance(obj, dict):
        raise RecordProblem("not_an_object", f"record is a {type(obj).__name__}, expected an object")
    system: str | None = None
    if obj.get("system") is not None and not isinstance(obj["system"], str):
        raise RecordProblem("bad_record", f"'system' is {type(obj['system']).__name__}, expected a string")
    if "conversations" in obj:
        turns = _turns(obj["conversations"], "from", "value")
        if obj.get("system"):
            system = obj["system"]
    elif "messages" in obj:
        turns = _turns(obj["messages"], "role", "content")
    elif "instruction" in obj and "output" in obj:
        ins, inp, out = obj.get("instruction"), obj.get("input", ""), obj.get("output")
        if not isinstance(ins, str) or not isinstance(out, str) or not isinstance(inp, (str, type(None))):
            raise RecordProblem("bad_record", "alpaca record: instruction/input/output must be strings")
        human = f"{ins}\n\n{inp}" if inp and inp.strip() else ins
        turns = [("human", human), ("gpt", out)]
    else:
        keys = ", ".join(sorted(map(str, obj))[:6]) or "none"
        raise RecordProblem("unknown_format", f"no 'conversations', 'messages' or 'instruction'+'output' (keys: {keys})")
    lead = [v for r, v in _leading_system(turns)]
    turns = turns[len(lead):]
    if lead:
        system = "\n\n".join(s for s in ([system] if system else []) + lead if s)
    for i, (role, _) in enumerate(turns):
        if role == "system":
            raise RecordProblem("misplaced_system_turn", f"turn {i + len(lead)}: a system turn after the conversation started")
    if not turns:
        raise RecordProblem("no_turns", "no human/gpt turns")
    rid = obj.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    elif rid is not None and not isinstance(rid, str):
        raise RecordProblem("bad_id", f"id is {type(rid).__name__} {json.dumps(rid)[:40]}, expected a string or an integer")
    if rid is None or not rid.strip():
        digest = hashlib.sha1(json.dumps([system, turns], ensure_ascii=False).encode("utf-8")).hexdigest()
        rid = f"auto-{digest[:16]}"
    rec: Record = {"id": rid}
    if system:
        rec["system"] = system
    rec["conversations"] = [{"from": r, "value": v} for r, v in turns]
    return rec


def _leading_system(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    lead = []
    for t in turns:
        if t[0] != "system":
            break
        lead.append(t)
    return lead


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IN", help="ShareGPT/OpenAI/Alpaca .json (list) or .jsonl files, merged in this order")
    add_output_arguments(parser, "merged JSONL")
    add_settings_arguments(parser, MergeSettings, "merge")


class IdResolver:
    """Which id each record keeps, one record at a time, in input order. It remembers each kept id,
    the file it came from and a 20-byte digest of its content (system and turns), not the record.

    * the first record with an id keeps it;
    * a later one with the same system and turns is a duplicate, from whichever file;
    * a later one with different content from another file is a different conversation that
      happens to reuse the id (FastChat's and git-cloner's files both use ``identity_0``...): it is
      kept as ``<file stem>:<id>`` (``<file stem>-<file number>:<id>`` if that is taken too);
    * a later one with different content from the same file is a duplicate: a file's own ids must
      be unique, and its file name cannot tell the two apart.
    """

    def __init__(self, stems: list[str]) -> None:
        self.stems = stems
        self.owner: dict[str, tuple[int, bytes]] = {}

    def resolve(self, fi: int, rid: str, digest: bytes) -> tuple[str, str | None]:
        """``(final id, None)`` for a record of file ``fi`` with id ``rid`` and content digest
        ``digest`` that is kept, ``(id, why)`` for a duplicate."""
        owner, stems = self.owner, self.stems
        if rid not in owner:
            owner[rid] = (fi, digest)
            return rid, None
        ofi, odigest = owner[rid]
        if odigest == digest:
            return rid, "the same conversation was seen before"
        if ofi == fi:
            return rid, "seen before in the same file, with different content"
        for name in (f"{stems[fi]}:{rid}", f"{stems[fi]}-{fi + 1}:{rid}"):
            if name not in owner:
                owner[name] = (fi, digest)
                return name, None
            if owner[name][1] == digest:
                return name, "the same conversation was seen before"
        return rid, "seen before, and its file-namespaced ids are taken too"


def _digest(rec: Record) -> bytes:
    body = json.dumps([rec.get("system"), rec["conversations"]], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(body.encode("utf-8")).digest()


BATCH = 64  # records per worker task


def with_source(rec: Record, source: str) -> Record:
    """``rec`` with its input file recorded after the id (the output's key order)."""
    return {"id": rec["id"], "source": source, **{k: v for k, v in rec.items() if k != "id"}}


def _merge_batch(batch: list[Any], source: str) -> list[tuple[str, bytes, str] | RecordProblem | None]:
    """Each record normalised: its id, content digest and output line (``source`` added); its
    problem; or None (an unreadable line)."""
    out: list[tuple[str, bytes, str] | RecordProblem | None] = []
    for obj in batch:
        if obj is None:
            out.append(None)
            continue
        try:
            rec = normalise(obj)
        except RecordProblem as p:
            out.append(p)
            continue
        out.append((rec["id"], _digest(rec), dumps(with_source(rec, source))))
    return out


def merge_files(inputs: list[str | Path], out: str | Path, settings: MergeSettings,
                rejects: str | Path | None = None, stats: str | Path | None = None,
                also_read: Iterable[str | Path] = ()) -> StageWriter:
    """Run the stage; returns the finished writer (its ``stats()`` are on disk). ``also_read``:
    further files the run reads (its ``--config``), which no output may replace."""
    # Records are read as a stream (normalised in worker processes, in order); a malformed file
    # stops the stage, and the writer then leaves nothing.
    stems = [Path(p).name.split(".")[0] or Path(p).name for p in inputs]
    workers = resolve_workers(settings.workers)

    def results() -> Iterator[tuple[int, str, Any, Any]]:
        for fi, path in enumerate(inputs):
            _, items = map_records(path, partial(_merge_batch, source=str(path)), workers, BATCH)
            for where, obj, res in items:
                yield fi, where, obj, res

    group: Counter[str] = Counter()  # records claiming each id (dedupe: reject_all), from a first read
    if settings.dedupe == "reject_all":
        first = IdResolver(stems)
        for fi, _, _, res in results():
            if isinstance(res, tuple):
                group[first.resolve(fi, res[0], res[1])[0]] += 1
    ids = IdResolver(stems)
    with StageWriter("merge", out, rejects, stats, inputs=[*inputs, *also_read]) as w:
        for fi, where, obj, res in progress(results(), "merge"):
            w.count_in()
            if isinstance(obj, InvalidLine):
                w.reject(obj, obj.reason, f"{where}: {obj.error}")
                continue
            if res is None:  # a JSON null record (the workers are sent None for an unreadable line too)
                try:
                    normalise(obj)
                except RecordProblem as problem:
                    res = problem
            if isinstance(res, RecordProblem):
                w.reject(obj, res.reason, f"{where}: {res.detail}")
                continue
            rid, dup = ids.resolve(fi, res[0], res[1])
            if dup is not None:
                w.reject(obj, "duplicate_id", f"{where}: id {rid!r}: {dup}")
                continue
            if settings.dedupe == "reject_all" and group[rid] > 1:
                w.reject(obj, "duplicate_id", f"{where}: id {rid!r} occurs {group[rid]} times (dedupe: reject_all)")
                continue
            if rid != res[0]:
                w.extra["renamed"] = w.extra.get("renamed", 0) + 1
                w.keep(with_source({**normalise(obj), "id": rid}, str(inputs[fi])))
                continue
            w.keep_line(res[2])
        w.extra["inputs"] = [str(p) for p in inputs]
    return w


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, MergeSettings, "merge")
    log_settings("merge", settings, inputs=args.inputs, output=args.output)
    for p in args.inputs:
        check_input_file(p)
    w = merge_files(args.inputs, args.output, settings, args.rejects, args.stats, also_read=[args.config] if args.config else [])
    print(w.summary())
    return 0
