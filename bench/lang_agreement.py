"""filter-lang's labels against stock langdetect's, conversation by conversation.

    PYTHONPATH=src .venv/bin/python bench/lang_agreement.py CLEANED.jsonl [--workers 2] [--labels FILTERED.jsonl ...]

Every conversation of CLEANED (clean's output) is labelled twice by filter-lang's own rules (its
text, min_chars, scripts, confidence, cross-check; the default settings): once with the batch
detector filter-lang runs (``langdetect_fast``), once with stock langdetect's ``Detector`` in its
place (seeded the same way, one text at a time, all 7 trials). Prints how many labels agree, and
the first differences. ``--labels`` also compares the ``lang`` field of a filter-lang output (e.g.
one written by an earlier version) with the stock labels of the same ids.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from llama_pipe.config import FilterLangSettings  # noqa: E402
from llama_pipe.data import filter_lang as fl  # noqa: E402


class StockDetector:
    """What filter-lang asks of its batch detector, answered by stock langdetect one text at a time."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def prepare(self, text: str) -> list[str]:
        return [text]

    def run(self, rows: list[list[str]]) -> list[Any]:
        from langdetect.lang_detect_exception import LangDetectException

        out = []
        for (text,) in rows:
            d = fl._detector()
            d.append(text)
            try:
                d.get_probabilities()
                out.append(d.langprob)
            except LangDetectException:
                out.append(None)
        return out

    def ranked(self, langprob: Any) -> list[tuple[str, float]]:
        if langprob is None:
            return []
        return [(str(x.lang), x.prob) for x in fl._detector()._sort_probability(langprob)]


def labels(args: tuple[list[dict[str, Any]], bool]) -> list[str]:
    recs, stock = args
    cfg = FilterLangSettings()
    fl._init(cfg)
    if stock:
        fl._FAST = StockDetector(cfg.seed)
    pending = [fl.screen_text(fl.prose(r, cfg.max_chars), cfg.min_chars, cfg.detector, cfg.cross_check) for r in recs]
    return fl.finish(pending, cfg.detector, cfg.min_confidence, cfg.cross_check)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cleaned", type=Path)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--labels", type=Path, nargs="*", default=[], help="filter-lang outputs whose lang fields to compare too")
    args = ap.parse_args()
    recs = [json.loads(line) for line in args.cleaned.read_text(encoding="utf-8").splitlines() if line.strip()]
    batches = [recs[i : i + 256] for i in range(0, len(recs), 256)]
    result: dict[str, list[str]] = {}
    with get_context("fork").Pool(args.workers) as pool:
        for name, stock in (("batch detector", False), ("stock langdetect", True)):
            t = time.perf_counter()
            result[name] = [x for b in pool.map(labels, [(b, stock) for b in batches]) for x in b]
            print(f"{name}: {len(recs)} conversations labelled in {time.perf_counter() - t:.1f} s ({args.workers} processes)", flush=True)
    ours, stock = result["batch detector"], result["stock langdetect"]
    diff = [(r["id"], a, b) for r, a, b in zip(recs, ours, stock) if a != b]
    share = 1 - len(diff) / max(1, len(recs))
    print(f"labels identical to stock langdetect: {len(recs) - len(diff)} / {len(recs)} ({100 * share:.3f} %)")
    for d in diff[:20]:
        print("  differs:", d)
    by_id = {r["id"]: lab for r, lab in zip(recs, stock)}
    for path in args.labels:
        out = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        same = sum(1 for r in out if by_id.get(r["id"]) == r.get("lang"))
        print(f"{path}: lang of {same} / {len(out)} kept conversations equals stock langdetect's label")


if __name__ == "__main__":
    main()
