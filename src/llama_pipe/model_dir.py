"""Hugging Face model and peft adapter directories as eval, serve, chat and merge-adapter read them.

* :func:`check_model_dir` / :func:`check_adapter_dir` - validate a directory (headers and shapes,
  ``config.json`` against them, no ``auto_map`` asking to run the folder's Python: before anything
  big is allocated), or raise an :class:`~llama_pipe.errors.InputError`;
* :func:`load_config` / :func:`load_float_base` - the config (``trust_remote_code`` always passed,
  so transformers never asks on stdin) and the model in float32 (a quantised checkpoint is refused);
* :func:`apply_adapters` - merge adapters, in order, into a float model;
* :func:`combine_adapters` - merge one weighted combination of adapters (peft's ``add_weighted_adapter``);
* :func:`resolve_template` (:func:`pick_template`) - the chat template every stage renders with,
  split included; :func:`recorded_system_prompt` - what was recorded with a model (its
  ``llama_pipe.json`` sidecar, or the trainer's ``train_config.json``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama_pipe.errors import InputError
from llama_pipe.templates import AUTO, MODEL, TEMPLATES, ChatTemplate, builtin_named, get_template
from llama_pipe.weights.hf import safetensors_files
from llama_pipe.weights.tokenizer import load_tokenizer
from llama_pipe.weights.validate import check_adapter_weights, check_model_weights, refuse_remote_code

log = logging.getLogger(__name__)

SIDECAR = "llama_pipe.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def check_model_dir(path: str | Path, what: str = "model") -> Path:
    """A Hugging Face model directory (config.json + weights + tokenizer), or a clear InputError."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: {what} directory not found")
    if not (path / "config.json").is_file():
        hint = " (it looks like a peft adapter: pass it with --adapter)" if (path / "adapter_config.json").is_file() else ""
        raise InputError(f"{path}: not a Hugging Face model directory (no config.json){hint}; expected e.g. results/hf_base or results/default/merged")
    refuse_remote_code(path)  # eval, chat, serve and merge-adapter never run a model folder's code
    check_model_weights(path, safetensors_files(path))  # headers and config.json, before any allocation
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


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The ``llama_pipe.json`` of a model or adapter directory ({} when absent or unreadable)."""
    f = Path(path) / SIDECAR
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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
    it was trained on them (:func:`llama_pipe.lineage.chain_lineage` checks that)."""
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


def recorded(dirs: list[Path], key: str) -> tuple[bool, Any]:
    """(found, value) of ``key`` as recorded with a model/adapter: ``llama_pipe.json``, then the
    trainer's ``train_config.json`` (``chat.<key>``; ``train.<key>`` in runs from before the chat
    section); the last directory wins."""
    for d in reversed(dirs):
        side = read_sidecar(d)
        if key in side:
            return True, side[key]
        try:
            written = json.loads((Path(d) / "train_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for section in ("chat", "train"):
            part = written.get(section) if isinstance(written, dict) else None
            if isinstance(part, dict) and key in part:
                return True, part[key]
    return False, None


def read_chat_template(path: str | Path) -> str | None:
    """The chat template Jinja stored in a tokenizer directory, as transformers reads it:
    ``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template`` (None: none)."""
    path = Path(path)
    try:
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        pass
    try:
        cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    jinja = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(jinja, list):  # named templates: transformers uses "default"
        jinja = next((t.get("template") for t in jinja if isinstance(t, dict) and t.get("name") == "default"), None)
    return jinja if isinstance(jinja, str) else None


def _own_jinja(tokenizer: Any, dirs: list[Path]) -> str | None:
    """The tokenizer's own Jinja: its ``chat_template``; a bare ``tokenizers.Tokenizer`` (split's fast
    path) has none, so it is read from the first directory's files."""
    if hasattr(tokenizer, "chat_template"):
        jinja = tokenizer.chat_template
        return jinja if isinstance(jinja, str) else None
    return read_chat_template(dirs[0]) if dirs else None


def pick_template(explicit: str | None, dirs: list[Path], tokenizer: Any) -> str:
    """Template name for ``chat.template``: a built-in or ``model`` as given; ``auto`` (or None): the
    one recorded with the model (sidecar, train_config.json) > the built-in the tokenizer's Jinja is >
    the tokenizer's own Jinja (``model``) > vicuna_v1.1. :func:`resolve_template` gives the template:
    every stage resolves ``auto`` through these two (split, train, merge-adapter, eval, chat, serve)."""
    if explicit and explicit != AUTO:
        return explicit
    found, name = recorded(dirs, "template")
    if found and (name in TEMPLATES or name == MODEL):
        return str(name)
    jinja = _own_jinja(tokenizer, dirs)
    own = builtin_named(jinja)
    if own is not None:
        return own
    if jinja and jinja.strip():
        return MODEL
    log.warning("no chat template recorded with the model; using vicuna_v1.1 (pass --template to choose)")
    return "vicuna_v1.1"


def resolve_template(explicit: str | None, dirs: list[Path], tokenizer: Any) -> ChatTemplate:
    """The chat template every stage renders with (``chat.template`` resolved by :func:`pick_template`).
    A template that cannot be used (``model`` with none, one that rewrites earlier turns, a hostile
    one) is an :class:`InputError` naming the model directory or the template's file."""
    name = pick_template(explicit, dirs, tokenizer)
    try:
        return get_template(name, tokenizer)
    except ValueError as exc:
        where = dirs[0] if dirs else getattr(tokenizer, "name_or_path", "the tokenizer")
        raise InputError(f"{where}: chat template {name!r}: {exc}") from None


def recorded_system_prompt(dirs: list[Path]) -> str | None:
    """The system prompt the model was trained with (null: the template's default)."""
    found, value = recorded(dirs, "system_prompt")
    return value if found and isinstance(value, str) else None
