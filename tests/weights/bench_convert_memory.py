"""Benchmark (not a test): peak memory of ``llama-pipe convert`` against the model's size.

    .venv/bin/python tests/weights/bench_convert_memory.py [--dim 2048 --layers 4] [--keep DIR]

Builds a bfloat16 Meta checkpoint (2 shards, vocabulary 32000, like LLaMA-2's), converts it to
float32 in a child process, and samples the child's /proc status every 20 ms: ``RssAnon`` is
memory the process owns; ``RssFile`` is page cache of the memory-mapped input shards (shared and
reclaimable by the kernel). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except FileNotFoundError:
        pass
    return out


def main() -> int:
    import torch

    from llama_pipe.weights import meta
    from llama_pipe.weights.make_base import write_meta_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-shard-size", default="200MB")
    ap.add_argument("--keep", type=Path, default=None)
    a = ap.parse_args()
    work = a.keep or Path(tempfile.mkdtemp(prefix="bench-convert-"))
    src = work / "meta"
    params = meta.MetaParams(dim=a.dim, n_layers=a.layers, n_heads=a.dim // 128, vocab_size=32000, multiple_of=256)
    if not src.exists():
        src.mkdir(parents=True)
        gen = torch.Generator().manual_seed(0)
        weights = {
            name: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            for name, shape in meta.expected_shapes(params, 32000).items()
        }
        write_meta_checkpoint(src, params, weights, 2)
        del weights
    n_params = sum(torch.Size(s).numel() for s in meta.expected_shapes(params, 32000).values())
    tok = src / "tokenizer.model"
    if not tok.exists():
        import random

        from llama_pipe.weights.tokenizer import train_sentencepiece

        rng = random.Random(0)
        words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(60000)]
        texts = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(20000)]
        train_sentencepiece(texts, tok, vocab_size=32000)
    out = work / "hf"
    cmd = [sys.executable, "-m", "llama_pipe.cli", "convert", str(src), "-o", str(out),
           "--max-shard-size", a.max_shard_size, "--dtype", "float32"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak: dict[str, int] = {}
    while proc.poll() is None:
        for k, v in _status(proc.pid).items():
            peak[k] = max(peak.get(k, 0), v)
        time.sleep(0.02)
    log = proc.stdout.read().decode() if proc.stdout else ""
    if proc.returncode:
        print(log, file=sys.stderr)
        return proc.returncode
    result = {
        "params": n_params,
        "input_bf16_MB": round(sum(p.stat().st_size for p in src.glob("*.pth")) / 1e6),
        "output_fp32_MB": round(sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e6),
        "max_shard_size": a.max_shard_size,
        "peak_RssAnon_MB": round(peak.get("RssAnon", 0) / 1e6),
        "peak_RssFile_MB": round(peak.get("RssFile", 0) / 1e6),
        "VmHWM_MB": round(peak.get("VmHWM", 0) / 1e6),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
