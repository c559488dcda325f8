"""Conversation records: their shape, their readers, and where a stage's side files go.

The record every stage passes on (one JSON object per line, UTF-8)::

    {"id": "abc", "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}],
     "system": "optional system prompt", "lang": "added by filter-lang"}

Every data stage writes three files through :class:`llama_pipe.core.stage_writer.StageWriter`: the
kept records, a rejects file (one line per dropped record: ``id``, ``stage``, ``reason``,
``detail``, ``record``) and a stats file (``{"stage", "in", "out", "rejected": {reason: count}}``). All three appear only when
the stage finishes; ``in == out + sum(rejected)`` is checked before they do.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llama_pipe.core.errors import InputError

Record = dict[str, Any]


def rejects_path(out: str | Path) -> Path:
    """Default rejects file beside an output: ``x.jsonl`` -> ``x.rejects.jsonl``."""
    out = Path(out)
    return out.with_name(_stem(out) + ".rejects.jsonl")


def stats_path(out: str | Path) -> Path:
    """Default stats file beside an output: ``x.jsonl`` -> ``x.stats.json``."""
    out = Path(out)
    return out.with_name(_stem(out) + ".stats.json")


def partial_path(out: str | Path) -> Path:
    """Resumable progress beside an output: ``x.jsonl`` -> ``x.partial.jsonl`` (not an output: kept
    when a workflow deletes a failed job's outputs, removed by the stage once they are written)."""
    out = Path(out)
    return out.with_name(_stem(out) + ".partial.jsonl")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".jsonl", ".json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# ----------------------------------------------------------------------------- reading


def check_input_file(path: str | Path, what: str = "file") -> Path:
    """``path`` if it is a readable regular file, else an :class:`InputError` naming it.

    Checked before opening: opening a FIFO would block until a writer appears (forever, in a
    pipeline), and a symbolic-link loop or a missing permission should say so, not "not found".
    """
    import errno
    import stat

    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise InputError(f"{path}: {what} not found") from None
        if exc.errno == errno.ELOOP:
            raise InputError(f"{path}: symbolic link loop (the link points back to itself); fix or remove the link") from None
        raise InputError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{path}: is a directory, expected a .json or .jsonl {what}")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
        raise InputError(f"{path}: is {kind}; give a regular .json or .jsonl {what} (copy the stream to a file first)")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: cannot read the {what}: permission denied")
    return path


def _not_utf8_family(raw: bytes) -> str | None:
    """Why ``raw`` is evidently UTF-16/UTF-32 text (a byte-order mark, or NUL bytes in place of the
    high bytes of ASCII characters), or None. Raw NUL bytes are never valid JSON anyway."""
    for bom, name in ((b"\x00\x00\xfe\xff", "UTF-32-BE"), (b"\xff\xfe\x00\x00", "UTF-32-LE"),
                      (b"\xfe\xff", "UTF-16-BE"), (b"\xff\xfe", "UTF-16-LE")):
        if raw.startswith(bom):
            return f"starts with a {name} byte-order mark"
    head = raw[:4096]
    if head and head.count(0) * 4 >= len(head):
        return f"{head.count(0)} of its first {len(head)} bytes are NUL (UTF-16 or UTF-32 text?)"
    return None


def _read_text(path: Path, what: str = "file") -> str:
    check_input_file(path, what)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    wide = _not_utf8_family(raw)
    if wide:
        raise InputError(f"{path}: not UTF-8 text: {wide}; re-encode the file as UTF-8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not UTF-8 text: invalid byte 0x{raw[exc.start]:02x} at byte offset {exc.start}; "
            "re-encode the file as UTF-8"
        ) from None
    return text[1:] if text.startswith("\ufeff") else text


# A JSON \\uD800-\\uDFFF escape: valid JSON syntax, but unpaired it decodes to a lone surrogate
# that cannot be written as UTF-8 (every later write would crash).
_SURROGATE_ESCAPE = re.compile(r"\\[uU][dD][89a-fA-F][0-9a-fA-F]{2}")


# Python's json parser recurses once per nesting level and gives up near the interpreter's limit.
_TOO_DEEP = "JSON nested too deeply to read (arrays/objects inside each other ~3000 levels or more)"

# A record nested deeper than this is rejected as ``too_deep`` when read: a conversation needs 4
# levels, and writing one nested ~1000 levels (its reject line included) would exceed Python's
# recursion limit in every later stage.
MAX_DEPTH = 100


class _NonFinite:
    """What ``NaN``/``Infinity`` parse to, and a number too large for a float (``1e999``, which
    Python would read as ``inf`` and write back as ``Infinity``, not JSON): found by
    :func:`_value_problem`, never written."""

    def __init__(self, name: str, overflow: bool = False) -> None:
        self.name = name
        self.overflow = overflow

    def problem(self) -> str:
        if self.overflow:
            shown = self.name if len(self.name) <= 40 else self.name[:20] + "..." + self.name[-12:]
            return (f"number {shown} is too large for a 64-bit float: it would be written back as Infinity, "
                    "which is not JSON")
        return f"{self.name} is not valid JSON (only finite numbers are)"


def _parse_float(text: str) -> Any:
    """A JSON number with a fraction or exponent; one that overflows to infinity is kept as a
    :class:`_NonFinite` so the record is rejected rather than written back as ``Infinity``."""
    value = float(text)
    if value in (math.inf, -math.inf):
        OVERFLOWS[0] += 1
        return _NonFinite(text, overflow=True)
    return value


# Numbers read as _NonFinite because they overflow a float, in this process: a reader compares the
# count before and after parsing a record instead of searching its text for huge numbers (slow).
OVERFLOWS = [0]


# A number that may overflow a float: a 3-digit exponent or 309 digits in a row (cheap pre-check).
_HUGE_NUMBER = re.compile(r"\d[eE][+]?\d{3}|\d{309}")


def _loads(text: str, nonfinite: bool = False) -> Any:
    """``json.loads`` with NaN/Infinity as :class:`_NonFinite`, and headroom above the recursion
    limit: whether a record nested some hundreds of levels parses must not depend on how deep the
    caller's stack happens to be (it is then rejected as ``too_deep`` by :func:`_screen`)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + _PARSE_HEADROOM)
    try:
        return json.loads(text) if nonfinite else json.loads(text, parse_constant=_NonFinite, parse_float=_parse_float)
    finally:
        sys.setrecursionlimit(limit)


_PARSE_HEADROOM = 2000


def _value_problem(obj: Any, check_depth: bool, check_constants: bool) -> tuple[str, str] | None:
    """``(reason, detail)`` when ``obj`` nests deeper than :data:`MAX_DEPTH` (``too_deep``) or holds
    a NaN/Infinity (``invalid_json``: not JSON, and no JSON writer could pass it on). Iterative."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            if check_constants and isinstance(node, _NonFinite):
                return "invalid_json", node.problem()
            continue
        if check_depth and depth > MAX_DEPTH:
            return "too_deep", f"record nests arrays/objects more than {MAX_DEPTH} levels deep"
        stack.extend((c, depth + 1) for c in children)
    return None


def _screen(obj: Any, text: str, nonfinite: bool = False, overflow: bool | None = None) -> tuple[str, str] | None:
    """The problems of a parsed record that make it unwritable, checked only when its text could
    hold them (cheap substring counts first): too deep, NaN/Infinity (unless ``nonfinite``: then
    they were parsed as floats), a lone surrogate. ``overflow``: whether parsing it read a number
    too large for a float (:data:`OVERFLOWS`); None: its text is searched for one."""
    deep = text.count("[") + text.count("{") > MAX_DEPTH
    huge = overflow if overflow is not None else _HUGE_NUMBER.search(text) is not None
    constants = not nonfinite and ("NaN" in text or "Infinity" in text or huge)
    if deep or constants:
        problem = _value_problem(obj, deep, constants)
        if problem:
            return problem
    if _SURROGATE_ESCAPE.search(text):
        surrogate = _text_problem(obj)
        if surrogate:
            return "invalid_json", surrogate
    return None


def _unreadable(exc: Exception) -> str:
    """Why valid-looking JSON could not be parsed: too deep, or a number Python refuses to convert."""
    if isinstance(exc, RecursionError):
        return _TOO_DEEP
    return f"unreadable JSON value: {str(exc).split(';')[0]}"


def _text_problem(obj: Any) -> str | None:
    """Why ``obj`` cannot be written back as UTF-8 JSON (a lone surrogate), or None."""
    try:
        dumps(obj).encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"invalid text: lone surrogate \\u{ord(exc.object[exc.start]):04x} (half of a UTF-16 pair) "
            "cannot be written as UTF-8"
        )
    return None


