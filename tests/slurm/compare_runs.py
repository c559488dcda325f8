"""Compare the outputs of two workflow runs (a local one and a SLURM one) of the same config.

    python tests/slurm/compare_runs.py LOCAL_DIR SLURM_DIR [--run NAME]

Data and base-weight outputs must be byte-identical (every stage is deterministic); stats files
must agree on every count (keys naming a time or a rate are ignored); the trained adapter's
tensors and the logged losses must agree within ``--atol`` (two processes may sum floats in a
different order). Prints one line per compared item; exit code 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# results/data/<stage>/<key>/: every data stage's products (the keys are the same for the same config)
BYTE_EQUAL_DIRS = ("results/base", "results/hf_base", "results/data")
TIMING_WORDS = ("second", "time", "per_s", "elapsed", "duration")


def relative_files(root: Path, sub: str) -> list[str]:
    base = root / sub
    return sorted(str(p.relative_to(root)) for p in base.rglob("*")
                  if p.is_file() and not p.name.startswith(".snakemake"))


def without_timing(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items()
                if not any(w in k.lower() for w in TIMING_WORDS)}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def compare_file(a: Path, b: Path) -> str | None:
    """None when equal, else a short description of the difference."""
    if a.name.endswith(".stats.json"):
        ja, jb = (without_timing(json.loads(p.read_text(encoding="utf-8"))) for p in (a, b))
        return None if ja == jb else f"stats differ: {ja} != {jb}"
    if a.read_bytes() != b.read_bytes():
        return f"bytes differ ({a.stat().st_size} vs {b.stat().st_size} bytes)"
    return None


def compare_adapter(a: Path, b: Path, atol: float) -> list[str]:
    from safetensors.torch import load_file

    problems = []
    ta, tb = load_file(str(a)), load_file(str(b))
    if set(ta) != set(tb):
        return [f"{a.name}: tensor names differ: {sorted(set(ta) ^ set(tb))}"]
    worst = 0.0
    for key in ta:
        if ta[key].shape != tb[key].shape:
            problems.append(f"{a.name}:{key}: shape {tuple(ta[key].shape)} vs {tuple(tb[key].shape)}")
            continue
        worst = max(worst, (ta[key].float() - tb[key].float()).abs().max().item())
    print(f"  adapter {a.name}: {len(ta)} tensors, max abs difference {worst:.3g}")
    if worst > atol:
        problems.append(f"{a.name}: max abs difference {worst:.3g} > {atol}")
    return problems


def losses(path: Path) -> list[tuple[Any, str, float]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if "loss" in key and isinstance(value, (int, float)):
                rows.append((row.get("step"), key, float(value)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("local", type=Path)
    parser.add_argument("slurm", type=Path)
    parser.add_argument("--run", default="default", help="train.run of the compared runs")
    parser.add_argument("--atol", type=float, default=1e-5)
    args = parser.parse_args(argv)
    problems: list[str] = []

    for sub in BYTE_EQUAL_DIRS:
        names_a, names_b = relative_files(args.local, sub), relative_files(args.slurm, sub)
        if not names_a:
            problems.append(f"{sub}: no files in the local run")
        if names_a != names_b:
            problems.append(f"{sub}: different files: {sorted(set(names_a) ^ set(names_b))}")
        same = 0
        for name in sorted(set(names_a) & set(names_b)):
            diff = compare_file(args.local / name, args.slurm / name)
            if diff:
                problems.append(f"{name}: {diff}")
            else:
                same += 1
        print(f"  {sub}: {same} of {len(names_a)} files identical")

    run = Path("results") / args.run / "train"
    adapters = sorted(p.name for p in (args.local / run).glob("*.safetensors"))
    if not adapters:
        problems.append(f"{run}: no *.safetensors in the local run")
    for name in adapters:
        problems += compare_adapter(args.local / run / name, args.slurm / run / name, args.atol)
    la, lb = losses(args.local / run / "metrics.jsonl"), losses(args.slurm / run / "metrics.jsonl")
    if [(s, k) for s, k, _ in la] != [(s, k) for s, k, _ in lb] or not la:
        problems.append(f"{run}/metrics.jsonl: different loss rows ({len(la)} vs {len(lb)})")
    else:
        worst = max(abs(x - y) for (_, _, x), (_, _, y) in zip(la, lb))
        print(f"  {run}/metrics.jsonl: {len(la)} losses, max abs difference {worst:.3g}")
        if worst > args.atol:
            problems.append(f"{run}/metrics.jsonl: losses differ by {worst:.3g} > {args.atol}")

    for problem in problems:
        print(f"  DIFFERENT: {problem}")
    print("compare: identical within tolerance" if not problems else f"compare: {len(problems)} difference(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
