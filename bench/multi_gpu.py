"""Multi-GPU training under ``accelerate launch``: DDP, FSDP2 and DeepSpeed ZeRO-2/3 against one GPU.

Every case is the real stage: ``accelerate launch --config_file configs/accelerate/<strategy>.yaml
-m llama_pipe train ...`` (what a user runs), or the same module without a launcher for
the one-GPU reference. Two models:

* ``tiny``: the embedded default (``results/hf_base`` + ``results/data`` from ``make run``), in
  fp32 so a 2-GPU run must match one GPU to float rounding;
* ``7b``: LLaMA-7B shape (hidden 4096, 32 layers, vocab 32000), random bf16 weights written by
  ``make-7b`` (speed does not depend on the values), the tiny tokenizer, and synthetic
  conversations drawn from the bundled sample's words, packed to 1024 tokens.

The global batch is the same everywhere (micro-batch 4 x grad_accum 2 on one GPU, 4 x 1 on each
of two), so per-step losses must agree. After the runs every adapter is checked from its files
alone (:func:`check_adapter`): every LoRA module of every layer present with the right shape,
finite, trained (B not all zero), loadable with ``PeftModel.from_pretrained`` with the values
of the file, and close to the one-GPU adapter. Usage on the 2-GPU machine::

    python bench/multi_gpu.py all --out $OUT [--models tiny,7b] [--cases NAME,...] [--budget-s 540]
    python bench/multi_gpu.py check RUN_DIR --base BASE_DIR [--reference RUN_DIR]

The ``7b`` cases ending in ``_fast`` run with ``train.kernels: auto`` (the GPU fast path, under
DDP for two GPUs) against a one-GPU fast-path reference. All cases together take longer than one
10-minute device call: split them with ``--cases`` (docs/benchmarks.md gives the calls made).
NCCL's NVLink multicast stays off in every launched process (NCCL_NVLS_ENABLE=0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # the adapter check uses llama_pipe without an install
ACCEL = REPO / "configs" / "accelerate"
SAMPLE = REPO / "data" / "sample" / "sharegpt_sample.json"
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
WARMUP = 2  # steps left out of the tok/s median


@dataclass(frozen=True)
class Case:
    model: str  # tiny | 7b
    strategy: str  # single | ddp | fsdp | deepspeed_zero2 | deepspeed_zero3
    mode: str  # lora | qlora
    fast: bool = False  # train.kernels auto (the GPU fast path) instead of none

    @property
    def name(self) -> str:
        return f"{self.model}_{self.strategy}_{self.mode}{'_fast' if self.fast else ''}"

    @property
    def nproc(self) -> int:
        return 1 if self.strategy == "single" else 2

    @property
    def reference(self) -> str:
        return f"{self.model}_single_{self.mode}{'_fast' if self.fast else ''}"


# qlora runs under DDP only: FSDP and ZeRO-3 would need bitsandbytes' quant_storage set to the
# sharding dtype, which llama-pipe does not do (configs/accelerate/fsdp.yaml says so).
CASES = {
    "tiny": [Case("tiny", s, m) for s, m in [
        ("single", "lora"), ("ddp", "lora"), ("fsdp", "lora"), ("deepspeed_zero2", "lora"),
        ("deepspeed_zero3", "lora"), ("single", "qlora"), ("ddp", "qlora")]],
    "7b": [Case("7b", s, m) for s, m in [
        ("single", "lora"), ("ddp", "lora"), ("deepspeed_zero3", "lora"), ("fsdp", "lora"),
        ("single", "qlora"), ("ddp", "qlora")]]
    + [Case("7b", s, m, fast=True) for s, m in [("single", "lora"), ("ddp", "lora"), ("single", "qlora"), ("ddp", "qlora")]],
}
# Loss agreement with one GPU: fp32 tiny runs differ only by reduction order; bf16 7B runs by
# bf16 rounding of differently ordered sums (and ZeRO's bf16 gradient all-reduce).
LOSS_RTOL = {"tiny": 1e-4, "7b": 2e-2}
ADAPTER_MIN_COS = {"tiny": 0.999, "7b": 0.99}
CASE_TIMEOUT_S = {"tiny": 150, "7b": 300}  # a hung collective costs this much, not the whole budget


def mode_flags(mode: str) -> list[str]:
    """A case's mode label (lora, qlora, ...) as train flags: --base_storage and --method."""
    from llama_pipe.config.load import MODE_NAMES

    return [arg for key, value in MODE_NAMES[mode].items() for arg in (f"--{key}", value)]


