"""Load a tokenizer directory with the ``tokenizers`` library alone, when that gives transformers' ids.

``split`` only needs token counts and offsets. Loading through transformers costs about 2 s of CPU
per run (``transformers`` imports ``torch`` through its configuration utilities); the Rust
``tokenizers.Tokenizer`` in ``tokenizer.json`` loads in milliseconds. But transformers 5 does not use
``tokenizer.json`` as it is: for a ``LlamaTokenizer`` it rebuilds the pipeline from the class
(no normalizer, a ``Metaspace`` pre-tokenizer, BPE with byte fallback), keeps only the file's
post-processor, may rewrite that post-processor (``add_bos_token``/``add_eos_token``) and adds
the special tokens of ``tokenizer_config.json`` that the file lacks.

So :func:`load_rust_tokenizer` only accepts a directory where all of that is a no-op - exactly the
files transformers 5 writes for a ``LlamaTokenizer`` with default settings (what ``llama-pipe
convert`` produces) - and returns ``None`` for anything else; the caller then loads through
transformers. The tests check the ids are identical to :func:`llama_pipe.weights.tokenizer.load_tokenizer`
on the test tokenizers, with and without special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LLAMA_CLASSES = {"LlamaTokenizer", "LlamaTokenizerFast"}
# tokenizer_config.json keys that make transformers change the pipeline it loads
CHANGING_KEYS = {"add_bos_token", "add_eos_token", "split_special_tokens",
                 "auto_map", "from_slow", "tokenizer_file", "vocab_file", "merges_file"}
METASPACE = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
MIN_VOCAB = 260  # as load_tokenizer: fewer tokens means incomplete files


def _special_strings(cfg: dict[str, Any]) -> set[str] | None:
    """The special-token strings transformers would add from ``tokenizer_config.json``."""
    out: set[str] = set()
    values = [cfg.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")]
    extra = cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") or []
    if not isinstance(extra, list):
        return None
    for v in values + extra:
        if v is None:
            continue
        if isinstance(v, dict) and isinstance(v.get("content"), str):
            v = v["content"]
        if not isinstance(v, str):
            return None
        out.add(v)
    return out


def _why_not(cfg: dict[str, Any], tj: dict[str, Any]) -> str | None:
    """Why this directory may tokenize differently through transformers (``None``: it does not)."""
    if cfg.get("tokenizer_class") not in LLAMA_CLASSES:
        return f"tokenizer_class {cfg.get('tokenizer_class')!r}"
    if cfg.get("backend", "tokenizers") != "tokenizers":
        return f"backend {cfg.get('backend')!r}"
    changing = sorted(CHANGING_KEYS & set(cfg))
    if changing:
        return f"tokenizer_config.json sets {changing}"
    # LlamaTokenizer: add_prefix_space None/True and legacy False give Metaspace prepend_scheme "first"
    if cfg.get("add_prefix_space") not in (None, True) or cfg.get("legacy", False) is not False:
        return "add_prefix_space/legacy change the pre-tokenizer"
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") is not True or model.get("fuse_unk") is not True:
        return "model is not BPE with byte fallback and fuse_unk"
    if model.get("dropout") is not None or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "BPE options differ from LlamaTokenizer's"
    if model.get("ignore_merges"):
        return "BPE ignore_merges"
    if tj.get("normalizer") is not None:
        return "a normalizer"
    if tj.get("pre_tokenizer") != METASPACE:
        return f"pre_tokenizer {tj.get('pre_tokenizer')!r}"
    if tj.get("post_processor") is None or tj.get("truncation") is not None or tj.get("padding") is not None:
        return "no post-processor, or truncation/padding in tokenizer.json"
    specials = _special_strings(cfg)
    added = {t.get("content") for t in tj.get("added_tokens") or [] if isinstance(t, dict)}
    if specials is None or not specials <= added:
        return "special tokens of tokenizer_config.json missing from tokenizer.json"
    return None


def load_rust_tokenizer(path: str | Path) -> Any | None:
    """A ``tokenizers.Tokenizer`` giving the same ids as transformers would, or ``None`` (see the
    module docstring); never raises on odd files (the transformers path reports those)."""
    path = Path(path)
    try:
        cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        text = (path / "tokenizer.json").read_text(encoding="utf-8")
        tj = json.loads(text)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(cfg, dict) or not isinstance(tj, dict) or _why_not(cfg, tj) is not None:
        return None
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(text)
    except Exception:  # noqa: BLE001 - any failure: let transformers load (and report) it
        return None
    eos = cfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if tok.get_vocab_size() < MIN_VOCAB or not isinstance(eos, str) or tok.token_to_id(eos) is None:
        return None
    return tok


def why_not_rust(path: str | Path) -> str | None:
    """For logs and tests: why :func:`load_rust_tokenizer` declines ``path`` (``None``: it accepts)."""
    path = Path(path)
    try:
        cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        tj = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        return f"cannot read tokenizer files: {exc}"
    if not isinstance(cfg, dict) or not isinstance(tj, dict):
        return "tokenizer files are not JSON objects"
    return _why_not(cfg, tj)
