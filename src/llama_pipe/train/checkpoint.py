"""Atomic, verifiable training checkpoints and the newest-valid-checkpoint search.

A checkpoint is a directory ``<OUT>.ckpt/checkpoints/step-00000040/`` holding

* ``trainable.safetensors`` - the trainable parameters only (the adapter, or every weight in mode
  ``full``), what resume loads; under FSDP/DeepSpeed accelerate writes its own sharded model files
  instead; with an adapter also ``adapter/`` (a peft adapter directory, to evaluate that step),
* accelerate's ``save_state`` files: optimiser (``optimizer.bin``), grad scaler, every process's
  RNG states (``random_states_<rank>.pkl``: python, numpy, torch CPU and CUDA), all read back
  with ``weights_only=True``,
* ``trainer_state.json`` - step, rows consumed, epoch, the LR scheduler's state, the run
  fingerprint and the validation loss before training (JSON: nothing in a checkpoint is
  unpickled without ``weights_only``),
* ``manifest.json`` - size and sha256 of every other file, written last.

It is written as ``.step-00000040.tmp`` and renamed into place once complete, so a checkpoint
directory without the ``.tmp`` suffix was fully written; the manifest then catches later damage
(a truncated or flipped file). Only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from llama_pipe.config import ChatSettings, TrainSettings
from llama_pipe.core.atomic import check_output_dir, is_inside, same_file
from llama_pipe.core.errors import InputError, OutputError
from llama_pipe.core.hashing import file_digest
from llama_pipe.core.settings import to_dict
from llama_pipe.train.retention_probe import FILE as PROBE_FILE

log = logging.getLogger(__name__)

# Settings that do not change what is computed, so a checkpoint stays usable when they change.
# The memory plan (checkpointing, micro-batch split) changes how, not what; the planned optimiser goes in.
_NOT_IN_FINGERPRINT = ("resume", "keep_checkpoints", "save_every", "eval_every", "run", "memory", "gpu_memory_gib",
                       "gradient_checkpointing")


def fingerprint(settings: TrainSettings, chat: ChatSettings, base: Path, train_path: Path, val_path: Path, world_size: int) -> str:
    """Identifies what a checkpoint was computed from: settings, data, base config, process count."""
    s = {k: v for k, v in to_dict(settings).items() if k not in _NOT_IN_FINGERPRINT}
    base_cfg = (base / "config.json").read_text(encoding="utf-8") if (base / "config.json").is_file() else ""
    blob = json.dumps([s, to_dict(chat), file_digest(train_path), file_digest(val_path), base_cfg, world_size], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
TRAINABLE = "trainable.safetensors"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_root(out: str | Path) -> Path:
    """Where a run's checkpoints and live metrics live while it is not finished: ``<OUT>.ckpt``."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(ckpt: Path) -> None:
    """Record size + sha256 of every file under ``ckpt`` (fsynced), as the last file written."""
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            with open(p, "rb+") as fh:
                os.fsync(fh.fileno())
            files[p.relative_to(ckpt).as_posix()] = {"size": p.stat().st_size, "sha256": file_digest(p)}
    tmp = ckpt / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(ckpt / MANIFEST)


def verify_checkpoint(ckpt: Path, fingerprint: str | None = None) -> str | None:
    """``None`` if ``ckpt`` is complete and intact (and from this run's fingerprint), else why not."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))
        state = json.loads((ckpt / TRAINER_STATE).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        return f"missing {Path(exc.filename).name}"
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"unreadable manifest or trainer state ({exc})"
    files = manifest.get("files")
    if not isinstance(files, dict) or TRAINER_STATE not in files:
        return "manifest lists no files"
    for rel, meta in files.items():
        p = ckpt / rel
        if not p.is_file():
            return f"missing {rel}"
        size = p.stat().st_size
        if size != meta.get("size"):
            return f"{rel} has {size} bytes, the manifest says {meta.get('size')}"
        if file_digest(p) != meta.get("sha256"):
            return f"{rel} does not match its sha256"
    if fingerprint is not None and state.get("fingerprint") != fingerprint:
        return "made by a different configuration, data, base or process count"
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Completed checkpoint directories under ``root/checkpoints``, newest first."""
    d = root / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def find_latest_valid(root: Path, fingerprint: str) -> Path | None:
    """The newest checkpoint that verifies; broken ones are reported and skipped."""
    for step, path in list_checkpoints(root):
        why = verify_checkpoint(path, fingerprint)
        if why is None:
            return path
        log.warning("skipping checkpoint %s (step %d): %s", path, step, why)
    return None