def model_flags(model: str, mode: str, nproc: int, device: str = "cuda", fast: bool = False) -> list[str]:
    """Train flags of one case; the global batch is 8 rows whatever the process count."""
    common = ["--micro_batch_size", "4", "--grad_accum", str(2 // nproc), "--max_steps", "8",
              "--eval_every", "1000", "--save_every", "1000", "--warmup_steps", "0", "--lora.dropout", "0",
              "--kernels", "auto" if fast else "none", "--resume", "never", "--device", device]
    if model == "tiny":
        return common + ["--precision", "fp32", "--lr", "1e-2", "--lora.r", "8", "--lora.alpha", "16"]
    r, alpha = ("16", "32") if mode == "lora" else ("64", "16")
    return common + ["--precision", "bf16", "--lr", "2e-4", "--max_seq_len", "1024", "--gradient_checkpointing", "true",
                     "--lora.r", r, "--lora.alpha", alpha]


# ----------------------------------------------------------------------------- inputs


def make_7b(out: Path, tokenizer_from: Path, layers: int = 32) -> None:
    """A LLaMA-7B-shaped HF directory with random bf16 weights (built on the GPU) and the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return
    tok_cfg = json.loads((tokenizer_from / "config.json").read_text())
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      bos_token_id=tok_cfg["bos_token_id"], eos_token_id=tok_cfg["eos_token_id"],
                      pad_token_id=tok_cfg["pad_token_id"], tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), max_shard_size="4GB", safe_serialization=True)
    for f in tokenizer_from.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)


def synth_data(out_dir: Path, n_train: int = 240, n_val: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """ShareGPT-format conversations of 2-6 turns of 60-400 words drawn from the bundled sample."""
    words = re.findall(r"[^\W\d_]+[.,?!]?", " ".join(
        t["value"] for r in json.loads(SAMPLE.read_text(encoding="utf-8")) if isinstance(r, dict)
        for t in r.get("conversations") or [] if isinstance(t, dict) and isinstance(t.get("value"), str)))
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)

    def convo(i: int) -> dict[str, Any]:
        turns = [{"from": ("human", "gpt")[k % 2], "value": " ".join(rng.choices(words, k=rng.randint(60, 400)))}
                 for k in range(2 * rng.randint(1, 3))]
        return {"id": f"synth{i}", "conversations": turns}

    paths = []
    for name, n in (("train", n_train), ("val", n_val)):
        p = out_dir / f"{name}.jsonl"
        p.write_text("".join(json.dumps(convo(i)) + "\n" for i in range(n)), encoding="utf-8")
        paths.append(p)
    return paths[0], paths[1]


# ----------------------------------------------------------------------------- adapter check


def expected_lora_modules(base: Path, target_modules: Any) -> dict[str, tuple[int, int]]:
    """``{module name: (in_features, out_features)}`` that a LoRA adapter on ``base`` must cover."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name == "lm_head":
            continue
        leaf = name.rsplit(".", 1)[-1]
        if target_modules in ("all-linear", ["all-linear"]) or leaf in target_modules or name in target_modules:
            out[name] = (mod.in_features, mod.out_features)
    return out


def check_adapter(run: Path, base: Path, reference: Path | None = None) -> dict[str, Any]:
    """Check a saved adapter from its files alone; ``problems`` lists everything wrong (empty = complete)."""
    import torch
    from safetensors.torch import load_file

    problems: list[str] = []
    # What was asked for (train_config.json), not what the adapter says it holds.
    lora = json.loads((run / "train_config.json").read_text())["train"]["lora"]
    r = int(lora["r"])
    tensors = load_file(str(run / "adapter_model.safetensors"))
    expected = expected_lora_modules(base, lora["target_modules"])
    found = 0
    for name, (fan_in, fan_out) in expected.items():
        for part, shape in (("lora_A", (r, fan_in)), ("lora_B", (fan_out, r))):
            key = f"base_model.model.{name}.{part}.weight"
            t = tensors.get(key)
            if t is None:
                problems.append(f"missing {key}")
                continue
            found += 1
            if tuple(t.shape) != shape:
                problems.append(f"{key}: shape {tuple(t.shape)}, expected {shape}")
            elif not bool(torch.isfinite(t.float()).all()):
                problems.append(f"{key}: not finite")
            elif part == "lora_B" and not bool(t.float().abs().sum() > 0):
                problems.append(f"{key}: all zeros (never trained, or saved from an empty shard)")
    extra = len(tensors) - found
    if extra:
        problems.append(f"{extra} unexpected tensors")
    loaded = _peft_loaded(run, base)
    if loaded is None:
        problems.append("PeftModel.from_pretrained did not load it")
    else:
        diff = [k for k, v in tensors.items() if k.replace(".weight", ".default.weight") not in loaded
                or not torch.equal(loaded[k.replace(".weight", ".default.weight")].float(), v.float())]
        if diff:
            problems.append(f"{len(diff)} tensors differ after PeftModel.from_pretrained, e.g. {diff[0]}")
    report: dict[str, Any] = {"tensors": len(tensors), "expected": 2 * len(expected), "problems": problems}
    if reference is not None and (reference / "adapter_model.safetensors").is_file():
        ref = load_file(str(reference / "adapter_model.safetensors"))
        cos = [float(torch.nn.functional.cosine_similarity(v.float().flatten(), ref[k].float().flatten(), dim=0))
               for k, v in tensors.items() if k in ref and ".lora_B." in k]
        report["min_cos_vs_single"] = min(cos) if cos else float("nan")
    return report


def _peft_loaded(run: Path, base: Path) -> dict[str, Any] | None:
    """The adapter tensors as peft loads them onto a memory-free (meta-shaped) copy of ``base``."""
    from transformers import AutoConfig

    from llama_pipe.train.output import load_adapter_on_empty_base

    try:
        peft_model = load_adapter_on_empty_base(run, AutoConfig.from_pretrained(str(base)))
    except Exception:  # noqa: BLE001 - any failure to load is the finding
        return None
    return {k: v for k, v in peft_model.state_dict().items() if ".lora_" in k}


# ----------------------------------------------------------------------------- runs


def launch_cmd(case: Case, base: Path, train: Path, val: Path, out: Path, port: int, device: str = "cuda") -> list[str]:
    flags = ["--base", str(base), "--train-data", str(train), "--val-data", str(val), "-o", str(out),
             *mode_flags(case.mode), *model_flags(case.model, case.mode, case.nproc, device, case.fast)]
    if case.strategy == "single":
        return [sys.executable, "-m", "llama_pipe", "train", *flags]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / f"{case.strategy}.yaml"),
            "--num_processes", str(case.nproc), "--main_process_port", str(port), "-m", "llama_pipe", "train", *flags]


