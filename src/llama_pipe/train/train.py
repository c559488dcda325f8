"""``llama-pipe train``: fine-tune a base on split conversations (LoRA/DoRA over a float, nf4 or int8 base, or full).

A run is a :class:`TrainRun` in named steps: :meth:`~TrainRun.setup` (checks, accelerator, memory
plan, data), :meth:`~TrainRun.attempt` (the model built by
:func:`llama_pipe.train.session.build_session`, :meth:`~TrainRun.resume`, :meth:`~TrainRun.fit`),
once more under a smaller plan after an out-of-memory error (:meth:`~TrainRun.attempts`), and
:meth:`~TrainRun.finish` (summary, verified output). :func:`train` runs them in that order.

Runs the same way in one process and under ``accelerate launch`` / ``torchrun`` (DDP, FSDP,
DeepSpeed through accelerate's config). While running, state lives in ``<OUT>.ckpt/``
(checkpoints + live ``metrics.jsonl``); ``<OUT>`` appears only when the run has finished and its
weights were verified (see :mod:`llama_pipe.train.output`). A rerun of an interrupted run picks up
from the newest valid checkpoint (``resume: auto``).
"""

from __future__ import annotations

import argparse
import gc
import logging
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llama_pipe.chat_template.resolve import resolve_template
from llama_pipe.config import ChatSettings, SelectSettings, TrainSettings, settings_from_args
from llama_pipe.core.errors import ConfigError
from llama_pipe.core.settings import add_settings_arguments, describe
from llama_pipe.models.lineage import TRAINED_ON, base_record
from llama_pipe.models.model_dir import check_model_dir
from llama_pipe.train import fast
from llama_pipe.train.checkpoint import Checkpointer, check_run_paths, checkpoint_root, fingerprint
from llama_pipe.train.dataset import StepPlan, collate, load_examples, pack_examples, rank_eval_batches
from llama_pipe.train.finish import write_output
from llama_pipe.train.memory import Planned, is_oom, plan_run, step_down
from llama_pipe.train.optim import check_optimizer
from llama_pipe.train.output import VerificationError
from llama_pipe.train.retention_probe import FILE as PROBE_FILE
from llama_pipe.train.retention_probe import RetentionProbe, weights_to_try
from llama_pipe.train.runstate import Metrics, StoppedBySignal, StopRequest, peak_memory, progress_line
from llama_pipe.train.session import Session, build_session, make_accelerator
from llama_pipe.train.step import NonFiniteLoss, evaluate, train_step
from llama_pipe.weights.tokenizer import load_tokenizer

__all__ = ["Attempt", "Metrics", "StopRequest", "StoppedBySignal", "TrainRun", "add_arguments", "peak_memory", "run", "train"]

log = logging.getLogger("llama_pipe.train")


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


def describe_plan(planned: Planned) -> str:
    """The plan in words (for logs and the summary)."""
    if planned.plan is None:
        s = planned.settings
        return f"micro-batch {s.micro_batch_size} x {s.grad_accum}, checkpointing {s.gradient_checkpointing}, optimizer {s.optimizer}"
    return planned.plan.describe(planned.layers)


@dataclass
class Attempt:
    """What one attempt leaves for the summary."""

    model: Any
    val_before: float
    val_loss: float
    tokens: int
    resumed_from: int
    trainable: int
    n_params: int


@dataclass
class Resumed:
    """Where an attempt starts: the step, the validation loss before training (None: not measured
    yet), the step resumed from (0: a fresh start) and the tokens trained before it."""

    start: int
    val_before: float | None
    resumed_from: int
    tokens: int
    ckpt: Checkpointer
    metrics: Metrics


