"""The writer every data stage commits its kept records, rejects and stats through."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from llama_pipe.core.atomic import AtomicFile, check_output_files, commit_files
from llama_pipe.core.errors import OutputError
from llama_pipe.core.records import InvalidLine, Record, _safe_text, dumps, rejects_path, stats_path


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

    ``inputs`` are the files the stage reads (its records, its ``--config``): before anything is
    opened, no output may name one of them or another output, by any spelling (a symbolic link,
    ``./x``, a hard link) (:func:`llama_pipe.core.atomic.check_output_files`); ``out_flag`` is how the
    main output is called in that message (gather's is ``--train``).
    """

    def __init__(
        self,
        stage: str,
        out: str | Path,
        rejects: str | Path | None = None,
        stats: str | Path | None = None,
        unit: str = "records",
        inputs: Iterable[str | Path] = (),
        out_flag: str = "-o",
    ) -> None:
        self.stage = stage
        self.inputs = [Path(p) for p in inputs]
        self.out_flag = out_flag
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
        self._more_named: list[tuple[str, AtomicFile]] = []

    def _open(self, path: Path) -> AtomicFile:
        try:
            return AtomicFile(path)
        except OSError as exc:
            self._abort()
            raise _write_failure(self.stage, path, exc) from None
        except OutputError:
            self._abort()
            raise

    def _named(self) -> list[tuple[str, Path]]:
        return [(self.out_flag, self.out_path), ("--rejects", self.rejects_path), ("--stats", self.stats_path)]

    def __enter__(self) -> StageWriter:
        for _, p in self._named():
            if p.is_dir():
                raise OutputError(f"{p}: is a directory; give a file path for the {self.stage} output")
        check_output_files(self._named(), self.inputs)
        self._out = self._open(self.out_path)
        self._rej = self._open(self.rejects_path)
        return self

    def add_output(self, path: str | Path, flag: str = "output") -> TextIO:
        """A further output file (``flag``: how it is given, for messages), committed together with
        the others; it too may name no input and no other output."""
        try:
            check_output_files([*self._named(), *((g, f.path) for g, f in self._more_named), (flag, Path(path))], self.inputs)
        except OutputError:
            self._abort()
            raise
        f = self._open(Path(path))
        self._more_named.append((flag, f))
        self._more.append(f)
        return f.fh

    def count_in(self, n: int = 1) -> None:
        self.n_in += n

    def keep(self, record: Record, counts: bool = True) -> None:
        self.keep_line(dumps(record), counts)

    def keep_line(self, line: str, counts: bool = True) -> None:
        """:meth:`keep` for a record already written as its line (``dumps(record)``, by a worker)."""
        assert self._out is not None
        self._out.fh.write(line + "\n")
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