def read_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, obj)`` for each record of a ``.json`` list or a ``.jsonl`` file.

    ``where`` names the record's place (``file:line N`` or ``file[#i]``) for reject details.
    A JSONL line that is not valid JSON, or a record that holds an unpaired surrogate escape
    (``"\\ud83d"``) or NaN/Infinity, or nests more than :data:`MAX_DEPTH` levels, is yielded as an
    :class:`InvalidLine` (``reason`` ``invalid_json`` or ``too_deep``) so the stage can reject it;
    an unusable file (see :func:`check_input_file`; not UTF-8, e.g. UTF-16; truncated) raises
    :class:`InputError`, and so does an empty file unless it is a ``.jsonl`` (zero lines: zero
    records).
    """
    path = Path(path)
    text = _read_text(path)
    if not text.strip():
        if path.suffix == ".jsonl":
            # Zero JSON lines is zero records: a shard or a stage output can legitimately be empty
            # (e.g. more shards than records), and the next stage must pass the emptiness on.
            return
        raise InputError(f"{path}: file is empty; expected a JSON list or JSON lines of records")
    if path.suffix == ".jsonl" or (path.suffix != ".json" and not text.lstrip().startswith("[")):
        yield from _read_jsonl(path, text)
        return
    try:
        data = _loads(text)
    except json.JSONDecodeError as exc:
        what = "truncated" if exc.pos >= len(text.rstrip()) else "not valid JSON"
        raise InputError(
            f"{path}: {what}: {exc.msg} at line {exc.lineno} column {exc.colno} (char {exc.pos})"
        ) from None
    except (RecursionError, ValueError) as exc:
        raise InputError(f"{path}: {_unreadable(exc)}; as JSON lines, only the offending records would be rejected") from None
    if isinstance(data, dict):
        raise InputError(
            f"{path}: a JSON object at the top level; expected a list of records "
            "(or a .jsonl file with one record per line)"
        )
    if not isinstance(data, list):
        raise InputError(f"{path}: top-level JSON is a {type(data).__name__}; expected a list of records")
    suspect = _suspect(text)
    for i, obj in enumerate(data):
        problem = _screen(obj, _SUSPECT) if suspect else None
        yield f"{path}[#{i}]", InvalidLine(_safe_text(obj), problem[1], problem[0]) if problem else obj


# Stands in for a .json list's text when screening its records one by one: the whole text already
# showed that some record may be deep, hold NaN/Infinity or a surrogate escape, so check them all.
_SUSPECT = "[" * (MAX_DEPTH + 1) + "NaN \\ud800"


def _suspect(text: str) -> bool:
    return (text.count("[") + text.count("{") > MAX_DEPTH or "NaN" in text or "Infinity" in text
            or _HUGE_NUMBER.search(text) is not None or _SURROGATE_ESCAPE.search(text) is not None)


def _safe_text(obj: Any) -> str:
    """``obj`` as JSON text for a reject line, or a note when it cannot be written (too deep)."""
    try:
        return json.dumps(obj, default=lambda o: o.name if isinstance(o, _NonFinite) else str(o))
    except (RecursionError, ValueError):
        return "<record not shown: nested too deeply to write back>"


class InvalidLine:
    """A record that cannot be passed on (a JSONL line that did not parse, a record nested too
    deeply or holding NaN/Infinity or a lone surrogate), carried to the stage so it can be rejected
    with ``reason`` rather than lost. ``text`` is what the rejects file shows of it."""

    def __init__(self, text: str, error: str, reason: str = "invalid_json") -> None:
        self.text = text
        self.error = error
        self.reason = reason


def _read_jsonl(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    lines = text.split("\n")
    last = len(lines) - 1
    while last >= 0 and not lines[last].strip():
        last -= 1
    for n, line in enumerate(lines[: last + 1], start=1):
        if not line.strip():
            continue
        try:
            obj = parse_line(line)
        except json.JSONDecodeError as exc:
            if n - 1 == last and not text.endswith("\n"):
                raise InputError(
                    f"{path}: truncated: last line {n} is incomplete JSON ({exc.msg} at column {exc.colno})"
                ) from None
            obj = InvalidLine(line, f"{exc.msg} at column {exc.colno}")
        yield f"{path}:line {n}", obj


def parse_line(line: str) -> Any:
    """One JSONL line as a record, or an :class:`InvalidLine` when it cannot be read back or written
    (too deep, a number no float holds, NaN/Infinity, a lone surrogate). Invalid JSON raises
    ``json.JSONDecodeError``: the reader decides whether it is a torn last line."""
    before = OVERFLOWS[0]
    try:
        obj = _loads(line)
    except json.JSONDecodeError:
        raise
    except (RecursionError, ValueError) as exc:
        return InvalidLine(line, _unreadable(exc), "too_deep" if isinstance(exc, RecursionError) else "invalid_json")
    problem = _screen(obj, line, overflow=OVERFLOWS[0] != before)
    return InvalidLine(line, problem[1], problem[0]) if problem else obj


def iter_jsonl(path: str | Path, torn_last_ok: bool = False) -> Iterator[Record]:
    """Records of a JSONL file written by a previous stage (strict: any bad line is an InputError:
    not JSON, not an object, not UTF-8, nested too deeply, or holding an unpaired surrogate
    escape). NaN/Infinity are read as floats: a training metrics line may hold a nonfinite loss
    (the data stages never write them: :func:`read_records` rejects them).

    ``torn_last_ok`` (a file appended to while it runs, like a trainer's metrics): a last line
    without its newline that does not parse was cut off by a kill mid-write; it is dropped with a
    warning instead of failing the whole file."""
    path = check_input_file(path)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below; bytes so a bad byte is found by line
    except OSError as exc:
        raise InputError(f"{path}: cannot read the file: {exc.strerror or exc}") from None
    with fh:
        offset = 0
        for n, raw in enumerate(fh, start=1):
            if torn_last_ok and not raw.endswith(b"\n") and _torn(raw):
                logging.getLogger("llama_pipe").warning("%s: last line %d was cut off (written while the run was "
                                                        "stopped); dropped", path, n)
                return
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{path}: line {n}: not UTF-8 text: invalid byte 0x{raw[exc.start]:02x} at byte offset "
                    f"{offset + exc.start}; re-encode the file as UTF-8"
                ) from None
            offset += len(raw)
            if n == 1 and line.startswith("\ufeff"):
                line = line[1:]
            if not line.strip():
                continue
            try:
                obj = _loads(line, nonfinite=True)  # a training metric may be NaN (a nonfinite loss)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: line {n}: not valid JSON ({exc.msg}); was it written by llama-pipe?") from None
            except (RecursionError, ValueError) as exc:
                raise InputError(f"{path}: line {n}: {_unreadable(exc)}") from None
            if not isinstance(obj, dict):
                raise InputError(
                    f"{path}: line {n}: a JSON {type(obj).__name__}, expected an object (one record per line); "
                    "was it written by llama-pipe?"
                )
            problem = _screen(obj, line, nonfinite=True)
            if problem:
                raise InputError(f"{path}: line {n}: {problem[1]}")
            yield obj


def _torn(raw: bytes) -> bool:
    """Whether a line's bytes are not one JSON value (a write cut off part way)."""
    try:
        _loads(raw.decode("utf-8"), nonfinite=True)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return bool(raw.strip())
    return False


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """One JSON document (a stats or metrics file), strictly: any problem is an InputError naming it."""
    path = Path(path)
    text = _read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: {what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (RecursionError, ValueError) as exc:
        raise InputError(f"{path}: {what}: {_unreadable(exc)}") from None


# ----------------------------------------------------------------------------- writing


def dumps(record: Any) -> str:
    """One JSONL line (no trailing newline): compact, UTF-8, key order preserved."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))
