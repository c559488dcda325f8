"""Outputs that appear whole or not at all: temporary files and directories beside their
target, renamed into place, and the clean-up of temporaries a killed writer left behind.

* :class:`AtomicFile` - one file, written to ``.NAME.<pid>.<random>.tmp`` and renamed;
* :func:`commit_files` - several finished AtomicFiles renamed together, rolled back on failure;
* :func:`atomic_dir` - a directory built beside its target and swapped in (a context manager over
  :func:`new_temp_dir` and :func:`commit_dir`; the temporary is removed on any failure);
* :func:`remove_dead_temps` - temporaries whose writer process is gone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from llama_pipe.errors import OutputError


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


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Build directory ``out`` whole or not at all::

        with atomic_dir(out) as tmp:
            (tmp / "a.json").write_text(...)

    The body writes into a fresh temporary sibling (:func:`new_temp_dir`); when it finishes, the
    temporary is renamed into place (:func:`commit_dir`). On any exception (KeyboardInterrupt
    included), in the body or in the commit, the temporary is removed and the exception goes on;
    an older ``out`` stays as it was.
    """
    tmp = new_temp_dir(out)
    try:
        yield tmp
        commit_dir(tmp, out)
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
