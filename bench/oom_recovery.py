"""A real out-of-memory error in the middle of ``llama-pipe train`` on a GPU: the plan is stepped
down once and the run resumes from its last checkpoint (train.memory: auto, issue 17).

What runs (one process, the real stage through ``llama_pipe.cli.main``):

1. a random LLaMA model of ~1.2B parameters (hidden 2048, 16 layers, bf16) is written with the
   tokenizer and chat template of TOKENIZER_DIR (e.g. SmolLM2's from ``results/hf_base``);
2. the planner is asked what it would run on the whole card (``plan_run``) and what it would
   step down to (``step_down``); the allocator cap is set half-way between the two predicted
   peaks, so the first plan cannot fit and the stepped-down one should;
3. training starts with the allocator uncapped; once the step-2 checkpoint is on disk a watcher
   thread lowers the cap (``torch.cuda.set_per_process_memory_fraction``) and empties the
   allocator's cache, so the next steps run out of memory for real;
4. the run must end with exit 0, ``memory_plan.stepped_down: true`` and ``resumed_from: 2`` in
   its summary, and the log line saying so. Prints one JSON line with what happened.

Usage on the GPU machine (data: results/data/{train,val}.jsonl of any run)::

    python bench/oom_recovery.py TOKENIZER_DIR TRAIN.jsonl VAL.jsonl --out $OUT
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
GiB = 1024**3
SAVE_EVERY, STEPS = 2, 6


def make_model(tok_dir: Path, dest: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = json.loads((tok_dir / "config.json").read_text())["vocab_size"]
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(dest))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (tok_dir / name).exists():
            shutil.copy(tok_dir / name, dest / name)
    del model
    torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("tokenizer_dir", type=Path)
    ap.add_argument("train", type=Path)
    ap.add_argument("val", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    import torch

    from llama_pipe.cli import main as cli
    from llama_pipe.config import LoraSettings, TrainSettings
    from llama_pipe.train import memory

    a.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO)
    base, run_out = Path("/tmp/oom_base"), Path("/tmp/oom_run/train")
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(run_out.parent, ignore_errors=True)
    make_model(a.tokenizer_dir, base)
    flags = {"max_seq_len": 2048, "micro_batch_size": 8, "max_steps": STEPS, "save_every": SAVE_EVERY,
             "eval_every": STEPS, "warmup_steps": 1, "lora.r": 16, "lora.dropout": 0.0}
    settings = TrainSettings(micro_batch_size=8, max_steps=STEPS, save_every=SAVE_EVERY,
                             eval_every=STEPS, warmup_steps=1, lora=LoraSettings(r=16, alpha=32, dropout=0.0))
    first = memory.plan_run(settings, 2048, base, "cuda", 1, False)
    down = memory.step_down(first)
    assert first.prediction is not None and down is not None and down.prediction is not None
    cap = (first.prediction.peak + down.prediction.peak) / 2
    total = torch.cuda.get_device_properties(0).total_memory
    row: dict = {"first_plan": first.prediction.describe(), "step_down_plan": down.prediction.describe(),
                 "cap_gib": round(cap / GiB, 2)}
    print(json.dumps(row), flush=True)

    ckpt = run_out.with_name(run_out.name + ".ckpt") / "checkpoints" / f"step-{SAVE_EVERY:08d}"
    capped = threading.Event()

    def lower_cap_after_checkpoint() -> None:
        while not capped.is_set():
            if ckpt.is_dir():
                torch.cuda.set_per_process_memory_fraction(cap / total)
                torch.cuda.empty_cache()  # cached blocks would let the next steps reuse memory above the cap
                torch.cuda.reset_peak_memory_stats()
                capped.set()
                print(f"checkpoint {ckpt.name} written: allocator capped at {cap / GiB:.2f} GiB", flush=True)
            time.sleep(0.01)

    watcher = threading.Thread(target=lower_cap_after_checkpoint, daemon=True)
    watcher.start()
    argv = ["train", "--base", str(base), "--train-data", str(a.train), "--val-data", str(a.val), "-o", str(run_out),
            "--gpu_memory_gib", str(round(total / GiB, 1))]
    for k, v in flags.items():
        argv += [f"--{k}", str(v)]
    t0 = time.time()
    rc = cli(argv)
    capped.set()
    summary_file = run_out / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    row.update(rc=rc, seconds=round(time.time() - t0, 1), resumed_from=summary.get("resumed_from"),
               memory_plan=summary.get("memory_plan"), peak_after_cap_gib=round(torch.cuda.max_memory_allocated() / GiB, 2),
               val_loss_after=summary.get("val_loss_after"))
    print(json.dumps(row), flush=True)
    (a.out / "oom_recovery.json").write_text(json.dumps(row, indent=1) + "\n")
    ok = rc == 0 and summary.get("resumed_from") == SAVE_EVERY and (summary.get("memory_plan") or {}).get("stepped_down") is True
    print("OOM RECOVERY", "PASSED" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
