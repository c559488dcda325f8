"""The tokenizer part of a GGUF file (``tokenizer.ggml.*`` keys) from a Hugging Face tokenizer.

Two kinds are written, the two llama-pipe produces:

* ``llama`` (sentencepiece, byte fallback): LLaMA-1/2 and the embedded tiny model. Pieces,
  scores and types come from ``tokenizer.model`` when the directory has a sentencepiece one;
  otherwise from ``tokenizer.json``, whose ids are the sentencepiece ids, scored ``-id`` (the
  order sentencepiece's BPE merges in).
* ``gpt2`` (byte-level BPE): SmolLM2, LLaMA-3, GPT-2. Vocabulary and merges from ``tokenizer.json``,
  and ``tokenizer.ggml.pre`` naming the llama.cpp pre-tokenizer that splits text like the HF one
  (``gpt-2``, ``smollm``, ``llama-bpe``). It is found from the HF pre-tokenizer's structure, in
  each form HF repos and ``convert`` write (a ``ByteLevel`` with GPT-2's built-in regex, or a
  ``Split`` regex then a regex-less ``ByteLevel``; ``Digits`` first or not), and checked against
  the name ``convert`` records in ``tokenizer_config.json`` (``gguf_pre_tokenizer``). No match,
  or a record that disagrees, is an error: a wrong guess would tokenise differently from training.

Ids past the tokenizer's last one, up to the embedding's rows, become unused ``[PAD<id>]``
tokens (llama.cpp wants one token per row).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_pipe.core.errors import InputError
from llama_pipe.weights.tiktoken_bpe import LLAMA3_PATTERN, RECORDED_PRE, is_tiktoken_file
from llama_pipe.weights.tokenizer import load_tokenizer

BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _pre_parts(spec: dict[str, Any]) -> list[dict[str, Any]]:
    pre = spec.get("pre_tokenizer") or {}
    return list(pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else ([pre] if pre else [])


#: The regex GPT-2 splits text with: HF ``ByteLevel(use_regex=True)``'s built-in one.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


@dataclass(frozen=True)
class ByteLevelSplit:
    """How a byte-level BPE tokenizer cuts text into pre-tokens before merging: every digit on its
    own first (or not), then one regex (each match and each gap a piece); whether a pre-token that
    is itself in the vocabulary skips the merges (``ignore_merges``)."""

    digits: bool
    pattern: str
    ignore_merges: bool

    def describe(self) -> str:
        return (f"{'digits one by one, then ' if self.digits else ''}the regex {self.pattern!r}"
                f"{', ignore_merges' if self.ignore_merges else ''}")


#: ``tokenizer.ggml.pre`` values export writes, by the split llama.cpp makes for them
#: (llama.cpp's llama-vocab.cpp: ``smollm`` = ``\p{N}`` then GPT-2's regex; ``llama-bpe`` also sets
#: ignore_merges). ``convert`` builds exactly these splits from a GGUF and records the name.
LLAMA_CPP_PRE: dict[str, ByteLevelSplit] = {
    "gpt-2": ByteLevelSplit(False, GPT2_PATTERN, False),
    "smollm": ByteLevelSplit(True, GPT2_PATTERN, False),
    "llama-bpe": ByteLevelSplit(False, LLAMA3_PATTERN, True),
}
#: other names llama.cpp gives the same split (a GGUF may carry them); export writes the key's value.
PRE_ALIASES = {"gpt2": "gpt-2", "llama3": "llama-bpe", "llama-v3": "llama-bpe", "starcoder": "smollm", "refact": "smollm"}


def byte_level_split(spec: dict[str, Any], where: str) -> ByteLevelSplit:
    """The split of a byte-level HF tokenizer (``tokenizer.json`` as a dict), in any of the forms
    HF repos and llama-pipe write: ``ByteLevel`` doing GPT-2's regex itself, or a ``Split`` regex
    followed by a regex-less ``ByteLevel``; either after ``Digits(individual_digits)`` or not.
    Anything else (a normalizer, a prefix space, another pre-tokenizer) is an InputError."""

    def refuse(why: str) -> InputError:
        return InputError(f"{where}: byte-level pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:300]} has no llama.cpp "
                          f"equivalent export knows ({why}); known: {', '.join(LLAMA_CPP_PRE)}")

    if spec.get("normalizer"):
        raise refuse(f"normalizer {json.dumps(spec['normalizer'])[:80]}: llama.cpp normalises nothing before a byte-level BPE")
    parts = _pre_parts(spec)
    digits = bool(parts) and parts[0].get("type") == "Digits"
    if digits:
        if not parts[0].get("individual_digits"):
            raise refuse("Digits without individual_digits")
        parts = parts[1:]
    if not parts or parts[-1].get("type") != "ByteLevel":
        raise refuse("it does not end with ByteLevel")
    byte_level, rest = parts[-1], parts[:-1]
    if byte_level.get("add_prefix_space"):
        raise refuse("ByteLevel adds a prefix space, llama.cpp does not")
    if byte_level.get("use_regex", True):
        if rest:
            raise refuse("a Split before a ByteLevel that splits with its own regex")
        pattern = GPT2_PATTERN
    else:
        if len(rest) != 1 or rest[0].get("type") != "Split":
            raise refuse("ByteLevel without its regex needs exactly one Split before it")
        split = rest[0]
        regex = (split.get("pattern") or {}).get("Regex")
        if regex is None or split.get("invert") or str(split.get("behavior", "")).lower() != "isolated":
            raise refuse("the Split is not an isolating regex")
        pattern = regex
    return ByteLevelSplit(digits, pattern, bool((spec.get("model") or {}).get("ignore_merges")))


def bpe_pre_name(spec: dict[str, Any], where: str, recorded: str | None = None) -> str:
    """The llama.cpp pre-tokenizer (``tokenizer.ggml.pre``) that splits text like this byte-level HF one.

    Found from the structure (:func:`byte_level_split` equal to an entry of :data:`LLAMA_CPP_PRE`).
    ``recorded``, the name convert stored with the tokenizer, must agree with the structure: a
    tokenizer changed since (or a wrong record) is an InputError, never a guess.
    """
    split = byte_level_split(spec, where)
    found = [name for name, known in LLAMA_CPP_PRE.items() if known == split]
    if recorded is not None:
        name = PRE_ALIASES.get(recorded, recorded)
        if name not in LLAMA_CPP_PRE:
            raise InputError(f"{where}: tokenizer_config.json records {RECORDED_PRE} {recorded!r}, which export does not know "
                             f"(known: {', '.join(LLAMA_CPP_PRE)})")
        if LLAMA_CPP_PRE[name] != split:
            raise InputError(f"{where}: tokenizer_config.json records {RECORDED_PRE} {recorded!r} ({LLAMA_CPP_PRE[name].describe()}) "
                             f"but tokenizer.json splits with {split.describe()}; refusing to write either")
        return name
    if not found:
        near = [n for n, k in LLAMA_CPP_PRE.items() if (k.digits, k.pattern) == (split.digits, split.pattern)]
        hint = f" (the split of {near[0]!r}, but ignore_merges differs)" if near else ""
        raise InputError(f"{where}: byte-level pre-tokenizer ({split.describe()}) has no llama.cpp equivalent export knows{hint}; "
                         f"known: {', '.join(f'{n} ({k.describe()})' for n, k in LLAMA_CPP_PRE.items())}")
    return found[0]


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    """Whether the sentencepiece-style tokenizer puts "▁" before the text (llama.cpp's add_space_prefix)."""
    for part in _pre_parts(spec):
        if part.get("type") == "Metaspace":
            return part.get("prepend_scheme", "always") != "never" and part.get("add_prefix_space", True)
    norm = spec.get("normalizer") or {}
    norms = norm.get("normalizers") or [norm]
    return any(n.get("type") == "Prepend" and n.get("prepend") == "\u2581" for n in norms)


def _token_table(spec: dict[str, Any], n_vocab: int, where: str) -> tuple[list[str], dict[int, bool]]:
    """Token text per id (gaps -> ``[PAD<id>]``) and {added id: special?}."""
    table: dict[int, str] = {int(i): t for t, i in spec["model"]["vocab"].items()}
    added: dict[int, bool] = {}
    for a in spec.get("added_tokens") or []:
        table[int(a["id"])] = a["content"]
        added[int(a["id"])] = bool(a.get("special"))
    top = max(table) + 1
    if top > n_vocab:
        raise InputError(f"{where}: the tokenizer has ids up to {top - 1} but the embedding has only {n_vocab} rows")
    return [table.get(i, f"[PAD{i}]") for i in range(n_vocab)], added


def _sentencepiece_file(model_dir: Path) -> Path | None:
    f = model_dir / "tokenizer.model"
    return f if f.is_file() and not is_tiktoken_file(f) else None


def _spm_scores_types(model_dir: Path, tokens: list[str], added: dict[int, bool], unk: int | None) -> tuple[list[float], list[int]]:
    import gguf

    T = gguf.TokenType
    scores = [-float(i) for i in range(len(tokens))]
    types = [int(T.NORMAL)] * len(tokens)
    sp_file = _sentencepiece_file(model_dir)
    known = 0
    if sp_file is not None:
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_file))
        known = min(sp.vocab_size(), len(tokens))
        for i in range(known):
            if sp.id_to_piece(i) != tokens[i]:
                raise InputError(f"{sp_file}: piece {i} is {sp.id_to_piece(i)!r} but tokenizer.json has {tokens[i]!r}")
            scores[i] = float(sp.get_score(i))
            types[i] = int(T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i)
                           else T.BYTE if sp.is_byte(i) else T.UNUSED if sp.is_unused(i) else T.NORMAL)
    for i in range(known, len(tokens)):
        if i == unk:
            types[i] = int(T.UNKNOWN)
        elif i in added:
            types[i] = int(T.CONTROL if added[i] else T.USER_DEFINED)
        elif BYTE_PIECE.fullmatch(tokens[i]):
            types[i] = int(T.BYTE)
        elif tokens[i] == f"[PAD{i}]":
            types[i] = int(T.UNUSED)
        if types[i] != int(T.NORMAL):
            scores[i] = 0.0
    return scores, types


