"""End of a run: gather the weights, save, verify, and move the run directory into place."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from llama_pipe.chat_template.builtin import ChatTemplate
from llama_pipe.config import ChatSettings, TrainSettings
from llama_pipe.core.atomic import atomic_dir
from llama_pipe.core.settings import to_dict
from llama_pipe.train.output import record_base_path, verify_adapter, verify_full, write_json

log = logging.getLogger("llama_pipe.train")


def write_output(
    acc: Any,
    model: Any,
    tokenizer: Any,
    template: ChatTemplate,
    settings: TrainSettings,
    chat: ChatSettings,
    summary: dict[str, Any],
    base: Path,
    out: Path,
    root: Path,
    inputs: dict[str, Any],
) -> None:
    """Save adapter (or full model), tokenizer, config, metrics, summary and checkpoints to ``out``.

    Collective: every process calls it, because ``accelerator.get_state_dict`` gathers the full
    weights from every rank under FSDP and DeepSpeed ZeRO-3 (an adapter saved from one ZeRO-3
    rank's shards would be empty). Only the main process writes.
    """
    import peft
    import torch
    import transformers

    acc.wait_for_everyone()
    state_dict = acc.get_state_dict(model)
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        # Written whole or not at all: no half-written run directory is left behind. The run
        # directory goes into place first, then the checkpoints move into it: a kill in between
        # leaves them in <OUT>.ckpt, where the next run resumes from them.
        sources = [base, *(Path(inputs[k]) for k in ("train_data", "val_data") if isinstance(inputs.get(k), str))]
        with atomic_dir(out, stage="train", inputs=sources, later=("checkpoints", "snapshots")) as tmp:  # checkpoints and snapshots move in below
            unwrapped.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
            if settings.method == "full":
                n = verify_full(tmp, dict(state_dict))
            else:
                from peft import get_peft_model_state_dict

                expected = get_peft_model_state_dict(unwrapped, state_dict=state_dict)
                n = verify_adapter(tmp, base, expected, settings.trust_remote_code)
                record_base_path(tmp, base)
            log.info("verified %d saved tensors in %s", n, tmp)
            tokenizer.chat_template = template.jinja_for(tokenizer)
            tokenizer.save_pretrained(str(tmp))
            write_json(
                tmp / "train_config.json",
                {
                    "train": to_dict(settings),
                    # what eval/serve/merge-adapter read back (core.sidecar.recorded): the template resolved
                    "chat": {**to_dict(chat), "template": template.name},
                    **inputs,
                    "processes": acc.num_processes,
                    "distributed_type": str(acc.distributed_type),
                    "precision": summary["precision"],
                    "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
                },
            )
            for name in ("metrics.jsonl", "retention.jsonl"):  # the live metrics, retention scored during training
                if (root / name).exists():
                    shutil.copyfile(root / name, tmp / name)
            write_json(tmp / "summary.json", {k: v for k, v in summary.items() if k != "is_main"})
        if (root / "snapshots").is_dir():  # the evaluation steps' adapters, for `llama-pipe select`
            (root / "snapshots").rename(out / "snapshots")
        if (root / "checkpoints").is_dir():
            (root / "checkpoints").rename(out / "checkpoints")
        else:
            (out / "checkpoints").mkdir()
        shutil.rmtree(root, ignore_errors=True)
    acc.wait_for_everyone()
