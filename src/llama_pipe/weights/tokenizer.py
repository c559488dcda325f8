"""Tokenizers: train the tiny sentencepiece model, build and load Hugging Face tokenizers.

transformers 5 note: ``LlamaTokenizerFast(vocab_file=...)`` silently builds a 3-token vocab.
What works is putting the model at ``DIR/tokenizer.model`` and calling
``LlamaTokenizer.from_pretrained(DIR)`` (needs ``protobuf``); ``add_bos_token`` must be set
explicitly. ``load_tokenizer`` checks the result so a broken tokenizer never goes unnoticed.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llama_pipe.core.errors import InputError
from llama_pipe.weights.tiktoken_bpe import hf_tokenizer_from_tiktoken, is_tiktoken_file
from llama_pipe.weights.validate import refuse_remote_code

# Kept as single pieces so that every template's markers tokenise to one token each.
SPECIAL_PIECES = ["<|im_start|>", "<|im_end|>"]


def train_sentencepiece(texts: Iterable[str], out_file: str | Path, vocab_size: int, seed: int = 0) -> Path:
    """Train a LLaMA-style sentencepiece BPE (byte fallback, <unk>=0 <s>=1 </s>=2) to ``out_file``.

    Deterministic for the same texts, vocab size and seed (one trainer thread, no sampling).
    """
    import sentencepiece as spm

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    lines = [t.replace("\x00", " ") for t in texts if t and t.strip()]
    if not lines:
        raise InputError("no text to train the tokenizer on (tokenizer corpus is empty)")
    # Written to memory, not to a temporary model_prefix: the prefix would be stored in the
    # model's trainer_spec and make the bytes differ from run to run.
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.9995,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=SPECIAL_PIECES,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        seed_sentencepiece_size=1_000_000,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    tmp_out = out_file.with_name(f".{out_file.name}.tmp")
    tmp_out.write_bytes(buffer.getvalue())
    tmp_out.replace(out_file)
    return out_file


def hf_tokenizer_from_sentencepiece(model_file: str | Path, chat_template: str | None = None) -> Any:
    """A Hugging Face LlamaTokenizer built from a sentencepiece ``tokenizer.model``.

    BOS is added, EOS is not; the pad token is ``<unk>`` (never the ``</s>`` used as a label).
    """
    from transformers import LlamaTokenizer

    model_file = Path(model_file)
    if not model_file.is_file():
        raise InputError(f"{model_file}: tokenizer.model not found")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(model_file, Path(tmp) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False, legacy=False)
    # from_pretrained records how it was loaded (local_files_only follows HF_HUB_OFFLINE): not
    # settings of the tokenizer, and saved they would make the converted files depend on the
    # environment.
    for key in ("local_files_only", "cache_dir", "token"):
        tok.init_kwargs.pop(key, None)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    if chat_template is not None:
        tok.chat_template = chat_template
    check_tokenizer(tok, str(model_file))
    return tok


def hf_tokenizer_from_meta(model_file: str | Path, chat_template: str | None = None) -> Any:
    """The HF tokenizer for a Meta ``tokenizer.model``: LLaMA-3's tiktoken file, else sentencepiece (LLaMA-1/2)."""
    if is_tiktoken_file(Path(model_file)):
        tok = hf_tokenizer_from_tiktoken(model_file, chat_template=chat_template)
        check_tokenizer(tok, str(model_file))
        return tok
    return hf_tokenizer_from_sentencepiece(model_file, chat_template=chat_template)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer directory (HF files, or only ``tokenizer.model``) and sanity-check it. A
    ``tokenizer_config.json`` with an ``auto_map`` (a tokenizer class of the folder's own Python) is
    refused unless ``trust_remote_code``; transformers is never left to ask."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: tokenizer directory not found")
    refuse_remote_code(path, trust_remote_code, ("tokenizer_config.json",))
    names = {p.name for p in path.iterdir()}
    if not names & {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"}:
        raise InputError(
            f"{path}: no tokenizer files (expected tokenizer.json, tokenizer_config.json or tokenizer.model); "
            "use the converted model directory (e.g. results/hf_base), which holds them"
        )
    if "tokenizer.json" not in names and "tokenizer.model" in names:
        return hf_tokenizer_from_meta(path / "tokenizer.model")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types here
        raise InputError(f"{path}: cannot load tokenizer: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = _spare_pad(tok)
    check_tokenizer(tok, str(path))
    return tok


def _spare_pad(tok: Any) -> str:
    """A pad token for a tokenizer without one: ``<unk>``, else an unused special token (LLaMA-3's
    ``<|finetune_right_pad_id|>`` or a ``reserved`` one), else the EOS (refused by the check)."""
    if tok.unk_token is not None:
        return tok.unk_token
    specials = [t for t in tok.get_added_vocab() if t not in (tok.bos_token, tok.eos_token)]
    for word in ("pad", "reserved"):
        for t in sorted(specials, key=lambda t: tok.convert_tokens_to_ids(t)):
            if word in t:
                return t
    return tok.eos_token


def check_tokenizer(tok: Any, where: str) -> None:
    """Refuse a tokenizer training cannot use (too small, no EOS, a pad equal to the EOS label)."""
    if len(tok) < 260:
        raise InputError(f"{where}: tokenizer has only {len(tok)} tokens; the tokenizer files are incomplete")
    if tok.eos_token_id is None:
        raise InputError(f"{where}: tokenizer has no EOS token")
    if tok.pad_token_id == tok.eos_token_id:
        # The EOS is a label at the end of every assistant turn; a pad equal to it would be masked.
        if tok.unk_token_id is None:
            raise InputError(f"{where}: pad token equals EOS and there is no <unk> to pad with instead")
        tok.pad_token = tok.unk_token
