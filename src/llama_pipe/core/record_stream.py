"""Records read as a stream: memory bounded by the largest record, not the file.

:func:`stream_records` yields what :func:`llama_pipe.core.records.read_records` yields, in the same
order, with the same ``where`` strings, the same :class:`~llama_pipe.core.records.InvalidLine`
records and the same :class:`~llama_pipe.core.errors.InputError` for an unusable file; but it
reads a JSONL file line by line and a JSON list record by record (``json.JSONDecoder.raw_decode``
over a sliding window), so a data stage's memory does not grow with its input.

The one difference is when a bad file is found: ``read_records`` reads the whole file before the
first record, this reads up to the fault. The stages write through
:class:`~llama_pipe.core.stage_writer.StageWriter`, which leaves nothing behind when the stage fails,
so the outcome is the same. Where a JSON list turns out not to be one (a syntax error, a file that
starts with something other than ``[``), the error is the one ``read_records`` gives for the whole
file: it is asked for it.
"""

from __future__ import annotations

import codecs
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from llama_pipe.core.errors import InputError
from llama_pipe.core.records import (
    _PARSE_HEADROOM,
    OVERFLOWS,
    InvalidLine,
    _NonFinite,
    _not_utf8_family,
    _parse_float,
    _safe_text,
    _screen,
    check_input_file,
    parse_line,
    read_records,
)

CHUNK = 1 << 20  # bytes read at a time from a JSON list


