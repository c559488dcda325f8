"""Outputs that appear whole or not at all: temporary files and directories beside their
target, renamed into place, and the clean-up of temporaries a killed writer left behind.

* :class:`AtomicFile` - one file, written to ``.NAME.<pid>.<random>.tmp`` and renamed;
* :func:`commit_files` - several finished AtomicFiles renamed together, rolled back on failure;
* :func:`atomic_dir` - a directory built beside its target and swapped in (a context manager over
  :func:`new_temp_dir` and :func:`commit_dir`; the temporary is removed on any failure);
* :func:`remove_dead_temps` - temporaries whose writer process is gone;
* :func:`check_output_dir` and :func:`check_output_files` - the guard every stage's outputs pass
  before anything is written: no output may be (or alias) an input or another output, and a
  directory output may only replace a directory that llama-pipe's same stage wrote (its
  :data:`MARKER` lists the files) and that holds none of the stage's inputs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TextIO

from llama_pipe.core.errors import OutputError


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


# ----------------------------------------------------------------------------- the output guard

#: The file every directory output gets (written by :func:`commit_dir` before the rename): which
#: stage wrote the directory and the files it wrote. A later run may replace the directory only
#: when the marker is there, names the same stage, and every file in the directory is listed.
MARKER = ".llama-pipe-output.json"

PathLike = str | Path

#: Files a directory output may hold without a record: Snakemake's mtime carrier of directory()
#: outputs (``--touch`` and its job bookkeeping write it); replacing it loses nothing.
BOOKKEEPING = frozenset({".snakemake_timestamp"})

_STAGE: ContextVar[str | None] = ContextVar("llama_pipe_stage", default=None)


@contextmanager
def running_stage(name: str) -> Iterator[None]:
    """Within this block directory outputs are written by stage ``name`` (``llama-pipe NAME`` sets it):
    the marker records it, and a directory another stage wrote is not replaced."""
    token = _STAGE.set(name)
    try:
        yield
    finally:
        _STAGE.reset(token)


def _resolved(path: PathLike) -> Path:
    """``path`` with symbolic links and ``.``/``..`` resolved (as far as it exists)."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # a link loop: compare it as written
        return Path(os.path.abspath(path))


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file: the same path once links and ``./`` are resolved,
    or two names (hard links) of one existing inode."""
    if _resolved(a) == _resolved(b):
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except (OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def is_inside(path: PathLike, directory: PathLike) -> bool:
    """Whether ``path`` lies somewhere under ``directory`` (links resolved)."""
    return _resolved(directory) in _resolved(path).parents


def check_output_files(outputs: Sequence[tuple[str, PathLike]], inputs: Iterable[PathLike] = ()) -> None:
    """Refuse file outputs (``(what, path)`` pairs: ``("-o", out)``, ``("--stats", ...)``) of which
    two name one file, or one names an input (the same path, a symbolic link to it, ``./x`` for
    ``x``, a hard link), or one would replace an existing file inside an input directory: the
    stage would destroy what it reads, or one output would overwrite another. An OutputError
    (exit 2, one line) before anything is written."""
    ins = [Path(p) for p in inputs]
    seen: list[tuple[str, Path]] = []
    for what, raw in outputs:
        path = Path(raw)
        for other_what, other in seen:
            if same_file(path, other):
                raise OutputError(f"{path}: {what} and {other_what} name the same file ({other}); give each output its own path")
        for inp in ins:
            if same_file(path, inp):
                raise OutputError(f"{path}: {what} names the stage's input {inp}; writing it would replace the input; "
                                  "give another output path")
            if (path.exists() or path.is_symlink()) and inp.is_dir() and is_inside(path, inp):
                raise OutputError(f"{path}: {what} would replace a file inside the input directory {inp}; give another output path")
        seen.append((what, path))


def _files_under(directory: Path) -> list[str]:
    """Relative paths of every file (and symbolic link) under ``directory``, sorted; the marker is left out."""
    out = []
    for root, dirs, files in os.walk(directory):
        rel = os.path.relpath(root, directory)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = name if rel == "." else f"{rel}/{name}"
            if path != MARKER:
                out.append(path)
    return sorted(out)


def _read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        return None
    return data


def check_output_dir(out: PathLike, inputs: Iterable[PathLike] = (), stage: str | None = None) -> None:
    """Refuse to replace ``out`` unless that loses nothing but an older output of this stage.

    Refused (an OutputError naming the reason, exit 2): ``out`` is one of the ``inputs`` or
    contains one (``shard IN -o DIR`` with IN in DIR); ``out`` is a file or a symbolic link;
    ``out`` is a non-empty directory without llama-pipe's :data:`MARKER` (``report -o
    results/<run>`` would delete the run's adapter and eval), one written by another stage, or
    one holding a file its marker does not list (put there by someone else). A missing or
    empty ``out`` is fine. ``stage`` defaults to the running stage (:func:`running_stage`)."""
    out = Path(out)
    stage = stage or _STAGE.get()
    for inp in inputs:
        if same_file(out, inp) or is_inside(inp, out):
            raise OutputError(f"{out}: the output directory {'is' if same_file(out, inp) else 'contains'} the stage's input {inp}; "
                              "replacing it would delete the input; give another output directory")
    if out.is_symlink():
        raise OutputError(f"{out}: is a symbolic link; llama-pipe replaces its output directory whole, so give the "
                          "link's target or another path")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory; the output is a directory (remove the file or give another path)")
    files = [f for f in _files_under(out) if f not in BOOKKEEPING]
    if not files:
        return
    marker = _read_marker(out)
    if marker is None:
        raise OutputError(f"{out}: holds files llama-pipe did not write (e.g. {files[0]}; no {MARKER}); replacing the "
                          "directory would delete them; give another output directory, or remove it first")
    if stage is not None and marker.get("stage") not in (None, stage):
        raise OutputError(f"{out}: holds the output of `llama-pipe {marker.get('stage')}`; replacing it would delete "
                          f"that; give {stage} its own output directory")
    listed = set(map(str, marker["files"]))
    later = tuple(str(x) for x in marker.get("later") or ())
    foreign = [f for f in files if f not in listed and f.split("/", 1)[0] not in later]
    if foreign:
        raise OutputError(f"{out}: holds {len(foreign)} file(s) llama-pipe did not write there (e.g. {foreign[0]}); "
                          "replacing the directory would delete them; move them out or give another output directory")


def write_marker(directory: PathLike, stage: str | None, later: Sequence[str] = ()) -> None:
    """Record in ``directory`` (a finished temporary) which stage wrote it and its files."""
    directory = Path(directory)
    record: dict[str, Any] = {"written_by": "llama-pipe", "stage": stage or _STAGE.get(), "files": _files_under(directory)}
    if later:
        record["later"] = sorted(later)
    (directory / MARKER).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def new_temp_dir(out: str | Path) -> Path:
    """A fresh ``OUT.tmp-<pid>-<random>`` directory beside ``out`` (same file system, so renaming
    it to ``out`` is atomic), after removing the ones killed writers of ``out`` left behind."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(out)
    return Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-{os.getpid()}-", dir=out.parent))


