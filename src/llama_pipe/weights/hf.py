"""Hugging Face format: fetch a repo (safetensors only) and validate / pass through a model dir."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from llama_pipe.chat_template.builtin import AUTO, builtin_for, template_for_bare_model
from llama_pipe.core.atomic import atomic_dir, commit_dir
from llama_pipe.core.errors import InputError
from llama_pipe.weights.fetch import check_url, redact, scrub
from llama_pipe.weights.tokenizer import load_tokenizer
from llama_pipe.weights.validate import check_model_weights, refuse_remote_code

log = logging.getLogger(__name__)

# What the pipeline needs from a Hugging Face repo: never pickled *.bin / *.pth weights.
ALLOW_PATTERNS = [
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
]
# Sub-folders (Llama-3 repos carry Meta's original/*.pth there) are never fetched.
IGNORE_PATTERNS = ["*/*"]


def wanted(name: str) -> bool:
    """True for a top-level repo file the pipeline needs (subfolders such as ``original/`` are skipped)."""
    return "/" not in name and any(fnmatch.fnmatchcase(name, pat) for pat in ALLOW_PATTERNS)


def download_repo(repo_id: str, out_dir: Path, revision: str | None = None) -> list[str]:
    """Fetch the safetensors weights, config and tokenizer files of ``repo_id`` into ``out_dir``.

    Honours ``HF_ENDPOINT`` (read at call time), ``HF_TOKEN`` and ``HF_HUB_OFFLINE``: offline,
    the files come from the Hugging Face cache (filled earlier, e.g. by ``hf download``).
    Online, files land in ``OUT.partial`` first, where huggingface_hub resumes interrupted
    transfers, and the directory is renamed when complete.
    """
    import huggingface_hub
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = os.environ.get("HF_ENDPOINT") or None
    token = os.environ.get("HF_TOKEN") or None
    offline = constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE
    partial = out_dir.with_name(out_dir.name + ".partial")
    if endpoint is not None:
        try:
            check_url(endpoint)
        except InputError as exc:
            raise InputError(f"HF_ENDPOINT {exc}") from None
    where = f"{redact(endpoint or constants.ENDPOINT).rstrip('/')}/{repo_id}" + (f"@{revision}" if revision else "")
    log.info("fetching %s (only %s)%s", where, ", ".join(ALLOW_PATTERNS), " [offline: cache only]" if offline else "")
    try:
        local = snapshot_download(
            repo_id,
            revision=revision,
            local_dir=None if offline else partial,
            allow_patterns=ALLOW_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
            token=token,
            endpoint=endpoint,
            local_files_only=offline,
        )
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise InputError(
            f"{where}: repository not found or not accessible ({type(exc).__name__}); check the repo id, "
            "accept its licence on the Hub and set HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise InputError(f"{where}: revision {revision!r} not found") from None
    except LocalEntryNotFoundError:
        if offline:
            raise InputError(
                f"{where}: offline mode (HF_HUB_OFFLINE=1) and the files are not cached; "
                f"unset HF_HUB_OFFLINE, or fill the cache first with `hf download {repo_id}`"
            ) from None
        raise InputError(f"{where}: cannot reach the Hub and nothing is cached; check the network or HF_ENDPOINT") from None
    except HfHubHTTPError as exc:
        raise InputError(f"{where}: download failed: {scrub(str(exc))}") from None
    except Exception as exc:  # noqa: BLE001 - the HTTP client's own errors (a redirect loop, a bad URL, a size check)
        log.debug("snapshot_download failed", exc_info=True)
        what = "too many redirects (a redirect loop?)" if "redirect" in type(exc).__name__.lower() else scrub(str(exc) or "")
        raise InputError(f"{where}: download failed ({type(exc).__name__}: {what}); files fetched so far stay in {partial}") from None
    local_path = Path(local)
    names = sorted(p.name for p in local_path.iterdir() if p.is_file() and wanted(p.name))
    if not any(n.endswith(".safetensors") for n in names):
        raise InputError(
            f"{where}: no *.safetensors weights in the repo; llama-pipe does not fetch pickled *.bin / *.pth "
            "weights (they can run code when loaded). Use a repo with safetensors, or a Meta release URL"
        )
    if offline:  # files of the cache (symlinks into its blobs): copy them out
        with atomic_dir(out_dir, stage="download") as tmp:
            for n in names:
                shutil.copyfile(local_path / n, tmp / n)
    else:
        shutil.rmtree(partial / ".cache", ignore_errors=True)
        commit_dir(partial, out_dir, stage="download")
    log.info("huggingface_hub %s fetched %d file(s)", huggingface_hub.__version__, len(names))
    return names


def safetensors_files(src: Path) -> list[str]:
    """The safetensors weight files of an HF model dir; pickled-only weights are refused (InputError)."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"{index}: not a safetensors index ({exc})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (src / f).is_file()]
        if missing:
            raise InputError(f"{src}: weight file(s) {missing} listed in {index.name} are missing")
        return files
    if (src / "model.safetensors").is_file():
        return ["model.safetensors"]
    pickles = sorted(p.name for p in src.iterdir() if p.suffix in (".bin", ".pth", ".pt"))
    if pickles:
        raise InputError(
            f"{src}: only pickled weights ({pickles[:3]}); llama-pipe loads safetensors only (a pickle can run code). Convert them "
            "with a trusted tool, or fetch the repo's safetensors"
        )
    raise InputError(f"{src}: config.json but no model.safetensors or model.safetensors.index.json")