def run_case(
    case: Case, base: Path, train: Path, val: Path, work: Path, logs: Path, timeout: float, port: int, device: str
) -> dict[str, Any]:
    out = work / case.name
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, **NO_MULTICAST, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    t0 = time.time()
    with open(logs / f"{case.name}.log", "w") as log:
        # Own process group: on a timeout the launcher *and* its workers are killed (a hung
        # collective would otherwise leave workers holding the GPUs for the next case).
        proc = subprocess.Popen(launch_cmd(case, base, train, val, out, port, device), env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = -9
    row: dict[str, Any] = {**asdict(case), "name": case.name, "rc": rc, "wall_s": round(time.time() - t0, 1)}
    if rc != 0 or not (out / "summary.json").is_file():
        row["error"] = tail(logs / f"{case.name}.log")
        return row
    summary = json.loads((out / "summary.json").read_text())
    steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    train_rows = [s for s in steps if "loss" in s]
    speeds = [s["tokens_per_s"] for s in train_rows[WARMUP:] if s.get("tokens_per_s")]
    row.update(losses=[s["loss"] for s in train_rows], val_after=summary["val_loss_after"],
               tok_s=statistics.median(speeds) if speeds else None, peak_gib=summary["peak_mem_bytes"] / 2**30,
               processes=summary["processes"])
    return row


def tail(path: Path, n: int = 2500) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return text[-n:]


def compare(rows: dict[str, dict[str, Any]], work: Path, bases: dict[str, Path]) -> None:
    """Loss agreement and adapter completeness, filled into each row."""
    for name, row in rows.items():
        if row.get("rc") != 0:
            continue
        case = Case(row["model"], row["strategy"], row["mode"], row.get("fast", False))
        ref = rows.get(case.reference)
        if ref and ref.get("losses") and case.strategy != "single":
            rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(row["losses"], ref["losses"]))
            row["loss_max_rel_diff"] = rel
            row["loss_ok"] = rel <= LOSS_RTOL[case.model] and len(row["losses"]) == len(ref["losses"])
            if ref.get("tok_s") and row.get("tok_s"):
                row["scaling"] = row["tok_s"] / (case.nproc * ref["tok_s"])
        ref_dir = work / case.reference if case.strategy != "single" else None
        try:
            rep = check_adapter(work / name, bases[case.model], ref_dir)
        except Exception as exc:  # noqa: BLE001 - a crash of the check is a failed check
            rep = {"problems": [f"check crashed: {exc!r}"]}
        row["adapter"] = rep
        row["adapter_ok"] = not rep["problems"] and rep.get("min_cos_vs_single", 1.0) >= ADAPTER_MIN_COS[case.model]


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| case | GPUs | rc | step losses (first, last) | max rel. diff vs 1 GPU | tok/s (all GPUs) | tok/s per GPU "
            "| scaling | peak GiB (rank 0) | adapter tensors | min cos vs 1 GPU | adapter complete |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("rc") != 0:
            lines.append(f"| {r['name']} | {r.get('nproc', '')} | {r.get('rc')} | failed: see log | | | | | | | | |")
            continue
        a = r.get("adapter", {})
        f = lambda v, fmt: format(v, fmt) if isinstance(v, (int, float)) and not math.isnan(v) else "-"  # noqa: E731
        ok = "yes" if r.get("adapter_ok") else "NO: " + "; ".join(a.get("problems", [])[:2] or ["cos below threshold"])
        lines.append(
            f"| {r['name']} | {r['processes']} | 0 | {r['losses'][0]:.4f}, {r['losses'][-1]:.4f} "
            f"| {f(r.get('loss_max_rel_diff'), '.1e')}{'' if r.get('loss_ok', True) else ' (OVER)'} "
            f"| {f(r.get('tok_s'), ',.0f')} | {f(r['tok_s'] / r['processes'] if r.get('tok_s') else None, ',.0f')} "
            f"| {f(r.get('scaling'), '.2f')} | {r['peak_gib']:.2f} | {a.get('tensors', '-')}/{a.get('expected', '-')} "
            f"| {f(a.get('min_cos_vs_single'), '.4f')} | {ok} |")
    return "\n".join(lines)