def commit_dir(tmp: str | Path, out: str | Path, *, stage: str | None = None, inputs: Iterable[PathLike] = (),
               later: Sequence[str] = ()) -> None:
    """Move a finished ``tmp`` (from :func:`new_temp_dir`) into place at ``out``.

    ``out`` must pass :func:`check_output_dir` (for ``stage``, which reads ``inputs``); ``tmp``
    gets the :data:`MARKER` listing its files (``later``: top-level names the stage adds after the
    commit, such as train's ``checkpoints``). An older ``out`` is first moved into another temporary directory (removed afterwards, or by
    the next writer if this one is killed in between), so ``out`` is always either the old or the
    new complete directory. Permissions follow the umask (mkdtemp makes directories private).
    """
    tmp, out = Path(tmp), Path(out)
    inputs = list(inputs)
    check_output_dir(out, inputs, stage)
    write_marker(tmp, stage, later)
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


@contextmanager
def atomic_dir(out: str | Path, *, stage: str | None = None, inputs: Iterable[PathLike] = (),
               later: Sequence[str] = ()) -> Iterator[Path]:
    """Build directory ``out`` whole or not at all::

        with atomic_dir(out) as tmp:
            (tmp / "a.json").write_text(...)

    The body writes into a fresh temporary sibling (:func:`new_temp_dir`); when it finishes, the
    temporary is renamed into place (:func:`commit_dir`). On any exception (KeyboardInterrupt
    included), in the body or in the commit, the temporary is removed and the exception goes on;
    an older ``out`` stays as it was.

    ``out`` is checked (:func:`check_output_dir`) before the body runs and again before the
    commit: a directory that holds the stage's inputs or files llama-pipe did not write is never
    replaced.
    """
    inputs = list(inputs)
    check_output_dir(out, inputs, stage)
    tmp = new_temp_dir(out)
    try:
        yield tmp
        commit_dir(tmp, out, stage=stage, inputs=inputs, later=later)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
