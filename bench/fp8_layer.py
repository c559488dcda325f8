"""``base_storage: fp8`` layer by layer: one LLaMA-7B decoder layer's seven frozen projections at 8,192 tokens,
the forward and the input gradient (what LoRA needs of a frozen weight), bf16 against :class:`llama_pipe.train.fp8.Fp8Linear`
with each input-gradient variant (``dgrad``: transpose / tiles / cached / dequant), activation and gradient quantization
included; and the seven weights' transposes alone: PyTorch's float8 copy (``transpose``), its uint8 copy, and
:func:`llama_pipe.train.fp8.transpose_e4m3`'s Triton tiles (``tiles``).

    python bench/fp8_layer.py [--tokens 8192]

Prints one line per variant: forward ms, input-gradient ms, both, speed-up over bf16, the weights' bytes and the
largest transient of the backward (``torch.cuda.max_memory_allocated`` above the weights), and the relative error of
the forward and input gradient against fp32 products of the float weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHAPES = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]  # (in, out): q, k, v, o, gate, up, down


def ms(fn: Callable[[], object], repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    from llama_pipe.train import fp8

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--json", type=Path, default=None, help="append the rows here as JSON lines")
    args = ap.parse_args()
    torch.manual_seed(0)
    t = args.tokens
    floats = [torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False) for k, n in SHAPES]
    xs = [torch.randn(t, k, device="cuda", dtype=torch.bfloat16) for k, _ in SHAPES]
    gs = [torch.randn(t, n, device="cuda", dtype=torch.bfloat16) for _, n in SHAPES]
    refs = [(x.float() @ lin.weight.float().t(), g.float() @ lin.weight.float()) for lin, x, g in zip(floats, xs, gs)]
    rows = []
    variants: list[tuple[str, list[torch.nn.Module]]] = [("bf16", floats)]
    for dgrad in ("transpose", "tiles", "cached", "dequant"):
        variants.append((f"fp8 {dgrad}", [fp8.Fp8Linear.from_linear(lin, "cuda", torch.bfloat16, dgrad) for lin in floats]))  # type: ignore[arg-type]
    wq = [layer.weight.detach() for layer in variants[1][1]]
    ways: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "PyTorch float8 copy": lambda w: w.t().contiguous(),
        "PyTorch uint8 copy": lambda w: w.view(torch.uint8).t().contiguous(),
        "Triton tiles (transpose_e4m3)": fp8.transpose_e4m3,
    }
    gb = 2 * sum(w.numel() for w in wq) / 1e9
    for way, fn in ways.items():
        same = all(torch.equal(fn(w).view(torch.uint8), w.t().contiguous().view(torch.uint8)) for w in wq)
        t_ms = ms(lambda fn=fn: [fn(w) for w in wq])
        print(f"transpose of the 7 e4m3 weights, {way}: {t_ms:.3f} ms ({gb / t_ms:.2f} TB/s read + written), equal: {same}", flush=True)
        rows.append({"variant": f"transposes: {way}", "ms": round(t_ms, 3), "tb_s": round(gb / t_ms, 3), "equal": same})
    for name, layers in variants:
        def fwd(layers: list[torch.nn.Module] = layers) -> None:
            for layer, x in zip(layers, xs):
                layer(x)

        def dgrad_all(layers: list[torch.nn.Module] = layers) -> None:
            for layer, g in zip(layers, gs):
                if isinstance(layer, fp8.Fp8Linear):
                    layer.fp8_dgrad(g)
                else:
                    g @ layer.weight

        errs_y, errs_dx = [], []
        for layer, x, g, (ry, rdx) in zip(layers, xs, gs, refs):
            xi = x.clone().requires_grad_(True)
            y = layer(xi)
            y.backward(g)
            errs_y.append(float((y.float() - ry).norm() / ry.norm()))
            errs_dx.append(float((xi.grad.float() - rdx).norm() / rdx.norm()))
        torch.cuda.synchronize()
        w_bytes = sum(p.numel() * p.element_size() for layer in layers for p in list(layer.parameters()) + list(layer.buffers()))
        f_ms, d_ms = ms(fwd), ms(dgrad_all)
        if name == "fp8 cached":  # the transposed copies made in the first backward stay: count them as weights
            w_bytes += sum(layer._weight_t.numel() for layer in layers if layer._weight_t is not None)  # type: ignore[union-attr]
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for layer, g in zip(layers, gs):  # one input gradient at a time, its output freed: the transient of one projection
            (layer.fp8_dgrad(g) if isinstance(layer, fp8.Fp8Linear) else g @ layer.weight).sum()
        torch.cuda.synchronize()
        transient = torch.cuda.max_memory_allocated() - base
        rows.append({"variant": name, "tokens": t, "forward_ms": round(f_ms, 3), "dgrad_ms": round(d_ms, 3),
                     "both_ms": round(f_ms + d_ms, 3), "weight_mib": round(w_bytes / 2**20, 1),
                     "dgrad_transient_mib": round(transient / 2**20, 1),
                     "rel_err_forward": round(max(errs_y), 4), "rel_err_dgrad": round(max(errs_dx), 4)})
    layer_rows = [r for r in rows if "both_ms" in r]
    b = layer_rows[0]["both_ms"]
    print(f"| variant | forward ms | input-grad ms | both ms | vs bf16 | weights MiB | dgrad transient MiB | rel. err fwd / dgrad |  ({t} tokens)")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in layer_rows:
        print(f"| {r['variant']} | {r['forward_ms']} | {r['dgrad_ms']} | {r['both_ms']} | {b / r['both_ms']:.2f}x | {r['weight_mib']} | "
              f"{r['dgrad_transient_mib']} | {r['rel_err_forward']:.2e} / {r['rel_err_dgrad']:.2e} |")
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