def add_tokenizer(writer: Any, model_dir: Path, n_vocab: int) -> dict[str, Any]:
    """Write the ``tokenizer.ggml.*`` keys for ``model_dir``'s tokenizer; returns a summary."""
    import gguf

    T = gguf.TokenType
    tok = load_tokenizer(model_dir)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise InputError(f"{model_dir}: the tokenizer has no tokenizer.json form; export needs a fast tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise InputError(f"{model_dir}: tokenizer model {model.get('type')!r}; export supports BPE tokenizers (sentencepiece or byte-level)")
    tokens, added = _token_table(spec, n_vocab, str(model_dir))
    pre = "default"
    if model.get("byte_fallback"):
        kind = "llama"
        scores, types = _spm_scores_types(model_dir, tokens, added, tok.unk_token_id)
        writer.add_tokenizer_model(kind)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(_adds_space_prefix(spec))
    elif any(p.get("type") == "ByteLevel" for p in _pre_parts(spec)):
        kind = "gpt2"
        writer.add_tokenizer_model(kind)
        recorded = (getattr(tok, "init_kwargs", None) or {}).get(RECORDED_PRE)
        pre = bpe_pre_name(spec, str(model_dir), recorded if isinstance(recorded, str) else None)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        types = [int(T.CONTROL if added[i] else T.USER_DEFINED) if i in added
                 else int(T.UNUSED) if tokens[i] == f"[PAD{i}]" else int(T.NORMAL) for i in range(len(tokens))]
        writer.add_token_types(types)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []])
    else:
        raise InputError(f"{model_dir}: a BPE tokenizer that is neither sentencepiece-style (byte fallback) nor byte-level")
    for key, value in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unk", tok.unk_token_id), ("pad", tok.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(int(value))
    probe = tok("a").input_ids
    writer.add_add_bos_token(bool(probe) and tok.bos_token_id is not None and probe[0] == tok.bos_token_id)
    writer.add_add_eos_token(bool(probe) and tok.eos_token_id is not None and probe[-1] == tok.eos_token_id)
    for eot in ("<|eot_id|>", "<|im_end|>", "<|end|>"):
        if eot in tokens and tokens.index(eot) != tok.eos_token_id:
            writer.add_eot_token_id(tokens.index(eot))
            break
    template = tok.chat_template
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
    return {"tokenizer": kind, "pre_tokenizer": pre, "tokens": len(tokens), "chat_template": isinstance(template, str) and bool(template)}