def orchestrate(out: Path, models: list[str], budget_s: float, work: Path, only: set[str], device: str) -> int:
    import torch

    t_end = time.time() + budget_s
    logs = work / "logs"  # one log per case, bundled into <out>/logs.tar.gz at the end
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    env_info = {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    for pkg in ("transformers", "peft", "accelerate", "bitsandbytes", "deepspeed"):
        try:
            env_info[pkg] = __import__(pkg).__version__
        except Exception as exc:  # noqa: BLE001
            env_info[pkg] = f"missing ({type(exc).__name__})"
    print(json.dumps(env_info), flush=True)
    inputs: dict[str, tuple[Path, Path, Path]] = {}
    if "tiny" in models:
        inputs["tiny"] = (REPO / "results" / "hf_base", REPO / "results" / "data" / "train.jsonl",
                          REPO / "results" / "data" / "val.jsonl")
    if "7b" in models:
        t0 = time.time()
        make_7b(work / "llama7b", REPO / "results" / "hf_base")
        inputs["7b"] = (work / "llama7b", *synth_data(work / "data7b"))
        print(f"7B inputs ready in {time.time() - t0:.0f} s", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    port = 29600
    for model in models:
        for case in CASES[model]:
            if only and case.name not in only:
                continue
            left = t_end - time.time()
            if left < 45:
                rows[case.name] = {**asdict(case), "name": case.name, "rc": None, "error": "skipped: out of time budget"}
                continue
            port += 1
            row = run_case(case, *inputs[model], work, logs, min(left, CASE_TIMEOUT_S[model]), port, device)
            rows[case.name] = row
            print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
            if "error" in row:
                print(row["error"], flush=True)
    compare(rows, work, {m: inputs[m][0] for m in inputs})
    text = f"{json.dumps(env_info)}\n\n{table(list(rows.values()))}\n"
    (out / "multi_gpu.md").write_text(text)
    (out / "multi_gpu.json").write_text(json.dumps({"env": env_info, "rows": rows}, indent=1))
    shutil.make_archive(str(out / "logs"), "gztar", root_dir=logs)
    print(text, flush=True)
    bad = [n for n, r in rows.items() if r.get("rc") != 0 or not r.get("adapter_ok") or not r.get("loss_ok", True)]
    print("FAILED: " + ", ".join(bad) if bad else "all cases passed", flush=True)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("all", help="run every case of --models and print the table")
    a.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/multi_gpu")))
    a.add_argument("--models", default="tiny,7b")
    a.add_argument("--budget-s", type=float, default=540)
    a.add_argument("--work", type=Path, default=Path("/tmp/multi_gpu_work"))
    a.add_argument("--cases", default="", help="comma-separated case names (default: all of --models)")
    a.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (single and ddp only)")
    c = sub.add_parser("check", help="check one saved adapter for completeness")
    c.add_argument("run", type=Path)
    c.add_argument("--base", type=Path, required=True)
    c.add_argument("--reference", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "all":
        only = set(filter(None, args.cases.split(",")))
        return orchestrate(args.out, args.models.split(","), args.budget_s, args.work, only, args.device)
    rep = check_adapter(args.run, args.base, args.reference)
    print(json.dumps(rep, indent=1))
    return 1 if rep["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
