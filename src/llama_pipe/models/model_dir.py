"""Hugging Face model and peft adapter directories as eval, serve, chat and merge-adapter read them.

* :func:`check_model_dir` / :func:`check_adapter_dir` - validate a directory (headers and shapes,
  ``config.json`` against them, no ``auto_map`` asking to run the folder's Python: before anything
  big is allocated), or raise an :class:`~llama_pipe.core.errors.InputError`;
* :func:`load_config` / :func:`load_float_base` - the config (``trust_remote_code`` always passed,
  so transformers never asks on stdin) and the model in float32 (a quantised checkpoint is refused);
* :func:`apply_adapters` - merge adapters, in order, into a float model;
* :func:`combine_adapters` - merge one weighted combination of adapters (peft's ``add_weighted_adapter``);

Which chat template a model renders with is :mod:`llama_pipe.chat_template.resolve`; what was
recorded beside it (``llama_pipe.json``) is :mod:`llama_pipe.core.sidecar`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama_pipe.core.errors import InputError
from llama_pipe.weights.hf import safetensors_files
from llama_pipe.weights.tokenizer import load_tokenizer
from llama_pipe.weights.validate import check_adapter_weights, check_model_weights, refuse_remote_code

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def check_model_dir(path: str | Path, what: str = "model", trust_remote_code: bool = False) -> Path:
    """A Hugging Face model directory (config.json and weights whose headers agree with it), or a
    clear InputError, before anything big is allocated: every stage that loads a model checks it
    here. ``trust_remote_code``: train.trust_remote_code (eval, chat, serve and merge-adapter never
    run a model folder's code)."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: {what} directory not found")
    if not (path / "config.json").is_file():
        hint = " (it looks like a peft adapter: pass it with --adapter)" if (path / "adapter_config.json").is_file() else ""
        raise InputError(f"{path}: not a Hugging Face model directory (no config.json){hint}; expected the output of "
                         "`llama-pipe convert` (results/hf_base), a downloaded HF model, or a merged model (results/default/merged)")
    refuse_remote_code(path, trust_remote_code)  # an auto_map: exit 2 naming the setting, never a prompt
    check_model_weights(path, safetensors_files(path))  # lying headers / absurd config.json
    return path


def load_config(path: Path, trust_remote_code: bool = False) -> Any:
    """``AutoConfig`` of a checked model directory (``trust_remote_code`` always passed: never a
    prompt); a config transformers cannot read (an unknown model_type) is an InputError."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise InputError(f"{path / 'config.json'}: transformers cannot read this config ({str(exc).splitlines()[0][:200]})") from None


def is_full_model(path: Path) -> bool:
    """A model directory (``config.json``, weights) rather than a peft adapter."""
    return (path / "config.json").is_file() and not (path / "adapter_config.json").is_file()


def check_adapter_dir(path: str | Path) -> Path:
    """Validate a peft adapter directory; return its safetensors weights file."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: adapter directory not found")
    cfg = path / "adapter_config.json"
    if not cfg.is_file():
        raise InputError(f"{path}: not a peft adapter directory (no adapter_config.json); pass the train run's output directory")
    try:
        json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{cfg}: not valid JSON ({exc})") from None
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise InputError(
                f"{path}: only adapter_model.bin (a pickle, which can run code when loaded); llama-pipe reads "
                "safetensors only. Re-save it with peft's save_pretrained(..., safe_serialization=True)"
            )
        raise InputError(f"{path}: adapter_model.safetensors not found")
    check_adapter_weights(path)  # header and r, before peft allocates the layers
    return weights


