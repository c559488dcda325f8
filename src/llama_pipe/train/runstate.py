"""What a training run keeps track of while it runs: peak memory, the live metrics file, SIGTERM."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("llama_pipe.train")


def peak_memory(device_type: str) -> tuple[int, str]:
    """Peak bytes so far: CUDA ``max_memory_allocated`` on a GPU, the process's peak RSS on CPU."""
    if device_type == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_peak_rss"


class StoppedBySignal(RuntimeError):
    """SIGTERM arrived (Slurm time limit, Snakemake cancel); a checkpoint was written first."""


class StopRequest:
    """Turns SIGTERM into "finish this step, checkpoint, exit" (all processes stop at the same step)."""

    def __init__(self) -> None:
        self.flag = False
        self.previous: Any = None

    @classmethod
    def install(cls) -> StopRequest:
        import signal
        import threading

        req = cls()
        if threading.current_thread() is threading.main_thread():
            req.previous = signal.signal(signal.SIGTERM, req._handle)
        return req

    def _handle(self, signum: int, frame: Any) -> None:
        self.flag = True

    def requested(self, acc: Any) -> bool:
        if acc.num_processes == 1:
            return self.flag
        import torch

        t = torch.tensor([1.0 if self.flag else 0.0], device=acc.device)
        return bool(acc.reduce(t, reduction="sum").item() > 0)

    def restore(self) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


@dataclass
class Metrics:
    """Appends rows to ``metrics.jsonl`` on the main process; keeps the rows up to a resumed step."""

    path: Path
    enabled: bool

    def restart_at(self, step: int) -> None:
        """Keep the rows up to ``step`` (the resumed checkpoint's). A last line cut off by a kill in
        the middle of a write, or any other line that is not a metrics row, is dropped with a
        warning: the run resumes, and its metrics file is valid JSON lines again."""
        if not self.enabled or not self.path.exists():
            return
        text = self.path.read_bytes().decode("utf-8", errors="replace")
        lines = text.split("\n")
        keep = []
        for n, ln in enumerate(lines, start=1):
            if not ln.strip():
                continue
            try:
                row = json.loads(ln)
            except ValueError:
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
                torn = n == len(lines)  # no newline after it: the write was cut off
                log.warning("%s: line %d %s; dropped", self.path, n,
                            "was cut off (the run stopped while writing it)" if torn else "is not a metrics row")
                continue
            if row["step"] <= step:
                keep.append(ln)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
        tmp.replace(self.path)

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")


def progress_line(step: int, total: int, start: int, loss: float, tokens_per_s: float | None, elapsed: float) -> str:
    """``step 3/12: loss 2.1034, 812 tok/s, 41 s elapsed, ETA 2 min 03 s`` (ETA from this run's own pace)."""
    done = step - start
    eta = elapsed / done * (total - step) if done > 0 else float("nan")

    def span(s: float) -> str:
        if s != s:  # NaN
            return "?"
        m, sec = divmod(int(round(s)), 60)
        return f"{m} min {sec:02d} s" if m else f"{sec} s"

    rate = f"{tokens_per_s:,.0f} tok/s" if tokens_per_s else "? tok/s"
    return f"step {step}/{total}: loss {loss:.4f}, {rate}, {span(elapsed)} elapsed, ETA {span(eta)}"