def validate_hf_dir(src: Path) -> dict[str, Any]:
    """Check a Hugging Face causal-LM directory: config, every weight's name and shape, tokenizer."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    refuse_remote_code(src)  # convert never runs a model folder's code
    try:
        config = AutoConfig.from_pretrained(str(src), trust_remote_code=False)
    except Exception as exc:  # transformers raises many types here
        raise InputError(f"{src / 'config.json'}: not a usable model config ({exc})") from None
    files = safetensors_files(src)
    check_model_weights(src, files)  # headers, and config.json against them (layers, heads, sizes)
    found: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(src / f), framework="pt") as fh:
                for key in fh.keys():
                    found[key] = tuple(fh.get_slice(key).get_shape())
        except Exception as exc:
            raise InputError(f"{src / f}: not a readable safetensors file ({exc})") from None
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        except Exception as exc:
            raise InputError(f"{src}: config.json does not describe a causal LM transformers can build ({exc})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in expected if k not in found and not (tied and k == "lm_head.weight")]
    if missing:
        raise InputError(f"{src}: weights missing for {len(missing)} parameter(s), e.g. {missing[:3]}")
    bad = [f"{k}: file {list(found[k])} vs config {list(v)}" for k, v in expected.items() if k in found and found[k] != v]
    if bad:
        raise InputError(f"{src}: weight shapes disagree with config.json: {'; '.join(bad[:3])}")
    unused = sorted(set(found) - set(expected))
    if unused:
        log.warning("%s: %d weight(s) the model does not use (ignored when loading), e.g. %s", src, len(unused), unused[:3])
    tok = load_tokenizer(src)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab and len(tok) > vocab:
        raise InputError(f"{src}: tokenizer has {len(tok)} tokens but the model's vocab_size is {vocab}")
    return {"files": files, "tensors": len(found), "config": config, "tokenizer": tok}


def _check_own_template(tok: Any) -> None:
    """Render the model's own chat template once within the bounds (a looping or escaping one is an
    InputError naming its file); one that cannot be trained on as it is only warns."""
    from llama_pipe.chat_template.model import model_template

    try:
        model_template(tok)
    except ValueError as exc:
        log.warning("%s: %s (chat.template must name a built-in to train on this model)", tok.name_or_path, exc)


def pass_through(src: Path, out_dir: Path, template: str = AUTO) -> dict[str, Any]:
    """Validate ``src`` and place its files at ``out_dir`` (hard links where possible); a model without a
    chat template gets ``template``'s (chat.template: see :func:`~llama_pipe.chat_template.builtin.template_for_bare_model`)."""
    info = validate_hf_dir(src)
    with atomic_dir(out_dir, stage="convert", inputs=[src]) as tmp:
        names = [p.name for p in sorted(src.iterdir()) if p.is_file() and wanted(p.name)]
        for n in names:
            try:
                os.link(src / n, tmp / n)
            except OSError:
                shutil.copy2(src / n, tmp / n)
        own = info["tokenizer"].chat_template
        if isinstance(own, str) and own.strip() and builtin_for(info["tokenizer"]) is None:
            _check_own_template(info["tokenizer"])
        if own is None:
            added = template_for_bare_model(template, src)
            log.info("%s has no chat template; adding %s", src, added.name)
            (tmp / "chat_template.jinja").write_text(added.jinja_for(info["tokenizer"]), encoding="utf-8")
        if not (tmp / "generation_config.json").exists():
            from transformers import GenerationConfig

            GenerationConfig.from_model_config(info["config"]).save_pretrained(tmp)
    return {"passed_through": True, "files": len(names), "tensors": info["tensors"]}
