"""``llama-pipe train``: fine-tune a base on split conversations (LoRA/DoRA over a float, nf4 or int8 base, or full).

Runs the same way in one process and under ``accelerate launch`` / ``torchrun`` (DDP, FSDP,
DeepSpeed through accelerate's config). While running, state lives in ``<OUT>.ckpt/``
(checkpoints + live ``metrics.jsonl``); ``<OUT>`` appears only when the run has finished and its
weights were verified (see :mod:`llama_pipe.train.output`). A rerun of an interrupted run picks up
from the newest valid checkpoint (``resume: auto``).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from llama_pipe.atomic import check_output_dir, is_inside, same_file
from llama_pipe.config import ChatSettings, SelectSettings, TrainSettings, settings_from_args
from llama_pipe.entry import stage_main
from llama_pipe.errors import ConfigError, InputError, OutputError
from llama_pipe.lineage import TRAINED_ON, base_record
from llama_pipe.model_dir import resolve_template
from llama_pipe.records import file_digest
from llama_pipe.settings import add_settings_arguments, describe, to_dict
from llama_pipe.train import fast
from llama_pipe.train.checkpoint import Checkpointer, checkpoint_root
from llama_pipe.train.dataset import StepPlan, collate, load_examples, pack_examples, rank_eval_batches
from llama_pipe.train.finish import write_output
from llama_pipe.train.memory import Planned, is_oom, keep_layers, plan_run, step_down
from llama_pipe.train.model import build_model, count_parameters, resolve_precision
from llama_pipe.train.optim import check_optimizer, fused_adamw_ok, make_optimizer
from llama_pipe.train.output import VerificationError
from llama_pipe.train.retention_probe import FILE as PROBE_FILE
from llama_pipe.train.retention_probe import RetentionProbe
from llama_pipe.train.runstate import Metrics, StoppedBySignal, StopRequest, peak_memory
from llama_pipe.train.step import NonFiniteLoss, StepContext, evaluate, logits_loss_sum, train_step
from llama_pipe.weights.hf import safetensors_files
from llama_pipe.weights.tokenizer import load_tokenizer
from llama_pipe.weights.validate import check_model_weights, refuse_remote_code

__all__ = ["Metrics", "StopRequest", "StoppedBySignal", "add_arguments", "peak_memory", "run", "train"]

log = logging.getLogger("llama_pipe.train")

# Settings that do not change what is computed, so a checkpoint stays usable when they change.
# The memory plan (checkpointing, micro-batch split) changes how, not what; the planned optimiser goes in.
_NOT_IN_FINGERPRINT = ("resume", "keep_checkpoints", "save_every", "eval_every", "run", "memory", "gpu_memory_gib",
                       "gradient_checkpointing")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, type=Path, metavar="HF_DIR", help="Hugging Face base model directory (with tokenizer)")
    parser.add_argument("--train-data", required=True, type=Path, metavar="TRAIN", help="training JSONL (from `llama-pipe gather`)")
    parser.add_argument("--val-data", required=True, type=Path, metavar="VAL", help="validation JSONL")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="run directory (the workflow's is results/<run>/train)")
    add_settings_arguments(parser, TrainSettings, "train")
    add_settings_arguments(parser, ChatSettings, "chat", config_flag=False)
    add_settings_arguments(parser, SelectSettings, "select", config_flag=False)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, TrainSettings, "train")
    chat = settings_from_args(args, ChatSettings, "chat")
    select = settings_from_args(args, SelectSettings, "select")
    try:
        summary = train(args.base, args.train_data, args.val_data, args.output, settings, chat, select=select)
    except (NonFiniteLoss, VerificationError) as exc:
        print(f"llama-pipe train: error: {exc} (checkpoints kept in {args.output}.ckpt)", file=sys.stderr)
        return 1
    except StoppedBySignal as exc:
        print(f"llama-pipe train: {exc}", file=sys.stderr)
        return 143
    if summary.get("is_main", True):
        print(
            f"train: {summary['steps']} steps ({summary['method']}, {summary['base_storage']} base), val loss {summary['val_loss_before']:.4f} -> "
            f"{summary['val_loss_after']:.4f}, {summary['train_tokens']} tokens, {summary['wall_s']:.1f} s"
            f"{' (resumed from step ' + str(summary['resumed_from']) + ')' if summary['resumed_from'] else ''} -> {args.output}"
        )
    return 0


def make_accelerator(settings: TrainSettings) -> tuple[Any, str]:
    """An ``Accelerator`` for ``settings.device``/``precision`` (DDP/FSDP/DeepSpeed come from the launcher)."""
    import torch
    from accelerate import Accelerator

    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA GPU is visible")
    cpu = settings.device == "cpu" or not torch.cuda.is_available()
    precision = resolve_precision(settings.precision, "cpu" if cpu else "cuda")
    acc = Accelerator(
        cpu=cpu,
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision],
        gradient_accumulation_steps=settings.grad_accum,
    )
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is not None:  # no dataloader is prepared, so DeepSpeed's "auto" values come from us
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = settings.micro_batch_size
        ds["gradient_accumulation_steps"] = settings.grad_accum
        ds["gradient_clipping"] = settings.max_grad_norm
        ds["train_batch_size"] = settings.micro_batch_size * settings.grad_accum * acc.num_processes
    return acc, precision


def fingerprint(settings: TrainSettings, chat: ChatSettings, base: Path, train_path: Path, val_path: Path, world_size: int) -> str:
    """Identifies what a checkpoint was computed from: settings, data, base config, process count."""
    s = {k: v for k, v in to_dict(settings).items() if k not in _NOT_IN_FINGERPRINT}
    base_cfg = (base / "config.json").read_text(encoding="utf-8") if (base / "config.json").is_file() else ""
    blob = json.dumps([s, to_dict(chat), file_digest(train_path), file_digest(val_path), base_cfg, world_size], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def lr_lambda_for(total: int, warmup: int, min_ratio: float) -> Any:
    """Linear warm-up to 1, then cosine down to ``min_ratio`` at step ``total``."""
    import math

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        span = max(total - warmup, 1)
        progress = min(max(step - warmup, 0) / span, 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def apply_fast_path(acc: Any, model: Any, settings: TrainSettings, options: fast.FastOptions | None = None) -> Any:
    """Patch the prepared model with ``train.kernels`` (GPU only); returns its loss function or None.

    Must run after the model is on its device and gradient checkpointing is enabled. On one
    GPU and under DDP (every process holds the whole model and the loss is computed inside the
    wrapped forward); left off under FSDP and DeepSpeed, whose sharded parameters it was never
    checked with. ``options`` (tests and benchmarks) replaces what ``train.kernels`` asks for,
    on CPU too (``FastOptions(cpu=True)`` turns on the levers that run there).
    """
    from accelerate.utils import DistributedType

    wanted: fast.FastOptions | fast.KernelsSetting = options if options is not None else settings.kernels
    if options is None and (settings.kernels == "none" or acc.device.type != "cuda"):
        return None
    if acc.num_processes > 1 and acc.distributed_type != DistributedType.MULTI_GPU:
        log.info("train.kernels=%s left off: the fast path runs on one GPU or under DDP, not under %s",
                 settings.kernels, acc.distributed_type)
        return None
    inner = acc.unwrap_model(model)
    fast.apply(inner, wanted)
    log.info("fast path: %s", fast.report(inner).describe())
    return fast.model_loss_sum


def progress_line(step: int, total: int, start: int, loss: float, tokens_per_s: float | None, elapsed: float) -> str:
    """``step 3/12: loss 2.1034, 812 tok/s, 41 s elapsed, ETA 2 min 03 s`` (ETA from this run's own pace)."""
    done = step - start
    eta = elapsed / done * (total - step) if done > 0 else float("nan")

    def span(s: float) -> str:
        if s != s:  # NaN
            return "?"
        m, sec = divmod(int(round(s)), 60)
        return f"{m} min {sec:02d} s" if m else f"{sec} s"

    rate = f"{tokens_per_s:,.0f} tok/s" if tokens_per_s else "? tok/s"
    return f"step {step}/{total}: loss {loss:.4f}, {rate}, {span(elapsed)} elapsed, ETA {span(eta)}"


def describe_plan(planned: Planned) -> str:
    """The plan in words (for logs and the summary)."""
    if planned.plan is None:
        s = planned.settings
        return f"micro-batch {s.micro_batch_size} x {s.grad_accum}, checkpointing {s.gradient_checkpointing}, optimizer {s.optimizer}"
    return planned.plan.describe(planned.layers)


def check_run_paths(out: Path, sources: list[Path]) -> None:
    """Refuse an ``out`` (or its ``<OUT>.ckpt``, removed on a fresh start) that is or holds one of
    ``sources``, or holds files train did not write: an OutputError, exit 2, before training."""
    check_output_dir(out, sources, "train")
    root = checkpoint_root(out)
    for src in sources:
        if same_file(root, src) or is_inside(src, root):
            raise OutputError(f"{root}: the run's checkpoint directory holds the input {src}; a fresh start would delete it; "
                              "give another -o")
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        raise OutputError(f"{root}: the run's checkpoint directory is a file or a link; remove it or give another -o")
    if root.is_dir():
        # what train writes there: checkpoints, snapshots, the live metrics, restart_at's temporary
        foreign = sorted(p.name for p in root.iterdir() if p.name not in ("checkpoints", "snapshots", "metrics.jsonl", "metrics.tmp", PROBE_FILE))
        if foreign:
            raise OutputError(f"{root}: holds {foreign[0]!r}, which train did not write; a fresh start would delete it; "
                              "move it out or give another -o")


def train(
    base: Path, train_path: Path, val_path: Path, out: Path, settings: TrainSettings, chat: ChatSettings | None = None,
    loss_fn: Any = None, fast_options: fast.FastOptions | None = None, select: SelectSettings | None = None,
) -> dict[str, Any]:
    """Train and write ``out``; returns the summary (also written to ``out/summary.json``).

    ``chat``: how conversations are rendered (template, system prompt, row length); None: the defaults.
    ``fast_options``: the fast path's levers instead of ``train.kernels`` (tests and benchmarks; see
    :func:`apply_fast_path`). ``select``: whether and on what retention is scored during training
    (:mod:`llama_pipe.train.retention_probe`); None: not scored."""
    chat = chat or ChatSettings()
    import torch
    from accelerate.utils import DistributedType, set_seed
    from tqdm.auto import tqdm

    t_start = time.time()
    base, train_path, val_path, out = Path(base), Path(train_path), Path(val_path), Path(out)
    check_run_paths(out, [base, train_path, val_path])  # before hours of training, not after
    if not (base / "config.json").is_file():
        raise InputError(
            f"{base}: not a Hugging Face model directory (no config.json); --base must be the output of "
            "`llama-pipe convert` (results/hf_base) or a downloaded HF model"
        )
    refuse_remote_code(base, settings.trust_remote_code)  # an auto_map: exit 2 naming the setting, never a prompt
    check_model_weights(base, safetensors_files(base))  # lying headers / absurd config.json: exit 2 before anything loads
    # What this run trains on (recorded in train_config.json; merge-adapter checks it): the base's
    # weights fingerprint and, for a merged model, the adapters merged into it.
    base_on = base_record(base)
    acc, precision = make_accelerator(settings)
    main = acc.is_main_process
    if not main:
        logging.getLogger().setLevel(logging.WARNING)
    if acc.distributed_type == DistributedType.DEEPSPEED and settings.on_nonfinite == "skip":
        raise ConfigError("train.on_nonfinite: 'skip' is not supported under DeepSpeed (its engine steps by itself)")
    check_optimizer(settings, acc)  # what the user fixed, as given
    user_settings = settings
    sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    planned = plan_run(settings, chat.max_seq_len, base, acc.device.type, acc.num_processes, sharded)
    settings = planned.settings
    check_optimizer(settings, acc)  # and what the planner chose
    log.info("train settings:\n%s\nchat settings:\n%s", describe(user_settings), describe(chat))
    log.info("training on %s", base_on.lineage.describe())
    if settings.base_run is not None:
        log.info("train.base_run %s (the workflow's choice of --base): training on --base %s", settings.base_run, base)
    if settings.trust_remote_code:
        log.warning("train.trust_remote_code is true: Python code shipped with %s will run in this process", base)
    log.info("device %s, %d process(es), precision %s, %s", acc.device, acc.num_processes, precision, acc.distributed_type)

    set_seed(settings.seed)
    tokenizer = load_tokenizer(base, trust_remote_code=settings.trust_remote_code)
    template = resolve_template(chat.template, [base], tokenizer)
    train_ex, train_stats = load_examples(train_path, tokenizer, template, chat.max_seq_len, chat.system_prompt)
    val_ex, val_stats = load_examples(val_path, tokenizer, template, chat.max_seq_len, chat.system_prompt)
    log.info("%s", train_stats.line())
    log.info("%s", val_stats.line())
    rows = pack_examples(train_ex, chat.max_seq_len, settings.packing)
    val_rows = pack_examples(val_ex, chat.max_seq_len, settings.packing)
    plan = StepPlan(len(rows), settings.micro_batch_size, settings.grad_accum, acc.num_processes, settings.seed)
    total = plan.total_steps(settings.max_steps, settings.epochs)
    log.info("%d training rows (packing %s), %d rows per step, %d steps (%.2f epochs)",
             len(rows), settings.packing, plan.global_rows, total, plan.epoch_of(total))
    if len(rows) < plan.global_rows:
        log.warning("only %d training rows for %d rows per step: every step repeats rows", len(rows), plan.global_rows)
    pad = tokenizer.pad_token_id
    flat = settings.attn_implementation == "flash_attention_2"  # see dataset.collate

    root = checkpoint_root(out)
    fp = fingerprint(replace(user_settings, optimizer=settings.optimizer, optimizer_in_backward=settings.optimizer_in_backward),
                     chat, base, train_path, val_path, acc.num_processes)
    device_type = "cuda" if acc.device.type == "cuda" else "cpu"
    progress = {"step": 0}
    probe = None
    if select is not None and select.retention:
        if acc.num_processes == 1:
            probe = RetentionProbe(select, tokenizer, template, chat.system_prompt, root / PROBE_FILE)
        else:
            log.info("select.retention: not scored with %d processes (select keeps the last step)", acc.num_processes)

    def attempt(run_plan: Planned, resume: str) -> tuple[Any, float, float, int, int, int, int]:
        """Build, resume and train under one plan; returns the model and what the summary needs."""
        settings = run_plan.settings
        acc.gradient_accumulation_steps = settings.grad_accum
        plan = StepPlan(len(rows), settings.micro_batch_size, settings.grad_accum, acc.num_processes, settings.seed)
        val_batches = rank_eval_batches(val_rows, acc.process_index, acc.num_processes, settings.micro_batch_size, pad, flat)
        model = build_model(base, settings, acc.device, precision)
        if run_plan.plan is not None and settings.gradient_checkpointing:
            keep_layers(model, run_plan.plan.keep_layers)
        trainable, n_params = count_parameters(model)
        log.info("%s over a %s base: %d trainable of %d parameters (%.3f%%)", settings.method, settings.base_storage,
                 trainable, n_params, 100 * trainable / max(n_params, 1))
        optimizer = make_optimizer(model, settings, fused=fused_adamw_ok(acc))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(total, settings.warmup_steps, settings.min_lr_ratio))
        model, optimizer = acc.prepare(model, optimizer)
        # The scheduler's state goes into trainer_state.json, not through accelerate's
        # register_for_checkpointing: accelerate reloads registered objects with an unrestricted
        # pickle (weights_only=False), which would run code planted in a checkpoint directory.
        step_loss = loss_fn or apply_fast_path(acc, model, settings, fast_options)
        model.train()
        ctx = StepContext(acc, model, optimizer, scheduler, settings.max_grad_norm, settings.on_nonfinite, step_loss or logits_loss_sum)

        ckpt = Checkpointer(acc, root, settings.keep_checkpoints, fp)
        metrics = Metrics(root / "metrics.jsonl", main)
        start, val_before, resumed_from, tokens_before = 0, None, 0, 0
        found = ckpt.latest() if resume == "auto" else None
        if found is not None:
            state = ckpt.load(found, model)
            scheduler.load_state_dict(state["scheduler"])
            start, val_before, resumed_from = int(state["step"]), state["val_loss_before"], int(state["step"])
            tokens_before = int(state.get("train_tokens", 0))
            metrics.restart_at(start)
            log.info("resumed from %s (step %d of %d)", found, start, total)
        else:
            if main and root.exists():
                log.warning("starting fresh: removing %s (no valid checkpoint of this configuration there)", root)
                shutil.rmtree(root)
            acc.wait_for_everyone()
            if main:
                root.mkdir(parents=True, exist_ok=True)
        if device_type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if val_before is None:
            val_before = evaluate(ctx, val_batches)
            metrics.write({"step": 0, "val_loss": val_before})
            log.info("validation loss before training: %.4f", val_before)
            if probe is not None:  # the adapters are still zero: this is the base's score
                probe.score(acc, model, 0)
        val_loss, tokens_total = val_before, tokens_before
        bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=None if main else True)
        stop = StopRequest.install()
        loop_t0 = time.perf_counter()
        try:
            for step in range(start, total):
                ids = plan.step_rows(step)
                global_targets = sum(rows[i].n_targets for i in ids)
                micro = [collate([rows[i] for i in mb], pad, flatten=flat) for mb in plan.rank_micro_batches(step, acc.process_index)]
                progress["step"] = step + 1
                t0 = time.perf_counter()
                res = train_step(ctx, micro, global_targets, step + 1)
                dt = time.perf_counter() - t0
                rate = res.tokens / dt if dt > 0 else None
                tokens_total += res.tokens
                mem, mem_kind = peak_memory(device_type)
                row = {"step": step + 1, "loss": res.loss, "lr": res.lr, "grad_norm": res.grad_norm,
                       "tokens_per_s": rate, "target_tokens": res.target_tokens,
                       "peak_mem_bytes": mem, "peak_mem_kind": mem_kind, "epoch": round(plan.epoch_of(step + 1), 4)}
                if res.skipped:
                    row["skipped"] = True
                    log.warning("step %d: non-finite loss or gradient, step skipped (train.on_nonfinite: skip)", step + 1)
                metrics.write(row)
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss:.4f}", val=f"{val_loss:.4f}", tok_s=f"{rate or 0:.0f}")
                if bar.disable and main:  # no terminal (a log file, SLURM): one line per step instead of the bar
                    log.info("%s", progress_line(step + 1, total, start, res.loss, rate, time.perf_counter() - loop_t0))
                if (step + 1) % settings.eval_every == 0 or step + 1 == total:
                    val_loss = evaluate(ctx, val_batches)
                    metrics.write({"step": step + 1, "val_loss": val_loss})
                    if probe is not None:
                        probe.score(acc, model, step + 1)
                    if step + 1 < total:  # the last step's adapter is the run's own
                        ckpt.snapshot(step + 1, model)
                    log.info("step %d: loss %.4f, val loss %.4f", step + 1, res.loss, val_loss)
                stopping = stop.requested(acc)
                if ((step + 1) % settings.save_every == 0 and step + 1 < total) or stopping:
                    ckpt.save(step + 1, model, {"rows_consumed": (step + 1) * plan.global_rows, "epoch": plan.epoch_of(step + 1),
                                                "val_loss_before": val_before, "train_tokens": tokens_total,
                                                "scheduler": scheduler.state_dict()})
                if stopping:
                    raise StoppedBySignal(f"stopped by SIGTERM after step {step + 1} of {total}; checkpoint saved in {root}, "
                                          "run the same command again to resume")
        finally:
            stop.restore()
            bar.close()
        if start == total:  # resumed from the last step's checkpoint: nothing left but the final eval
            val_loss = evaluate(ctx, val_batches)
        return model, val_before, val_loss, tokens_total, resumed_from, trainable, n_params

    try:
        model, val_before, val_loss, tokens_total, resumed_from, trainable, n_params = attempt(planned, settings.resume)
        stepped = None
    except Exception as exc:  # noqa: BLE001 - only an out-of-memory error is handled, the rest re-raised
        stepped = step_down(planned) if is_oom(exc) and acc.num_processes == 1 else None
        if stepped is None:
            if is_oom(exc):
                log.error("out of memory at step %d with %s; no smaller plan to step down to (train.memory: %s)",
                          progress["step"], describe_plan(planned), settings.memory)
            raise
        log.warning("out of memory at step %d with %s (predicted %s); stepping the plan down once to %s (predicted %s) "
                    "and resuming from the last checkpoint", progress["step"], describe_plan(planned),
                    planned.prediction.describe() if planned.prediction else "?", describe_plan(stepped),
                    stepped.prediction.describe() if stepped.prediction else "?")
    if stepped is not None:
        acc.free_memory()
        gc.collect()
        if device_type == "cuda":
            torch.cuda.empty_cache()
        planned, settings = stepped, stepped.settings
        model, val_before, val_loss, tokens_total, resumed_from, trainable, n_params = attempt(planned, "auto")
    memory_plan = {"plan": describe_plan(planned), "memory": settings.memory, "stepped_down": stepped is not None}
    if planned.prediction is not None:
        memory_plan.update(predicted_peak_bytes=planned.prediction.peak, budget_bytes=planned.budget)
    summary = {
        "run": settings.run, "method": settings.method, "base_storage": settings.base_storage, "steps": total, "resumed_from": resumed_from,
        "val_loss_before": val_before, "val_loss_after": val_loss, "train_tokens": tokens_total,
        "train_rows": len(rows), "val_rows": len(val_rows), "processes": acc.num_processes, "precision": precision,
        "device": str(acc.device), "trainable_params": trainable, "total_params": n_params,
        "peak_mem_bytes": peak_memory(device_type)[0], "wall_s": time.time() - t_start,
        "data": {"train": vars(train_stats), "val": vars(val_stats)}, "memory_plan": memory_plan,
    }
    write_output(acc, model, tokenizer, template, settings, chat, summary, base, out, root,
                 {"base": str(base), "train_data": str(train_path), "val_data": str(val_path), TRAINED_ON: base_on.to_json()})
    summary["is_main"] = main
    return summary


if __name__ == "__main__":  # pragma: no cover - `python -m llama_pipe.train.loop` under a launcher
    sys.exit(stage_main("train"))