def stream_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, obj)`` for each record of a ``.json`` list or a ``.jsonl`` file, as
    :func:`~llama_pipe.core.records.read_records` does (see the module docstring)."""
    path = check_input_file(Path(path))
    with open(path, "rb") as fh:
        head = fh.read(4096)
        wide = _not_utf8_family(head)
        if wide:
            raise InputError(f"{path}: not UTF-8 text: {wide}; re-encode the file as UTF-8")
        fh.seek(0)
        if path.suffix == ".jsonl":
            yield from _jsonl(path, fh)
            return
        first = _first_char(fh)
        fh.seek(0)
        if first == "[":
            yield from _json_list(path, fh)
        elif first is None or path.suffix == ".json":  # empty, undecodable, or not a list: read_records' error
            yield from _whole(path)
        else:
            yield from _jsonl(path, fh)


def _whole(path: Path) -> Iterator[tuple[str, Any]]:
    """``read_records`` on the whole file: its records, or its error for a bad file."""
    yield from read_records(path)


def _first_char(fh: BinaryIO) -> str | None:
    """The first character that is not whitespace (a byte-order mark skipped); None when the file
    has none or does not decode."""
    dec = codecs.getincrementaldecoder("utf-8")()
    start = True
    while True:
        raw = fh.read(65536)
        try:
            text = dec.decode(raw, final=not raw)
        except UnicodeDecodeError:
            return None
        if start and text:
            text, start = text[1:] if text.startswith("\ufeff") else text, False
        stripped = text.lstrip()
        if stripped:
            return stripped[0]
        if not raw:
            return None


def _jsonl(path: Path, fh: BinaryIO) -> Iterator[tuple[str, Any]]:
    offset = 0
    pending: tuple[str, InvalidLine, int, str, int] | None = None  # a bad line that may turn out to be the torn last one
    ends_with_newline = True
    for n, raw in enumerate(fh, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: not UTF-8 text: invalid byte 0x{raw[exc.start]:02x} at byte offset {offset + exc.start}; "
                             "re-encode the file as UTF-8") from None
        offset += len(raw)
        ends_with_newline = line.endswith("\n")
        if n == 1 and line.startswith("\ufeff"):
            line = line[1:]
        if ends_with_newline:
            line = line[:-1]
        if not line.strip():
            continue
        if pending is not None:
            yield pending[0], pending[1]
            pending = None
        where = f"{path}:line {n}"
        try:
            obj = parse_line(line)
        except json.JSONDecodeError as exc:
            pending = (where, InvalidLine(line, f"{exc.msg} at column {exc.colno}"), n, exc.msg, exc.colno)
            continue
        yield where, obj
    if pending is not None:
        if not ends_with_newline:  # the last line with text, in a file that does not end with a newline
            raise InputError(f"{path}: truncated: last line {pending[2]} is incomplete JSON ({pending[3]} at column {pending[4]})")
        yield pending[0], pending[1]


def _json_list(path: Path, fh: BinaryIO) -> Iterator[tuple[str, Any]]:
    """The records of a file whose first character is ``[``, one at a time; on anything that is not
    a well-formed list, ``read_records``' error for the file."""
    dec = codecs.getincrementaldecoder("utf-8")()
    decoder = json.JSONDecoder(parse_constant=_NonFinite, parse_float=_parse_float)
    buf, pos, eof, start = "", 0, False, True

    def more(need: int = CHUNK) -> bool:
        """Append at least ``need`` bytes' worth of text to the window (dropping what was used)."""
        nonlocal buf, pos, eof, start
        if eof:
            return False
        raw = fh.read(max(CHUNK, need))
        try:
            text = dec.decode(raw, final=not raw)
        except UnicodeDecodeError:
            raise _Bad from None
        if start and text:
            text, start = text[1:] if text.startswith("\ufeff") else text, False
        buf, pos = buf[pos:] + text, 0
        eof = not raw
        return True

    def skip_ws() -> str | None:
        """The next character that is not JSON whitespace (None at the end of the file)."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\n\r":
                pos += 1
            if pos < len(buf):
                return buf[pos]
            if not more():
                return None

    try:
        more()
        if skip_ws() != "[":
            raise _Bad
        pos += 1
        i = 0
        if skip_ws() == "]":
            pos += 1
        else:
            while True:
                if skip_ws() is None:
                    raise _Bad
                before = OVERFLOWS[0]
                obj, end = _decode(decoder, buf, pos, more_possible=not eof)
                while obj is _MORE:
                    more(len(buf) - pos)  # at least as much again as the unfinished value
                    obj, end = _decode(decoder, buf, pos, more_possible=not eof)
                text = buf[pos:end]
                pos = end
                sep = skip_ws()
                if sep not in (",", "]"):
                    raise _Bad
                problem = _screen(obj, text, overflow=OVERFLOWS[0] != before)
                yield f"{path}[#{i}]", InvalidLine(_safe_text(obj), problem[1], problem[0]) if problem else obj
                i += 1
                pos += 1
                if sep == "]":
                    break
        if skip_ws() is not None:
            raise _Bad
    except _Bad:
        yield from _error(path)


_MORE = object()


class _Bad(Exception):
    """Not a well-formed JSON list (or not UTF-8): ``read_records`` says how."""


def _decode(decoder: json.JSONDecoder, buf: str, pos: int, more_possible: bool) -> tuple[Any, int]:
    """One JSON value at ``pos``: ``(value, end)``; ``(_MORE, pos)`` when the window may cut it
    short (a parse error, or a value ending at the window's edge, where a number could go on)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + _PARSE_HEADROOM)
    try:
        obj, end = decoder.raw_decode(buf, pos)
    except json.JSONDecodeError:
        if more_possible:
            return _MORE, pos
        raise _Bad from None
    except (RecursionError, ValueError):
        raise _Bad from None
    finally:
        sys.setrecursionlimit(limit)
    if more_possible:  # the value must be followed by "," or "]" inside the window
        k = end
        while k < len(buf) and buf[k] in " \t\n\r":
            k += 1
        if k >= len(buf) or buf[k] not in ",]":
            return _MORE, pos
    return obj, end


def _error(path: Path) -> Iterator[tuple[str, Any]]:
    """``read_records``' error for a file the stream found malformed (its records are never yielded)."""
    for _ in read_records(path):
        pass
    raise InputError(f"{path}: not a well-formed JSON list of records")  # pragma: no cover - read_records found no fault
