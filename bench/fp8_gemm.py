"""FP8 feasibility on a Hopper GPU: one LLaMA-7B decoder layer's seven forward GEMMs at 8,192 tokens,
bf16 against FP8 (e4m3, ``torch._scaled_mm``, rowwise scales: per token for the activations, per
output channel for the weights), with and without quantizing the activations inside the timing.

    python bench/fp8_gemm.py            # activation quantization in eager PyTorch
    python bench/fp8_gemm.py --compile  # the quantization through torch.compile (one fused kernel)

Prints one line per GEMM and the layer's totals (docs/benchmarks.md, issue 29).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

TOKENS = 8192
# q, k, v, o (4096 -> 4096), gate, up (4096 -> 11008), down (11008 -> 4096)
SHAPES = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
E4M3_MAX = 448.0


def timed_ms(fn: Callable[[], object], repeats: int = 30) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as e4m3 with one scale per row, and the scales that undo it (fp32, shape rows x 1)."""
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    return (x.float() * (E4M3_MAX / amax)).to(torch.float8_e4m3fn), amax / E4M3_MAX


def measure(k: int, n: int, quant: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict[str, float], float]:
    """Milliseconds of ``TOKENS x k @ k x n`` each way, and FP8's error relative to an fp32 product."""
    x = torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    wq, ws = quantize_rows(w)
    xq, xs = quant(x)

    def fp8(xq: torch.Tensor = xq, xs: torch.Tensor = xs) -> torch.Tensor:
        return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16)

    times = {"bf16": timed_ms(lambda: x @ w.t()), "fp8": timed_ms(fp8), "fp8+quantize": timed_ms(lambda: fp8(*quant(x)))}
    ref = x.float() @ w.float().t()
    return times, float((fp8().float() - ref).norm() / ref.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile", action="store_true", help="quantize the activations through torch.compile")
    args = ap.parse_args()
    quant = torch.compile(quantize_rows) if args.compile else quantize_rows
    torch.manual_seed(0)
    total = {"bf16": 0.0, "fp8": 0.0, "fp8+quantize": 0.0}
    for k, n in SHAPES:
        times, err = measure(k, n, quant)
        for key, ms in times.items():
            total[key] += ms
        print(
            f"{TOKENS}x{k} @ {k}x{n}: "
            + ", ".join(f"{key} {ms:.3f} ms ({times['bf16'] / ms:.2f}x)" for key, ms in times.items())
            + f", relative error {err:.2e}"
        )
    print("one layer: " + ", ".join(f"{key} {ms:.2f} ms ({total['bf16'] / ms:.2f}x)" for key, ms in total.items()))


if __name__ == "__main__":
    main()
