"""LLaMA-3's tiktoken ``tokenizer.model`` as a Hugging Face fast tokenizer.

Meta ships LLaMA-3 with a tiktoken BPE file: one ``<base64 token bytes> <rank>`` line per token,
the rank being the merge priority. The Hugging Face equivalent is a byte-level BPE:

* vocabulary: each token's bytes written with GPT-2's byte-to-character table, id = rank;
* merges: for every token, each split into two tokens of the vocabulary, ordered by the rank
  of the merged token (then of the parts) - what tiktoken's "merge the lowest-ranked pair"
  loop does;
* ``ignore_merges``: a pre-token that is itself in the vocabulary is one token (tiktoken looks
  it up whole before merging);
* pre-tokenization: LLaMA-3's regex, then the byte-to-character mapping; a ``<|begin_of_text|>``
  is prepended (BOS), nothing appended;
* 256 special tokens after the ranks (LLaMA-3.0's names: ``<|begin_of_text|>``,
  ``<|end_of_text|>``, ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>`` and
  reserved ones), the pad token being ``<|reserved_special_token_0|>`` (never the EOS, which is a
  label).

Tests compare the ids with the ``tiktoken`` library itself on multilingual text.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

from llama_pipe.core.errors import InputError

#: tokenizer_config.json key where convert records the ``tokenizer.ggml.pre`` its tokenizer equals
#: (llama.cpp's name of its pre-tokenizer, which export writes back; :mod:`.gguf_vocab` reads it).
RECORDED_PRE = "gguf_pre_tokenizer"

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL = 256
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"


def llama3_special_tokens() -> list[str]:
    """LLaMA-3.0's 256 special tokens, in id order (they follow the BPE ranks)."""
    named = [BOS, EOS, PAD, "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
             "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|reserved_special_token_4|>", "<|eot_id|>"]
    return named + [f"<|reserved_special_token_{i}|>" for i in range(5, NUM_SPECIAL - 5)]


def is_tiktoken_file(path: Path) -> bool:
    """True when ``path`` starts like a tiktoken BPE file (``<base64> <int>`` lines)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    lines = head.split(b"\n")[:3]
    try:
        return bool(lines) and all(len(ln.split()) == 2 and ln.split()[1].isdigit()
                                   and base64.b64decode(ln.split()[0], validate=True) is not None
                                   for ln in lines if ln.strip())
    except (binascii.Error, ValueError):
        return False


def read_ranks(path: Path) -> dict[bytes, int]:
    """The ``{token bytes: rank}`` table of a tiktoken file; InputError naming the line if damaged."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
                if len(parts) != 2:
                    raise ValueError("expected two fields")
            except (binascii.Error, ValueError, IndexError) as exc:
                raise InputError(f"{path}: line {n}: not '<base64 token> <rank>' ({exc})") from None
            if token in ranks:
                raise InputError(f"{path}: line {n}: token listed twice")
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise InputError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise InputError(f"{path}: {len(missing)} single bytes have no token (e.g. {missing[0]}); not a byte-level BPE")
    return ranks


def _byte_chars() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what ByteLevel pre-tokenization uses)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte-level BPE vocabulary and merge list equivalent to tiktoken ``ranks``."""
    chars = _byte_chars()
    vocab = {"".join(chars[b] for b in token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, int, int, str, str]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = ranks.get(token[:i]), ranks.get(token[i:])
            if left is not None and right is not None:
                merges.append((rank, left, right, "".join(chars[b] for b in token[:i]), "".join(chars[b] for b in token[i:])))
    merges.sort()
    return vocab, [(a, b) for _, _, _, a, b in merges]


def hf_tokenizer_from_tiktoken(model_file: str | Path, chat_template: str | None = None) -> Any:
    """A ``PreTrainedTokenizerFast`` equal to LLaMA-3's tiktoken tokenizer (BOS added, EOS not)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    model_file = Path(model_file)
    ranks = read_ranks(model_file)
    vocab, merges = vocab_and_merges(ranks)
    tok = Tokenizer(BPE(vocab, merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = llama3_special_tokens()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos_id = len(ranks)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]),
    ])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 clean_up_tokenization_spaces=False, **{RECORDED_PRE: "llama-bpe"})
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf
