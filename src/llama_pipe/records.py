"""Conversation records, input readers and the atomic stage writer.

The record every stage passes on (one JSON object per line, UTF-8)::

    {"id": "abc", "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}],
     "system": "optional system prompt", "lang": "added by filter-lang"}

Every data stage writes three files through :class:`StageWriter`: the kept records, a rejects
file (one line per dropped record: ``id``, ``stage``, ``reason``, ``detail``, ``record``) and a
stats file (``{"stage", "in", "out", "rejected": {reason: count}}``). All three appear only when
the stage finishes; ``in == out + sum(rejected)`` is checked before they do.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

Record = dict[str, Any]


class InputError(Exception):
    """A whole input is unusable (the stage exits with code 2). The message names file and place."""


class OutputError(InputError):
    """An output could not be written (a directory in the way, a full disk): exit code 2, and
    nothing of the stage's outputs is left behind (the older versions, if any, stay as they were)."""


def rejects_path(out: str | Path) -> Path:
    """Default rejects file beside an output: ``x.jsonl`` -> ``x.rejects.jsonl``."""
    out = Path(out)
    return out.with_name(_stem(out) + ".rejects.jsonl")


def stats_path(out: str | Path) -> Path:
    """Default stats file beside an output: ``x.jsonl`` -> ``x.stats.json``."""
    out = Path(out)
    return out.with_name(_stem(out) + ".stats.json")


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
    """What ``NaN``/``Infinity`` parse to: found by :func:`_value_problem`, never written."""

    def __init__(self, name: str) -> None:
        self.name = name


def _loads(text: str) -> Any:
    """``json.loads`` with NaN/Infinity as :class:`_NonFinite`, and headroom above the recursion
    limit: whether a record nested some hundreds of levels parses must not depend on how deep the
    caller's stack happens to be (it is then rejected as ``too_deep`` by :func:`_screen`)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + _PARSE_HEADROOM)
    try:
        return json.loads(text, parse_constant=_NonFinite)
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
                return "invalid_json", f"{node.name} is not valid JSON (only finite numbers are)"
            continue
        if check_depth and depth > MAX_DEPTH:
            return "too_deep", f"record nests arrays/objects more than {MAX_DEPTH} levels deep"
        stack.extend((c, depth + 1) for c in children)
    return None


def _screen(obj: Any, text: str) -> tuple[str, str] | None:
    """The problems of a parsed record that make it unwritable, checked only when its text could
    hold them (cheap substring counts first): too deep, NaN/Infinity, a lone surrogate."""
    deep = text.count("[") + text.count("{") > MAX_DEPTH
    constants = "NaN" in text or "Infinity" in text
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
            or _SURROGATE_ESCAPE.search(text) is not None)


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
            obj = _loads(line)
        except json.JSONDecodeError as exc:
            if n - 1 == last and not text.endswith("\n"):
                raise InputError(
                    f"{path}: truncated: last line {n} is incomplete JSON ({exc.msg} at column {exc.colno})"
                ) from None
            yield f"{path}:line {n}", InvalidLine(line, f"{exc.msg} at column {exc.colno}")
            continue
        except (RecursionError, ValueError) as exc:
            reason = "too_deep" if isinstance(exc, RecursionError) else "invalid_json"
            yield f"{path}:line {n}", InvalidLine(line, _unreadable(exc), reason)
            continue
        problem = _screen(obj, line)
        yield f"{path}:line {n}", InvalidLine(line, problem[1], problem[0]) if problem else obj


def iter_jsonl(path: str | Path) -> Iterator[Record]:
    """Records of a JSONL file written by a previous stage (strict: any bad line is an InputError:
    not JSON, not an object, not UTF-8, or holding an unpaired surrogate escape)."""
    path = check_input_file(path)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below; bytes so a bad byte is found by line
    except OSError as exc:
        raise InputError(f"{path}: cannot read the file: {exc.strerror or exc}") from None
    with fh:
        offset = 0
        for n, raw in enumerate(fh, start=1):
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
                obj = _loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: line {n}: not valid JSON ({exc.msg}); was it written by llama-pipe?") from None
            except (RecursionError, ValueError) as exc:
                raise InputError(f"{path}: line {n}: {_unreadable(exc)}") from None
            if not isinstance(obj, dict):
                raise InputError(
                    f"{path}: line {n}: a JSON {type(obj).__name__}, expected an object (one record per line); "
                    "was it written by llama-pipe?"
                )
            problem = _screen(obj, line)
            if problem:
                raise InputError(f"{path}: line {n}: {problem[1]}")
            yield obj


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


def file_digest(path: str | Path, algo: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file (``sha256``, ``md5``, ...), read in chunks."""
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- writing


def dumps(record: Any) -> str:
    """One JSONL line (no trailing newline): compact, UTF-8, key order preserved."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs. A zombie does not: a killed writer whose orphaned
    process waits to be reaped (which a container's init may take seconds to do) is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            state = fh.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):  # no /proc (not Linux) or it just went away
        return True
    return state not in ("Z", "X")


def remove_dead_temps(path: str | Path) -> list[Path]:
    """Delete temporaries of output ``path`` whose writer no longer runs: files
    ``.NAME.<pid>.<random>.tmp`` (:class:`AtomicFile`) and directories ``NAME.tmp-<pid>-<random>``
    (:func:`new_temp_dir`).

    A writer killed with SIGKILL cannot clean up; the next writer of the same output does. A
    temporary whose pid is alive (a concurrent writer, or a reused pid) is left alone.
    """
    import shutil

    path = Path(path)
    name = re.escape(path.name)
    file_re = re.compile(rf"^\.{name}\.(\d+)\.[A-Za-z0-9_]+\.tmp$")
    dir_re = re.compile(rf"^{name}\.tmp-(\d+)-[A-Za-z0-9_]+$")
    removed: list[Path] = []
    try:
        entries = list(path.parent.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = file_re.match(entry.name) or dir_re.match(entry.name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def new_temp_dir(out: str | Path) -> Path:
    """A fresh ``OUT.tmp-<pid>-<random>`` directory beside ``out`` (same file system, so renaming
    it to ``out`` is atomic), after removing the ones killed writers of ``out`` left behind."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(out)
    return Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-{os.getpid()}-", dir=out.parent))


def commit_dir(tmp: str | Path, out: str | Path) -> None:
    """Move a finished ``tmp`` (from :func:`new_temp_dir`) into place at ``out``.

    An older ``out`` is first moved into another temporary directory (removed afterwards, or by
    the next writer if this one is killed in between), so ``out`` is always either the old or the
    new complete directory. Permissions follow the umask (mkdtemp makes directories private).
    """
    import shutil

    tmp, out = Path(tmp), Path(out)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for f in tmp.rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, 0o666 & ~umask)
    old: Path | None = None
    if out.exists() or out.is_symlink():
        old = new_temp_dir(out)
        try:
            os.replace(out, old / "x")
        except BaseException:
            shutil.rmtree(old, ignore_errors=True)
            raise
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:  # put the older directory back: out is the old one or the new one, never none
            os.replace(old / "x", out)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class AtomicFile:
    """A text file written to a temporary name in the same directory and renamed on commit.

    The temporary is ``.NAME.<pid>.<random>.tmp``; temporaries of ``NAME`` left by killed
    writers are removed when the next one starts (:func:`remove_dead_temps`). For several files
    that must appear together, :meth:`finish` each one and rename them with :func:`commit_files`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise OutputError(f"{self.path}: is a directory; give a file path for the output")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temps(self.path)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.{os.getpid()}.", suffix=".tmp", dir=self.path.parent)
        self.tmp = Path(tmp)
        self.fh: TextIO = os.fdopen(fd, "w", encoding="utf-8", newline="\n")

    def finish(self) -> None:
        """Flush and sync the temporary to disk and close it (a full disk raises here)."""
        if not self.fh.closed:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()

    def commit(self) -> None:
        self.finish()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Remove the temporary. Never raises: closing may fail again on a full disk (the buffered
        rest cannot be written), and the temporary goes either way."""
        if not self.fh.closed:
            try:
                self.fh.close()
            except OSError:
                pass
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:
            pass


def commit_files(files: list[AtomicFile]) -> None:
    """Rename several finished temporaries into place, all or none.

    Every file is first finished (written and synced: a full disk fails here, before anything is
    renamed). Each existing target is hard-linked to a backup name, then the temporaries are
    renamed one by one; if a rename fails, the targets renamed so far get their old versions back
    (or are removed when there were none) and the error is raised. So after any failure every
    target is as it was before.
    """
    try:
        for f in files:
            f.finish()
    except BaseException:
        for f in files:
            f.abort()
        raise
    backups: list[tuple[Path, Path | None]] = []
    done: list[tuple[Path, Path | None]] = []
    try:
        for f in files:
            backup = None
            if f.path.is_file():
                backup = f.path.with_name(f".{f.path.name}.{os.getpid()}.old.tmp")
                backup.unlink(missing_ok=True)
                os.link(f.path, backup)
            backups.append((f.path, backup))
        for f, (target, backup) in zip(files, backups):
            os.replace(f.tmp, target)
            done.append((target, backup))
    except BaseException:
        for target, backup in done:
            try:
                if backup is not None:
                    os.replace(backup, target)
                else:
                    target.unlink(missing_ok=True)
            except OSError:
                pass
        for f in files:
            f.abort()
        for _, backup in backups:
            if backup is not None:
                backup.unlink(missing_ok=True)
        raise
    for _, backup in backups:
        if backup is not None:
            backup.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON through a temporary file and rename."""
    f = AtomicFile(path)
    try:
        json.dump(obj, f.fh, ensure_ascii=False, indent=2)
        f.fh.write("\n")
        f.commit()
    except BaseException:
        f.abort()
        raise


def _write_failure(stage: str, path: Path, exc: OSError) -> OutputError:
    where = exc.filename if isinstance(exc.filename, str) and not exc.filename.endswith(".tmp") else path
    return OutputError(f"{where}: cannot write the {stage} output: {exc.strerror or exc}; nothing was written "
                       "(older outputs, if any, are unchanged)")


class StageWriter:
    """Kept records, rejects and stats of one stage run, committed together or not at all.

    Use as a context manager; on an exception nothing is left behind. ``count_in`` is called
    once per input unit, then each unit ends in exactly one ``keep`` or ``reject`` (``keep`` may
    be called with ``counts=False`` for extra output lines such as split chunks). A stage with a
    second output (gather's validation file) opens it with :meth:`add_output`; it is committed
    with the others. Every file is written to a temporary first; only when all of them are
    complete on disk are they renamed (:func:`commit_files`). A write failure (a full disk, a
    directory where an output should be) is an :class:`OutputError` (exit 2) naming the path.
    """

    def __init__(
        self,
        stage: str,
        out: str | Path,
        rejects: str | Path | None = None,
        stats: str | Path | None = None,
        unit: str = "records",
    ) -> None:
        self.stage = stage
        self.out_path = Path(out)
        self.rejects_path = Path(rejects) if rejects else rejects_path(out)
        self.stats_path = Path(stats) if stats else stats_path(out)
        self.unit = unit
        self.n_in = 0
        self.n_out = 0
        self.lines_out = 0
        self.rejected: Counter[str] = Counter()
        self.extra: dict[str, Any] = {}
        self._out: AtomicFile | None = None
        self._rej: AtomicFile | None = None
        self._more: list[AtomicFile] = []

    def _open(self, path: Path) -> AtomicFile:
        try:
            return AtomicFile(path)
        except OSError as exc:
            self._abort()
            raise _write_failure(self.stage, path, exc) from None
        except OutputError:
            self._abort()
            raise

    def __enter__(self) -> StageWriter:
        paths = [self.out_path, self.rejects_path, self.stats_path]
        if len({p.resolve() for p in paths}) < len(paths):
            raise OutputError(f"{self.out_path}: the output, --rejects and --stats paths must differ")
        for p in paths:
            if p.is_dir():
                raise OutputError(f"{p}: is a directory; give a file path for the {self.stage} output")
        self._out = self._open(self.out_path)
        self._rej = self._open(self.rejects_path)
        return self

    def add_output(self, path: str | Path) -> TextIO:
        """A further output file, committed together with the others."""
        f = self._open(Path(path))
        self._more.append(f)
        return f.fh

    def count_in(self, n: int = 1) -> None:
        self.n_in += n

    def keep(self, record: Record, counts: bool = True) -> None:
        assert self._out is not None
        self._out.fh.write(dumps(record) + "\n")
        self.lines_out += 1
        if counts:
            self.n_out += 1

    def reject(self, record: Any, reason: str, detail: str = "", count: int = 1) -> None:
        assert self._rej is not None
        rid = record.get("id") if isinstance(record, dict) else None
        row = {"id": rid if isinstance(rid, (str, int)) else None, "stage": self.stage, "reason": reason}
        if detail:
            row["detail"] = detail
        row["record"] = record.text if isinstance(record, InvalidLine) else record
        try:
            line = dumps(row)
            line.encode("utf-8")
        except UnicodeEncodeError:  # text no UTF-8 can hold (lone surrogates): keep it, \u-escaped
            line = json.dumps(row, separators=(",", ":"))
        except (RecursionError, ValueError):  # nested too deeply (or NaN): the reason still counts
            row["record"] = _safe_text(record)
            line = dumps(row)
        self._rej.fh.write(line + "\n")
        self.rejected[reason] += count

    def stats(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "unit": self.unit,
            "in": self.n_in,
            "out": self.n_out,
            "rejected": dict(sorted(self.rejected.items())),
            "lines_out": self.lines_out,
            **self.extra,
        }

    def _abort(self) -> None:
        for f in (self._out, self._rej, *self._more):
            if f is not None:
                f.abort()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._out is not None and self._rej is not None
        if exc_type is not None:
            self._abort()
            if isinstance(exc, OSError):
                raise _write_failure(self.stage, self.out_path, exc) from None
            return
        total = self.n_out + sum(self.rejected.values())
        if total != self.n_in:
            self._abort()
            raise RuntimeError(
                f"{self.stage}: accounting error: in={self.n_in} but out+rejected={total}; nothing written"
            )
        # All temporaries complete on disk first, then renamed together (rolled back on failure).
        try:
            stats = AtomicFile(self.stats_path)
        except OSError as exc:
            self._abort()
            raise _write_failure(self.stage, self.stats_path, exc) from None
        except OutputError:
            self._abort()
            raise
        files = [self._rej, stats, *self._more, self._out]
        try:
            json.dump(self.stats(), stats.fh, ensure_ascii=False, indent=2)
            stats.fh.write("\n")
            commit_files(files)
        except OSError as exc:
            for f in files:
                f.abort()
            raise _write_failure(self.stage, self.out_path, exc) from None
        except BaseException:
            for f in files:
                f.abort()
            raise

    def summary(self) -> str:
        rej = ", ".join(f"{k}={v}" for k, v in sorted(self.rejected.items())) or "none"
        return f"{self.stage}: {self.unit} in={self.n_in} out={self.n_out} rejected={sum(self.rejected.values())} ({rej}) -> {self.out_path}"
