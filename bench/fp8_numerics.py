"""``base_storage: fp8`` against the bf16 base on a real model: the same LoRA run twice through llama-pipe's trainer
(``llama_pipe.train.session.build_session`` + ``train_step``, fast path on, gradient checkpointing), once over the
bf16 base and once over its e4m3 copy; the training loss of every step and the validation loss every ``--eval-every``
steps.

    python bench/fp8_numerics.py --model HF_DIR --tokens TOKENS.npz --out OUT.jsonl [--steps 200] [--rows 4] [--lr 5e-4]
    python bench/fp8_numerics.py --model HF_DIR --make-tokens TOKENS.npz --train-files A.jsonl B.json ... --val-files V.jsonl

``TOKENS.npz`` holds ``train`` and ``val``: rows of token ids (the model's tokenizer). ``--make-tokens`` writes it
the trainer's way: each conversation (JSONL as the data stages write it, or a ShareGPT JSON list) rendered with the
model's chat template (``llama_pipe.train.dataset.encode_record``), cut at ``--seq`` tokens, packed first-fit
(``pack_examples``), the packed rows joined and cut again into rows of exactly ``--seq`` tokens (a broken record of a
raw file is skipped); all tokens are trained (labels = ids). Same seed, same data order,
dropout 0: the two runs differ only in how the frozen base is held. ``--rows x --steps`` over ``len(train)`` rows
gives the epochs (the summary says how many). Prints the summary (final loss = mean of the last 10 steps) as the
last line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def run(model: Path, storage: str, train_rows: Any, val_rows: Any, steps: int, rows: int, lr: float, r: int,
        eval_every: int) -> dict[str, Any]:
    import torch

    from llama_pipe.config import LoraSettings, TrainSettings
    from llama_pipe.train import fast
    from llama_pipe.train.session import build_session, make_accelerator
    from llama_pipe.train.step import train_step

    s = TrainSettings(base_storage=storage, lora=LoraSettings(r=r, alpha=2 * r, dropout=0.0), micro_batch_size=rows,  # type: ignore[arg-type]
                      gradient_checkpointing=True, precision="bf16", device="cuda", lr=lr, warmup_steps=10, max_steps=steps,
                      min_lr_ratio=0.1, max_grad_norm=1.0, seed=0)
    acc, precision = make_accelerator(s)
    torch.manual_seed(0)
    session = build_session(acc, model, s, precision, steps)
    ctx, m = session.ctx, session.model
    report = fast.report(acc.unwrap_model(m)).describe()
    seq = train_rows.shape[1]
    pos = torch.arange(seq).expand(rows, seq).contiguous()

    def batch(ids: Any) -> dict[str, Any]:
        t = torch.as_tensor(ids.astype("int64"))
        return {"input_ids": t, "labels": t.clone(), "position_ids": pos[: t.shape[0]]}

    def val_loss() -> float:
        m.eval()
        tot = cnt = 0.0
        with torch.no_grad():
            for i in range(0, len(val_rows), rows):
                b = {k: v.to(acc.device) for k, v in batch(val_rows[i : i + rows]).items()}
                loss_sum, n = (ctx.loss_fn)(m, b)
                tot, cnt = tot + float(loss_sum), cnt + float(n)
        m.train()
        return tot / cnt

    order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(0)).tolist()
    curve, vals = [], {0: val_loss()}
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        idx = [order[((step - 1) * rows + j) % len(order)] for j in range(rows)]
        b = batch(train_rows[idx])
        curve.append(train_step(ctx, [b], int(b["labels"][:, 1:].numel()), step).loss)
        if step % eval_every == 0 or step == steps:
            vals[step] = val_loss()
    torch.cuda.synchronize()
    out = {"storage": storage, "steps": steps, "rows": rows, "seq": seq, "lr": lr, "r": r, "losses": [round(x, 5) for x in curve],
           "val": {k: round(v, 5) for k, v in vals.items()}, "final_loss": sum(curve[-10:]) / 10, "s": round(time.perf_counter() - t0, 1),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3), "fast_path": report}
    torch.cuda.empty_cache()
    return out


def read_conversations(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file or a JSON list (ShareGPT ``conversations`` of ``from``/``value``)."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return [r for r in json.loads(text) if isinstance(r, dict)]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def make_tokens(model: Path, files: list[Path], seq: int) -> Any:
    """``files``' conversations as rows of exactly ``seq`` token ids (see the module's docstring); an int32 array."""
    import numpy as np
    from transformers import AutoTokenizer

    from llama_pipe.chat_template.resolve import resolve_template
    from llama_pipe.train.dataset import Example, encode_record, pack_examples

    tok = AutoTokenizer.from_pretrained(str(model))
    template = resolve_template(None, [model], tok)
    examples, skipped = [], 0
    for path in files:
        for rec in read_conversations(path):
            try:
                ex = encode_record(rec, tok, template, None)
            except (KeyError, TypeError, ValueError):
                skipped += 1  # not a renderable conversation (a broken record of a raw file)
                continue
            examples.append(Example(ex.input_ids[:seq], ex.labels[:seq]))
    print(f"{len(examples)} conversations tokenized, {skipped} not renderable and skipped", flush=True)
    stream = [t for row in pack_examples(examples, seq) for t in row.input_ids]
    n = len(stream) // seq
    return np.asarray(stream[: n * seq], dtype=np.int32).reshape(n, seq)


def main() -> None:
    import numpy as np

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--tokens", type=Path, help="TOKENS.npz to train on")
    ap.add_argument("--make-tokens", type=Path, help="write TOKENS.npz from --train-files/--val-files and stop")
    ap.add_argument("--train-files", type=Path, nargs="*", default=[])
    ap.add_argument("--val-files", type=Path, nargs="*", default=[])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    if a.make_tokens:
        train, val = make_tokens(a.model, a.train_files, a.seq), make_tokens(a.model, a.val_files, a.seq)
        np.savez(a.make_tokens, train=train, val=val)
        print(f"{a.make_tokens}: train {train.shape}, val {val.shape}", flush=True)
        return
    if a.tokens is None or a.out is None:
        ap.error("--tokens and --out are needed to train (or --make-tokens)")
    data = np.load(a.tokens)
    res = {}
    for storage in ("float", "fp8"):
        res[storage] = run(a.model, storage, data["train"], data["val"], a.steps, a.rows, a.lr, a.r, a.eval_every)
        with open(a.out, "a") as f:
            f.write(json.dumps({"label": a.label, **res[storage]}) + "\n")
        print(f"{storage}: loss {res[storage]['losses'][0]:.4f} -> final {res[storage]['final_loss']:.4f}, val {res[storage]['val']}, "
              f"{res[storage]['s']} s, peak {res[storage]['peak_gib']} GiB", flush=True)
    f, q = res["float"], res["fp8"]
    worst = max(abs(x - y) / y for x, y in zip(q["losses"], f["losses"]))
    last = max(q["val"])
    summary = {"label": a.label, "final_loss_bf16": round(f["final_loss"], 5), "final_loss_fp8": round(q["final_loss"], 5),
               "final_rel_diff": round((q["final_loss"] - f["final_loss"]) / f["final_loss"], 5),
               "val_bf16": f["val"][last], "val_fp8": q["val"][last], "val_rel_diff": round((q["val"][last] - f["val"][last]) / f["val"][last], 5),
               "worst_step_rel_diff": round(worst, 5), "finite": all(math.isfinite(x) for x in q["losses"]),
               "epochs": round(a.steps * a.rows / len(data["train"]), 2)}
    with open(a.out, "a") as fh:
        fh.write(json.dumps({"summary": summary}) + "\n")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
