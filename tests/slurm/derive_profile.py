"""Derive the CI cluster's profile from profiles/slurm/config.yaml, changing only what must change.

The test cluster is one CPU-only node: a GPU request (``gpu: 1``) would never be scheduled, and
a job asking for more memory or CPUs than the node has would pend forever. So the derived
profile sets ``gpu: 0``, caps ``mem_mb`` at the node's memory and ``set-threads`` at its CPUs;
every other key (partitions, runtimes, executor, show-failed-logs, rerun triggers, ...) is the
shipped profile's, so the test exercises the profile users get.

    python tests/slurm/derive_profile.py SHIPPED.yaml DERIVED.yaml --mem-mb 19000 --cpus 2
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import yaml


def derive(profile: dict[str, Any], mem_mb: int, cpus: int) -> dict[str, Any]:
    """A copy of ``profile`` fitted to a CPU-only node with ``mem_mb`` MB and ``cpus`` CPUs."""
    out = copy.deepcopy(profile)
    default = out.get("default-resources") or {}
    if int(default.get("mem_mb", 0)) > mem_mb:
        default["mem_mb"] = mem_mb
    for resources in (out.get("set-resources") or {}).values():
        if "gpu" in resources:
            resources["gpu"] = 0
        if int(resources.get("mem_mb", 0)) > mem_mb:
            resources["mem_mb"] = mem_mb
    for rule, threads in (out.get("set-threads") or {}).items():
        out["set-threads"][rule] = min(int(threads), cpus)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shipped", type=Path)
    parser.add_argument("derived", type=Path)
    parser.add_argument("--mem-mb", type=int, required=True, help="memory of the test node (MB)")
    parser.add_argument("--cpus", type=int, required=True, help="CPUs of the test node")
    args = parser.parse_args()
    profile = yaml.safe_load(args.shipped.read_text(encoding="utf-8"))
    args.derived.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(derive(profile, args.mem_mb, args.cpus), sort_keys=False)
    args.derived.write_text(f"# derived from {args.shipped} by tests/slurm/derive_profile.py\n{text}", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
