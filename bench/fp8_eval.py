"""Benchmark: eval scores of two tuned models, one trained over the bf16 base and one over the fp8 (e4m3) base.

    PYTHONPATH=src python3 bench/fp8_eval.py --base-dir results/base --train-data TRAIN.jsonl --val-data VAL.jsonl
        --arc results/benchmarks/arc_easy-test/requests.jsonl.gz [--work /tmp/fp8eval] [--out DIR] [--device cuda]
        [--storages float fp8] [--retention-script bench/retention.py]

Runs, with the default run's settings (config.yaml's train/select/merge_adapter/eval flags, as the workflow passes them,
``--device`` for train and eval), the workflow's CLIs: ``convert`` (the GGUF in ``--base-dir`` to a Hugging Face
model), then for each ``train.base_storage`` in ``--storages``: ``train`` -> ``select`` -> ``merge-adapter`` (into the
converted base); then scores the two merged models side by side on the retention sets with ``bench/retention.py``
(``--model`` the float run's, ``--tuned`` the fp8 run's, bf16 on the GPU as eval does, the first 1,600 items of each
set as eval.retention_max_items): the paired fp8-vs-bf16 difference and its bootstrap 95% interval; then ``eval`` of
each merged model against the converted base. Needs a CUDA GPU of compute capability 8.9+ (fp8). Writes each stage's
log, the eval and retention JSON and one JSONL row per model under ``--out``, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# config.yaml's values as the workflow passes them (`snakemake -n` at 7cd8481); base_storage and device set per call.
TRAIN_FLAGS = (
    "--run default --base_run null --method lora --lora.r 16 --lora.alpha 32 --lora.dropout 0.05 --lora.target_modules "
    '["all-linear"] --lora.rslora false --packing true --micro_batch_size 4 --grad_accum 1 --lr 0.002 --weight_decay 0.0 '
    "--optimizer null --optimizer_in_backward null --warmup_steps 2 --min_lr_ratio 0.1 --max_steps 12 --epochs 1.0 "
    "--max_grad_norm 1.0 --precision auto --gradient_checkpointing null --memory auto --gpu_memory_gib null --eval_every 12 "
    "--save_every 6 --keep_checkpoints 2 --resume auto --on_nonfinite stop --seed 0 --attn_implementation sdpa "
    "--kernels auto --trust_remote_code false --template auto --system_prompt null --max_seq_len 512 --retention true "
    "--items null --max_items 0 --batch_size 16 --scale 0.5 --min_scale 0.5"
)
SELECT_FLAGS = "--retention true --bound 2.0 --scale 0.5 --min_scale 0.5"
MERGE_FLAGS = "--combine chain --weights [] --svd_rank null --dtype float32 --max_shard_size 2GB --format hf --template auto --system_prompt null"
EVAL_FLAGS = (
    "--questions null --max_questions 0 --max_new_tokens 64 --temperature 0.0 --top_p 0.9 --seed 0 --batch_size 32 "
    '--retention true --retention_items ["bundled","arc_easy-test"] --retention_max_items 1600 --retention_bound 2.0 '
    "--template auto --system_prompt null"
)
CONVERT_FLAGS = "--max_shard_size 2GB --dtype float32 --context_length null --verify_checksums true --template auto"


def split_flags(flags: str) -> list[str]:
    """``flags`` as argv: split on spaces (no value above holds one)."""
    return flags.split()


def stage(name: str, args: list[str], log_dir: Path, timings: dict[str, float]) -> bool:
    """Run ``python3 -m llama_pipe <args>`` with its output in ``log_dir/<name>.log``; True when it exits 0."""
    cmd = [sys.executable, "-m", "llama_pipe", *args]
    t0 = time.time()
    with open(log_dir / f"{name}.log", "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    timings[name] = round(time.time() - t0, 1)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: exit {rc}, {timings[name]:.1f} s", flush=True)
    if rc:
        print((log_dir / f"{name}.log").read_text(encoding="utf-8")[-3000:], flush=True)
    return rc == 0


def train_losses(train_dir: Path) -> dict[str, Any]:
    """Final training loss (last step, and mean of the last 4 steps) and validation losses from ``metrics.jsonl``/``summary.json``."""
    rows = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    vals = [r for r in rows if "val_loss" in r]
    summary = json.loads((train_dir / "summary.json").read_text(encoding="utf-8"))
    return {
        "train_loss_last": steps[-1]["loss"] if steps else None,
        "train_loss_last4": sum(r["loss"] for r in steps[-4:]) / len(steps[-4:]) if steps else None,
        "train_losses": [r["loss"] for r in steps],
        "val_losses": [(r["step"], r["val_loss"]) for r in vals],
        "val_loss_before": summary.get("val_loss_before"), "val_loss_after": summary.get("val_loss_after"),
        "precision": summary.get("precision"), "base_storage": summary.get("base_storage"), "device": summary.get("device"),
        "memory_plan": summary.get("memory_plan", {}).get("plan"), "peak_mem_bytes": summary.get("peak_mem_bytes"),
        "wall_s": summary.get("wall_s"),
    }


def model_row(storage: str, work: Path) -> dict[str, Any]:
    """One model's numbers: losses, the kept checkpoint, eval's scores and its retention against the base."""
    row: dict[str, Any] = {"storage": storage}
    try:
        row.update(train_losses(work / storage / "train"))
    except (OSError, ValueError, KeyError) as exc:
        row["train_error"] = repr(exc)
    try:
        sel = json.loads((work / storage / "select" / "selection.json").read_text(encoding="utf-8"))
        row["select"] = {k: sel.get(k) for k in ("kept_step", "last_step", "within_bound", "scale")}
    except (OSError, ValueError) as exc:
        row["select_error"] = repr(exc)
    try:
        m = json.loads((work / storage / "eval" / "metrics.json").read_text(encoding="utf-8"))
        row["eval"] = {
            "base_ppl": m["base_ppl"], "tuned_ppl": m["tuned_ppl"], "scores": m["scores"],
            "retention": {name: r["overall"] for name, r in m["retention"].items()}, "retention_kept": m["retention_kept"],
            "heldout_text": m["heldout_text"], "device": m["device"], "seconds": m["seconds"],
        }
    except (OSError, ValueError, KeyError) as exc:
        row["eval_error"] = repr(exc)
    return row


def fmt_ci(cell: dict[str, Any]) -> str:
    """``+d.d [lo, hi]`` of a retention cell."""
    lo, hi = cell["ci95"]
    return f"{cell['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def table(rows: list[dict[str, Any]], paired: dict[str, Any]) -> str:
    """The markdown table of both models and the paired fp8-vs-bf16 differences."""
    out = ["| base storage | final train loss (step 12; mean 9-12) | val loss before -> after | identity | general "
           "| bank acc (tuned vs base, 95% CI) | ARC-Easy acc (tuned vs base, 95% CI) | ppl base -> tuned |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "eval" not in r or "train_loss_last" not in r:
            out.append(f"| {r['storage']} | failed: {r.get('train_error') or r.get('eval_error')} | | | | | | |")
            continue
        e, s = r["eval"], r["eval"]["scores"]
        bank, arc = e["retention"].get("llama_pipe"), e["retention"].get("arc_easy-test")
        out.append(
            f"| {r['storage']} | {r['train_loss_last']:.4f} ({r['train_loss_last4']:.4f}) | {r['val_loss_before']:.4f} -> {r['val_loss_after']:.4f} "
            f"| {s['identity']['tuned']['correct']}/{s['identity']['tuned']['scored']} | {s['general']['tuned']['correct']}/{s['general']['tuned']['scored']} "
            f"| {bank['tuned']:.1f} ({fmt_ci(bank)}) | {arc['tuned']:.1f} ({fmt_ci(arc)}) | {e['base_ppl']:.3f} -> {e['tuned_ppl']:.3f} |"
        )
    out += ["", "| set (paired, fp8 model vs bf16 model) | n | bf16 acc | fp8 acc | fp8 - bf16, points [95% CI] | McNemar p | acc_norm: fp8 - bf16 [95% CI] |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, res in paired.items():
        if not res or not res.get("retention"):
            out.append(f"| {name} | failed | | | | | |")
            continue
        a, n = res["retention"]["acc"]["overall"], res["retention"]["acc_norm"]["overall"]
        out.append(f"| {name} | {a['n']} | {a['base']:.1f} | {a['tuned']:.1f} | {fmt_ci(a)} | {a['mcnemar_p']:.3g} | {fmt_ci(n)} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-dir", required=True, help="directory holding the base GGUF (as results/base)")
    ap.add_argument("--train-data", required=True)
    ap.add_argument("--val-data", required=True)
    ap.add_argument("--arc", required=True, help="ARC-Easy's requests.jsonl.gz (results/benchmarks/arc_easy-test/)")
    ap.add_argument("--work", default="/tmp/fp8eval")
    ap.add_argument("--out", default=os.environ.get("OUT", "fp8_eval_out"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--storages", nargs="+", default=["float", "fp8"])
    ap.add_argument("--retention-script", default=str(REPO / "bench" / "retention.py"))
    args = ap.parse_args()

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    timings: dict[str, float] = {}
    hf = work / "hf_base"
    if not (hf / "config.json").exists():
        stage("convert", ["convert", "-o", str(hf), *split_flags(CONVERT_FLAGS), "--", args.base_dir], logs, timings)
    def show(name: str, lines: int) -> None:
        """The last ``lines`` lines of a stage's log (its summary), so that a killed run still reports them."""
        text = (logs / f"{name}.log").read_text(encoding="utf-8", errors="replace").splitlines()
        print("\n".join(f"  {line}" for line in text[-lines:]), flush=True)

    # train -> select -> merge for each storage, then the paired scoring (the comparison asked for), then eval
    merged_ok: dict[str, bool] = {}
    for s in args.storages:
        d = work / s
        ok = stage(f"train_{s}", ["train", f"--base={hf}", f"--train-data={args.train_data}", f"--val-data={args.val_data}",
                                  "-o", str(d / "train"), *split_flags(TRAIN_FLAGS), "--base_storage", s, "--device", args.device],
                   logs, timings)
        if ok:
            show(f"train_{s}", 3)
            ok = stage(f"select_{s}", ["select", "-o", str(d / "select"), *split_flags(SELECT_FLAGS), "--", str(d / "train")], logs, timings)
        if ok:
            ok = stage(f"merge_{s}", ["merge-adapter", f"--base={hf}", f"--adapter={d / 'select'}", "-o", str(d / "merged"),
                                      *split_flags(MERGE_FLAGS)], logs, timings)
        merged_ok[s] = ok
    paired: dict[str, Any] = {}
    a, b = work / args.storages[0] / "merged", work / args.storages[-1] / "merged"
    if len(args.storages) == 2 and all(merged_ok.values()):
        for name, extra in (("llama_pipe", ["--split", "test"]), ("arc_easy-test", ["--oe-eval", args.arc, "--split", "test"])):
            js = work / f"paired_{name}.json"
            t0 = time.time()
            with open(logs / f"paired_{name}.log", "w", encoding="utf-8") as log:
                rc = subprocess.run([sys.executable, args.retention_script, "--model", str(a), "--tuned", str(b), "--device", args.device,
                                     "--dtype", "bfloat16", "--batch-size", "32", "--limit", "1600", "--json", str(js), *extra],
                                    stdout=log, stderr=subprocess.STDOUT, check=False).returncode
            timings[f"paired_{name}"] = round(time.time() - t0, 1)
            print(f"[{time.strftime('%H:%M:%S')}] paired {name}: exit {rc}, {timings[f'paired_{name}']:.1f} s", flush=True)
            show(f"paired_{name}", 20)
            paired[name] = json.loads(js.read_text(encoding="utf-8")) if rc == 0 and js.exists() else None
    for s in args.storages:
        d = work / s
        if merged_ok[s] and stage(f"eval_{s}", ["eval", f"--base={hf}", f"--tuned={d / 'merged'}", f"--val={args.val_data}", "-o", str(d / "eval"),
                                                *split_flags(EVAL_FLAGS), "--device", args.device, f"--benchmark=arc_easy-test={args.arc}"],
                                  logs, timings):
            show(f"eval_{s}", 7)
    rows = [model_row(s, work) for s in args.storages]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "fp8_eval_rows.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write(json.dumps({"paired": {k: (v or {}).get("retention") for k, v in paired.items()}, "timings_s": timings}) + "\n")
    text = table(rows, paired)
    (out / "fp8_eval_table.md").write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
    print("timings (s):", json.dumps(timings), flush=True)


if __name__ == "__main__":
    main()