def has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def load_float_base(base: str | Path, device: str = "cpu") -> Any:
    """The base model in float32 (refusing a quantised checkpoint), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    base = check_model_dir(base)
    cfg = load_config(base)
    if getattr(cfg, "quantization_config", None):
        raise InputError(
            f"{base}: the checkpoint is quantised ({cfg.quantization_config.get('quant_method', '?')}); merging needs the "
            "float base the adapter was trained over (the hf_base directory), not a 4/8-bit copy"
        )
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, device_map=device, use_safetensors=True,
                                                 trust_remote_code=False)
    model.eval()
    return model


def _saves_embeddings(weights: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return any("embed_tokens" in k or "lm_head" in k for k in f.keys())


def _fit_tokenizer(model: Any, tokenizer: Any, adapter: Path, weights: Path) -> Any:
    """Grow the embeddings when ``adapter`` carries a tokenizer with more tokens; return the
    tokenizer to use from now on."""
    if not has_tokenizer(adapter):
        return tokenizer
    atok = load_tokenizer(adapter)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(atok) > rows:
        log.info("%s: tokenizer has %d tokens > %d embedding rows: resizing", adapter, len(atok), rows)
        if not _saves_embeddings(weights):
            log.warning("%s: the adapter adds tokens but stores no embedding weights; new rows are initialised, not trained", adapter)
        model.resize_token_embeddings(len(atok))
        return atok
    return atok if len(atok) > len(tokenizer) else tokenizer


def _load_adapter(model: Any, adapter: Path, weights: Path, name: str) -> Any:
    """``model`` as a PeftModel with ``adapter`` loaded as ``name`` (``model`` may already be one),
    after checking every tensor of the file found its module and the other way round."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(adapter), adapter_name=name, is_trainable=False)
        else:
            model = PeftModel.from_pretrained(model, str(adapter), adapter_name=name, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise InputError(f"{adapter}: adapter does not fit the base model: {str(exc).splitlines()[0]}") from None
    with safe_open(str(weights), framework="pt") as f:
        file_keys = set(f.keys())
    loaded = set(get_peft_model_state_dict(model, adapter_name=name).keys())
    unused, absent = sorted(file_keys - loaded), sorted(loaded - file_keys)
    if unused:
        raise InputError(
            f"{adapter}: {len(unused)} of {len(file_keys)} adapter tensors match no module of the base "
            f"(e.g. {unused[0]}); was it trained on a different base model?"
        )
    if absent:
        raise InputError(
            f"{adapter}: adapter_config.json targets modules whose weights are missing from "
            f"adapter_model.safetensors (e.g. {absent[0]}); the adapter files are incomplete"
        )
    log.info("loaded %s (%d tensors)", adapter, len(file_keys))
    return model


def apply_adapters(model: Any, tokenizer: Any, adapters: Sequence[str | Path]) -> tuple[Any, Any]:
    """Merge ``adapters`` in order into ``model`` (float); return (merged model, tokenizer to use).

    Adapter k is added to the weights the adapters before it produced: that is right only when
    it was trained on them (:func:`llama_pipe.models.lineage.chain_lineage` checks that)."""
    for adapter in adapters:
        adapter = Path(adapter)
        weights = check_adapter_dir(adapter)
        tokenizer = _fit_tokenizer(model, tokenizer, adapter, weights)
        model = _load_adapter(model, adapter, weights, "default").merge_and_unload()
        log.info("merged %s", adapter)
    model.eval()
    return model, tokenizer


# Methods of peft's add_weighted_adapter that merge-adapter offers: both combine the adapters'
# full updates (scale_i * B_i @ A_i), so ranks may differ. The others (linear, ties, dare_*,
# magnitude_prune) mix the A and the B matrices separately, which for LoRA is not a weighted sum
# of the updates (cross terms B_i @ A_j appear) and needs equal ranks.
COMBINE_METHODS = ("cat", "svd")


def combine_adapters(
    model: Any, tokenizer: Any, adapters: Sequence[str | Path], method: str, weights: Sequence[float], svd_rank: int | None = None
) -> tuple[Any, Any]:
    """Merge one weighted combination of ``adapters`` (all trained on ``model``) into ``model``.

    ``cat``: the exact weighted sum ``sum_i w_i * scale_i * B_i @ A_i`` (an adapter of rank
    sum r_i); ``svd``: that sum truncated to rank ``svd_rank`` (None: the largest r_i) by an SVD of
    every adapted matrix. Built by peft's ``add_weighted_adapter``; returns (merged model, tokenizer).
    """
    from peft.tuners.lora import LoraLayer

    if method not in COMBINE_METHODS:
        raise InputError(f"combination {method!r}: expected one of {', '.join(COMBINE_METHODS)}")
    if len(weights) != len(adapters):
        raise InputError(f"{len(weights)} weight(s) for {len(adapters)} adapter(s): give one weight per adapter")
    names = [f"adapter{i}" for i in range(len(adapters))]
    for adapter, name in zip(adapters, names, strict=True):
        adapter = Path(adapter)
        weights_file = check_adapter_dir(adapter)
        cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        if cfg.get("use_dora"):
            raise InputError(f"{adapter}: a DoRA adapter (train.method dora) cannot be combined: its magnitude vectors do not add up; "
                             "chain adapters trained one over another instead")
        if cfg.get("modules_to_save"):
            raise InputError(f"{adapter}: the adapter stores whole modules ({', '.join(cfg['modules_to_save'])}), which a "
                             "combination cannot add up; chain adapters trained one over another instead")
        tokenizer = _fit_tokenizer(model, tokenizer, adapter, weights_file)
        model = _load_adapter(model, adapter, weights_file, name)
    try:
        model.add_weighted_adapter(names, [float(w) for w in weights], "combined", combination_type=method, svd_rank=svd_rank)
    except (ValueError, TypeError) as exc:
        raise InputError(f"cannot combine {', '.join(map(str, adapters))} ({method}): {exc}") from None
    # The combined adapter's alpha equals its rank, so its scale must be 1 (each adapter's own
    # scale is already inside its factors); peft copies use_rslora from the first adapter, which
    # would make it sqrt(rank).
    for module in model.modules():
        if isinstance(module, LoraLayer) and "combined" in module.scaling:
            module.scaling["combined"] = 1.0
    model.set_adapter("combined")
    for name in names:
        model.delete_adapter(name)
    model = model.merge_and_unload()
    log.info("merged the %s combination of %d adapters (weights %s)", method, len(adapters), list(weights))
    model.eval()
    return model, tokenizer