@dataclass
class TrainRun:
    """One ``llama-pipe train`` run, set up and ready to attempt (the module docstring names the steps)."""

    base: Path
    train_path: Path
    val_path: Path
    out: Path
    planned: Planned
    chat: ChatSettings
    acc: Any
    precision: str
    tokenizer: Any
    template: Any
    rows: list[Any]
    val_rows: list[Any]
    total: int
    stats: dict[str, Any]
    base_on: Any
    fingerprint: str
    probe: RetentionProbe | None
    loss_fn: Any = None
    fast_options: fast.FastOptions | None = None
    started: float = 0.0
    at_step: int = 0

    @property
    def settings(self) -> TrainSettings:
        """The settings of the plan in force (the planner's; after a step-down, the smaller plan's)."""
        return self.planned.settings

    @property
    def root(self) -> Path:
        return checkpoint_root(self.out)

    @property
    def device_type(self) -> str:
        return "cuda" if self.acc.device.type == "cuda" else "cpu"

    @classmethod
    def setup(cls, base: Path, train_path: Path, val_path: Path, out: Path, settings: TrainSettings, chat: ChatSettings,
              select: SelectSettings | None = None, loss_fn: Any = None, fast_options: fast.FastOptions | None = None) -> TrainRun:
        """Every check that can fail before hours of training, the accelerator, the memory plan and the data."""
        from accelerate.utils import DistributedType, set_seed

        started = time.time()
        base, train_path, val_path, out = Path(base), Path(train_path), Path(val_path), Path(out)
        check_run_paths(out, [base, train_path, val_path])
        check_model_dir(base, "base model", settings.trust_remote_code)  # exit 2 before anything loads
        # What this run trains on (recorded in train_config.json; merge-adapter checks it): the base's
        # weights fingerprint and, for a merged model, the adapters merged into it.
        base_on = base_record(base)
        acc, precision = make_accelerator(settings)
        if not acc.is_main_process:
            logging.getLogger().setLevel(logging.WARNING)
        if acc.distributed_type == DistributedType.DEEPSPEED and settings.on_nonfinite == "skip":
            raise ConfigError("train.on_nonfinite: 'skip' is not supported under DeepSpeed (its engine steps by itself)")
        check_optimizer(settings, acc)  # what the user fixed, as given
        sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        planned = plan_run(settings, chat.max_seq_len, base, acc.device.type, acc.num_processes, sharded)
        s = planned.settings
        check_optimizer(s, acc)  # and what the planner chose
        log.info("train settings:\n%s\nchat settings:\n%s", describe(settings), describe(chat))
        log.info("training on %s", base_on.lineage.describe())
        if s.base_run is not None:
            log.info("train.base_run %s (the workflow's choice of --base): training on --base %s", s.base_run, base)
        if s.trust_remote_code:
            log.warning("train.trust_remote_code is true: Python code shipped with %s will run in this process", base)
        log.info("device %s, %d process(es), precision %s, %s", acc.device, acc.num_processes, precision, acc.distributed_type)

        set_seed(s.seed)
        tokenizer = load_tokenizer(base, trust_remote_code=s.trust_remote_code)
        template = resolve_template(chat.template, [base], tokenizer)
        train_ex, train_stats = load_examples(train_path, tokenizer, template, chat.max_seq_len, chat.system_prompt)
        val_ex, val_stats = load_examples(val_path, tokenizer, template, chat.max_seq_len, chat.system_prompt)
        log.info("%s", train_stats.line())
        log.info("%s", val_stats.line())
        rows = pack_examples(train_ex, chat.max_seq_len, s.packing)
        val_rows = pack_examples(val_ex, chat.max_seq_len, s.packing)
        plan = StepPlan(len(rows), s.micro_batch_size, s.grad_accum, acc.num_processes, s.seed)
        total = plan.total_steps(s.max_steps, s.epochs)
        log.info("%d training rows (packing %s), %d rows per step, %d steps (%.2f epochs)",
                 len(rows), s.packing, plan.global_rows, total, plan.epoch_of(total))
        if len(rows) < plan.global_rows:
            log.warning("only %d training rows for %d rows per step: every step repeats rows", len(rows), plan.global_rows)
        fp = fingerprint(replace(settings, optimizer=s.optimizer, optimizer_in_backward=s.optimizer_in_backward),
                         chat, base, train_path, val_path, acc.num_processes)
        probe = None
        if select is not None and select.retention:
            if acc.num_processes == 1:
                weights = weights_to_try(select) if s.method == "lora" else None  # what select can scale
                probe = RetentionProbe(select, tokenizer, template, chat.system_prompt, checkpoint_root(out) / PROBE_FILE, weights)
            else:
                log.info("select.retention: not scored with %d processes (select keeps the last step)", acc.num_processes)
        return cls(base, train_path, val_path, out, planned, chat, acc, precision, tokenizer, template, rows, val_rows, total,
                   {"train": vars(train_stats), "val": vars(val_stats)}, base_on, fp, probe, loss_fn, fast_options, started)

    def step_plan(self) -> StepPlan:
        """Which rows each step and micro-batch takes, under the plan in force."""
        s = self.settings
        return StepPlan(len(self.rows), s.micro_batch_size, s.grad_accum, self.acc.num_processes, s.seed)

    def resume(self, session: Session, resume: str) -> Resumed:
        """Load the newest valid checkpoint of this configuration (``resume: auto``), else start fresh
        (removing what an earlier configuration left in the checkpoint directory)."""
        ckpt = Checkpointer(self.acc, self.root, self.settings.keep_checkpoints, self.fingerprint)
        metrics = Metrics(self.root / "metrics.jsonl", self.acc.is_main_process)
        found = ckpt.latest() if resume == "auto" else None
        if found is not None:
            state = ckpt.load(found, session.model)
            session.scheduler.load_state_dict(state["scheduler"])
            start = int(state["step"])
            metrics.restart_at(start)
            log.info("resumed from %s (step %d of %d)", found, start, self.total)
            return Resumed(start, state["val_loss_before"], start, int(state.get("train_tokens", 0)), ckpt, metrics)
        if self.acc.is_main_process and self.root.exists():
            log.warning("starting fresh: removing %s (no valid checkpoint of this configuration there)", self.root)
            shutil.rmtree(self.root)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
        return Resumed(0, None, 0, 0, ckpt, metrics)

    def attempt(self, resume: str) -> Attempt:
        """Build the model under the plan in force, resume and fit."""
        self.acc.gradient_accumulation_steps = self.settings.grad_accum
        keep = self.planned.plan.keep_layers if self.planned.plan is not None else None
        session = build_session(self.acc, self.base, self.settings, self.precision, self.total, keep, self.loss_fn, self.fast_options)
        return self.fit(session, self.resume(session, resume))

    def fit(self, session: Session, at: Resumed) -> Attempt:
        """The steps from ``at.start`` to the end: validation before (unless resumed), each step's
        metrics, validation and a snapshot every ``eval_every``, a checkpoint every ``save_every``
        and on SIGTERM."""
        import torch
        from tqdm.auto import tqdm

        acc, s, total, main = self.acc, self.settings, self.total, self.acc.is_main_process
        plan, pad = self.step_plan(), self.tokenizer.pad_token_id
        flat = s.attn_implementation == "flash_attention_2"  # see dataset.collate
        val_batches = rank_eval_batches(self.val_rows, acc.process_index, acc.num_processes, s.micro_batch_size, pad, flat)
        if self.device_type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        val_before = at.val_before
        if val_before is None:
            val_before = evaluate(session.ctx, val_batches)
            at.metrics.write({"step": 0, "val_loss": val_before})
            log.info("validation loss before training: %.4f", val_before)
            if self.probe is not None:  # the adapters are still zero: this is the base's score
                self.probe.score(acc, session.model, 0)
        val_loss, tokens_total = val_before, at.tokens
        bar = tqdm(total=total, initial=at.start, desc="train", unit="step", disable=None if main else True)
        stop = StopRequest.install()
        loop_t0 = time.perf_counter()
        try:
            for step in range(at.start, total):
                ids = plan.step_rows(step)
                global_targets = sum(self.rows[i].n_targets for i in ids)
                micro = [collate([self.rows[i] for i in mb], pad, flatten=flat) for mb in plan.rank_micro_batches(step, acc.process_index)]
                self.at_step = step + 1
                t0 = time.perf_counter()
                res = train_step(session.ctx, micro, global_targets, step + 1)
                dt = time.perf_counter() - t0
                rate = res.tokens / dt if dt > 0 else None
                tokens_total += res.tokens
                mem, mem_kind = peak_memory(self.device_type)
                row = {"step": step + 1, "loss": res.loss, "lr": res.lr, "grad_norm": res.grad_norm,
                       "tokens_per_s": rate, "target_tokens": res.target_tokens,
                       "peak_mem_bytes": mem, "peak_mem_kind": mem_kind, "epoch": round(plan.epoch_of(step + 1), 4)}
                if res.skipped:
                    row["skipped"] = True
                    log.warning("step %d: non-finite loss or gradient, step skipped (train.on_nonfinite: skip)", step + 1)
                at.metrics.write(row)
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss:.4f}", val=f"{val_loss:.4f}", tok_s=f"{rate or 0:.0f}")
                if bar.disable and main:  # no terminal (a log file, SLURM): one line per step instead of the bar
                    log.info("%s", progress_line(step + 1, total, at.start, res.loss, rate, time.perf_counter() - loop_t0))
                if (step + 1) % s.eval_every == 0 or step + 1 == total:
                    val_loss = evaluate(session.ctx, val_batches)
                    at.metrics.write({"step": step + 1, "val_loss": val_loss})
                    if self.probe is not None:
                        self.probe.score(acc, session.model, step + 1)
                    if step + 1 < total:  # the last step's adapter is the run's own
                        at.ckpt.snapshot(step + 1, session.model)
                    log.info("step %d: loss %.4f, val loss %.4f", step + 1, res.loss, val_loss)
                stopping = stop.requested(acc)
                if ((step + 1) % s.save_every == 0 and step + 1 < total) or stopping:
                    at.ckpt.save(step + 1, session.model, {"rows_consumed": (step + 1) * plan.global_rows, "epoch": plan.epoch_of(step + 1),
                                                           "val_loss_before": val_before, "train_tokens": tokens_total,
                                                           "scheduler": session.scheduler.state_dict()})
                if stopping:
                    raise StoppedBySignal(f"stopped by SIGTERM after step {step + 1} of {total}; checkpoint saved in {self.root}, "
                                          "run the same command again to resume")
        finally:
            stop.restore()
            bar.close()
        if at.start == total:  # resumed from the last step's checkpoint: nothing left but the final eval
            val_loss = evaluate(session.ctx, val_batches)
        return Attempt(session.model, val_before, val_loss, tokens_total, at.resumed_from, session.trainable, session.n_params)

    def attempts(self) -> tuple[Attempt, bool]:
        """:meth:`attempt` under the plan, and once more under a smaller plan (resuming from the last
        checkpoint) after an out-of-memory error in one process; returns it and whether it stepped down."""
        import torch

        planned = self.planned
        try:
            return self.attempt(self.settings.resume), False
        except Exception as exc:  # noqa: BLE001 - only an out-of-memory error is handled, the rest re-raised
            stepped = step_down(planned) if is_oom(exc) and self.acc.num_processes == 1 else None
            if stepped is None:
                if is_oom(exc):
                    log.error("out of memory at step %d with %s; no smaller plan to step down to (train.memory: %s)",
                              self.at_step, describe_plan(planned), self.settings.memory)
                raise
            log.warning("out of memory at step %d with %s (predicted %s); stepping the plan down once to %s (predicted %s) "
                        "and resuming from the last checkpoint", self.at_step, describe_plan(planned),
                        planned.prediction.describe() if planned.prediction else "?", describe_plan(stepped),
                        stepped.prediction.describe() if stepped.prediction else "?")
        self.acc.free_memory()
        gc.collect()
        if self.device_type == "cuda":
            torch.cuda.empty_cache()
        self.planned = stepped
        return self.attempt("auto"), True

    def finish(self, done: Attempt, stepped_down: bool) -> dict[str, Any]:
        """The summary, and the run's output written and verified (:mod:`llama_pipe.train.finish`)."""
        s, planned = self.settings, self.planned
        memory_plan: dict[str, Any] = {"plan": describe_plan(planned), "memory": s.memory, "stepped_down": stepped_down}
        if planned.prediction is not None:
            memory_plan.update(predicted_peak_bytes=planned.prediction.peak, budget_bytes=planned.budget)
        summary = {
            "run": s.run, "method": s.method, "base_storage": s.base_storage, "steps": self.total, "resumed_from": done.resumed_from,
            "val_loss_before": done.val_before, "val_loss_after": done.val_loss, "train_tokens": done.tokens,
            "train_rows": len(self.rows), "val_rows": len(self.val_rows), "processes": self.acc.num_processes, "precision": self.precision,
            "device": str(self.acc.device), "trainable_params": done.trainable, "total_params": done.n_params,
            "peak_mem_bytes": peak_memory(self.device_type)[0], "wall_s": time.time() - self.started,
            "data": self.stats, "memory_plan": memory_plan,
        }
        write_output(self.acc, done.model, self.tokenizer, self.template, s, self.chat, summary, self.base, self.out, self.root,
                     {"base": str(self.base), "train_data": str(self.train_path), "val_data": str(self.val_path), TRAINED_ON: self.base_on.to_json()})
        summary["is_main"] = self.acc.is_main_process
        return summary


def train(
    base: Path, train_path: Path, val_path: Path, out: Path, settings: TrainSettings, chat: ChatSettings | None = None,
    loss_fn: Any = None, fast_options: fast.FastOptions | None = None, select: SelectSettings | None = None,
) -> dict[str, Any]:
    """Train and write ``out``; returns the summary (also written to ``out/summary.json``).

    ``chat``: how conversations are rendered (template, system prompt, row length); None: the defaults.
    ``fast_options``: the fast path's levers instead of ``train.kernels`` (tests and benchmarks; see
    :func:`llama_pipe.train.session.apply_fast_path`). ``select``: whether and on what retention is
    scored during training (:mod:`llama_pipe.train.retention_probe`); None: not scored."""
    run = TrainRun.setup(base, train_path, val_path, out, settings, chat or ChatSettings(), select, loss_fn, fast_options)
    done, stepped_down = run.attempts()
    return run.finish(done, stepped_down)

