"""The finished run's directory: written to ``<OUT>.tmp-<pid>``, verified, then renamed to ``<OUT>``.

Contents: the adapter (``adapter_config.json`` + ``adapter_model.safetensors``) or, in mode
``full``, the whole model (``config.json`` + safetensors shards); the tokenizer with the chat
template; ``train_config.json`` (with ``trained_on``: what the base was, :mod:`llama_pipe.models.lineage`);
``metrics.jsonl``; ``summary.json``; ``checkpoints/``.
Before the rename the saved weights are read back and compared with the trained ones
(:func:`verify_adapter` / :func:`verify_full`); a mismatch fails the stage and leaves no ``<OUT>``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class VerificationError(RuntimeError):
    """The saved weights are not what was trained."""


def _equal(a: Any, b: Any) -> bool:
    import torch

    return a.shape == b.shape and torch.equal(a.detach().cpu().float(), b.detach().cpu().float())


def verify_adapter(adapter_dir: Path, base_dir: Path, expected: dict[str, Any], trust_remote_code: bool = False) -> int:
    """Load ``adapter_dir`` with ``PeftModel.from_pretrained`` and check it holds exactly ``expected``.

    The base is instantiated on the ``meta`` device (no weights read), so this costs only the
    adapter's size. Checks: same tensor names, equal values, and no LoRA ``B`` matrix that is all
    zeros (B starts at zero, so an all-zero B means that module never trained or was not saved).
    Returns the number of tensors checked.
    """
    from peft import get_peft_model_state_dict
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(base_dir), trust_remote_code=trust_remote_code)
    try:
        model = load_adapter_on_empty_base(adapter_dir, config, trust_remote_code)
    except Exception as exc:  # peft raises many types on a broken adapter
        raise VerificationError(f"{adapter_dir}: PeftModel.from_pretrained failed: {exc}") from exc
    loaded = get_peft_model_state_dict(model)
    if set(loaded) != set(expected):
        missing, extra = sorted(set(expected) - set(loaded)), sorted(set(loaded) - set(expected))
        raise VerificationError(f"{adapter_dir}: adapter tensors differ: missing {missing[:5]}, unexpected {extra[:5]}")
    if not expected:
        raise VerificationError(f"{adapter_dir}: the adapter has no tensors")
    for name, tensor in loaded.items():
        if tensor.is_meta:
            raise VerificationError(f"{adapter_dir}: {name} was not loaded")
        if not _equal(tensor, expected[name]):
            raise VerificationError(f"{adapter_dir}: {name} differs from the trained value")
        if ".lora_B." in name and not bool(tensor.detach().abs().sum() > 0):
            raise VerificationError(f"{adapter_dir}: {name} is all zeros after training (the module never learned)")
    return len(loaded)


def load_adapter_on_empty_base(adapter_dir: Path, config: Any, trust_remote_code: bool = False) -> Any:
    """``PeftModel.from_pretrained`` of ``adapter_dir`` onto the architecture of the base's
    ``config`` with no base weights read: the base is built on the meta device and given
    zero-memory values, so this costs only the adapter's size. Raises whatever peft raises on a
    broken adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with _no_zero3_init(), torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    _materialise_without_memory(base)
    with _no_zero3_init():
        return PeftModel.from_pretrained(base, str(adapter_dir))


@contextlib.contextmanager
def _no_zero3_init() -> Iterator[None]:
    """Build models as plain modules even while a DeepSpeed ZeRO-3 run is registered with transformers.

    Under ZeRO-3, transformers creates every model inside ``deepspeed.zero.Init``, which
    partitions the new weights across processes: a collective. The check runs on the main
    process alone, so there the other processes would never join and the run would hang.
    """
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # pragma: no cover - transformers without the DeepSpeed integration
        yield
        return
    saved = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def _materialise_without_memory(model: Any) -> None:
    """Give every meta parameter/buffer a CPU value that takes no memory (one zero, expanded).

    peft places a loaded adapter on its base layer's device; a ``meta`` base would leave the
    adapter on ``meta`` (values dropped), a real base would cost the model's full size.
    """
    import torch

    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                module._parameters[name] = torch.nn.Parameter(
                    torch.zeros((), dtype=p.dtype).expand(p.shape), requires_grad=False
                )
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[name] = torch.zeros((), dtype=b.dtype).expand(b.shape)


def verify_full(model_dir: Path, expected: dict[str, Any]) -> int:
    """Read every safetensors shard of ``model_dir`` back and compare with ``expected``."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files or not (model_dir / "config.json").is_file():
        raise VerificationError(f"{model_dir}: no config.json or safetensors weights were written")
    seen = 0
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                if name in expected and not _equal(fh.get_tensor(name), expected[name]):
                    raise VerificationError(f"{model_dir}: {name} differs from the trained value")
                seen += 1
    if seen < len([k for k in expected if "rotary" not in k]) - 1:  # a tied lm_head may be dropped
        raise VerificationError(f"{model_dir}: {seen} tensors saved, expected {len(expected)}")
    return seen


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def record_base_path(adapter_dir: Path, base_dir: Path) -> str:
    """Write the base's absolute path as ``base_model_name_or_path`` in ``adapter_config.json``.

    peft records the path the base was loaded from (``results/hf_base``, relative to wherever
    the trainer ran); ``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` resolves it from
    the caller's working directory, so a relative path breaks everywhere else. Returns the path.
    """
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = str(Path(base_dir).resolve())
    tmp = cfg_path.with_name(cfg_path.name + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(cfg_path)
    return str(cfg["base_model_name_or_path"])