def trainable_state_dict(model: Any) -> dict[str, Any]:
    """The parameters that are being trained, detached on the CPU (names of the unwrapped model)."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: Any, path: Path) -> None:
    """Copy ``trainable.safetensors`` into the model's trainable parameters; names must match exactly."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(path))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise RuntimeError(f"{path}: trainable parameters differ (missing {missing[:5]}, unexpected {extra[:5]})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n].to(p.device, p.dtype))


class Checkpointer:
    """Saves and restores the full training state through an ``Accelerator``."""

    def __init__(self, accelerator: Any, root: Path, keep: int, fingerprint: str) -> None:
        from accelerate.utils import DistributedType

        self.acc = accelerator
        self.root = root
        self.keep = keep
        self.fingerprint = fingerprint
        self.own_weights = accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        if self.own_weights:
            # accelerate would write the whole model (the frozen base too); we save only the
            # trainable parameters ourselves.
            accelerator.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
            accelerator.register_load_state_pre_hook(lambda models, inp: models.clear())

    def save(self, step: int, model: Any, state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` (collective: every process must call it)."""
        from safetensors.torch import save_file

        acc = self.acc
        final = self.root / "checkpoints" / f"step-{step:08d}"
        tmp = final.with_name(f".{final.name}.tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if self.own_weights:
                unwrapped = acc.unwrap_model(model)
                save_file(trainable_state_dict(unwrapped), str(tmp / TRAINABLE))
                if hasattr(unwrapped, "peft_config"):  # also a plain peft adapter, to evaluate this step
                    unwrapped.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
            body = {**state, "step": step, "fingerprint": self.fingerprint}
            (tmp / TRAINER_STATE).write_text(json.dumps(body, indent=1), encoding="utf-8")
            write_manifest(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            _fsync_dir(final.parent)
            for _, old in list_checkpoints(self.root)[self.keep :]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def snapshot(self, step: int, model: Any) -> Path | None:
        """Keep the adapter of evaluation step ``step`` in ``root/snapshots/step-N`` (never pruned:
        the ``select`` stage scores every one; adapters only, and only where this process holds
        the whole adapter, not under FSDP/DeepSpeed). Collective; returns the folder or None."""
        acc = self.acc
        final = self.root / "snapshots" / f"step-{step:08d}"
        unwrapped = acc.unwrap_model(model)
        if not (self.own_weights and hasattr(unwrapped, "peft_config")):
            return None
        if acc.is_main_process:
            tmp = final.with_name(f".{final.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            unwrapped.save_pretrained(str(tmp), safe_serialization=True)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        acc.wait_for_everyone()
        return final

    def latest(self) -> Path | None:
        """The newest valid checkpoint, chosen on the main process and shared with the others."""
        from accelerate.utils import broadcast_object_list

        choice: list[Any] = [None]
        if self.acc.is_main_process:
            found = find_latest_valid(self.root, self.fingerprint)
            choice = [str(found) if found else None]
        if self.acc.num_processes > 1:
            broadcast_object_list(choice, from_process=0)
        return Path(choice[0]) if choice[0] else None

    def load(self, ckpt: Path, model: Any) -> dict[str, Any]:
        """Restore optimiser, scaler, RNG and trainable weights; return the trainer state (scheduler included)."""
        try:
            self.acc.load_state(str(ckpt))
        except (RuntimeError, ValueError, OSError) as exc:  # e.g. a foreign custom_checkpoint_*.pkl
            raise InputError(
                f"{ckpt}: cannot restore this checkpoint ({str(exc).splitlines()[0]}); "
                "move it aside to resume from an older one, or set train.resume: never"
            ) from exc
        if self.own_weights:
            load_trainable(self.acc.unwrap_model(model), ckpt / TRAINABLE)
        return json.loads((ckpt / TRAINER_STATE).read_text(encoding="utf-8"))


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
