"""Shared fixtures: paths, the real third-party samples, a tiny tokenizer and a tiny HF model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE = REPO / "data" / "sample" / "sharegpt_sample.json"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present (the third-party samples live beside the repo)")
    return SHARED_DATA


def _corpus_texts() -> list[str]:
    texts = []
    for rec in json.loads(SAMPLE.read_text(encoding="utf-8")):
        if isinstance(rec, dict) and isinstance(rec.get("conversations"), list):
            texts += [t.get("value", "") for t in rec["conversations"] if isinstance(t, dict) and isinstance(t.get("value"), str)]
    # Templates' markers and some Chinese so byte fallback is not the only path.
    texts += ["USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>> system user assistant"] * 5
    return texts


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved HF tokenizer (sentencepiece BPE, 1000 pieces) trained on the bundled sample."""
    from llama_pipe.chat_template.builtin import get_template
    from llama_pipe.weights.tokenizer import hf_tokenizer_from_sentencepiece, train_sentencepiece

    out = tmp_path_factory.mktemp("tokenizer")
    model = train_sentencepiece(_corpus_texts(), out / "tokenizer.model", vocab_size=1000, seed=0)
    tok = hf_tokenizer_from_sentencepiece(model, chat_template=get_template("vicuna_v1.1").chat_template)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    from llama_pipe.weights.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_hf_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A random tiny LlamaForCausalLM (hidden 64, 2 layers, GQA) saved with the tokenizer."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_pipe.weights.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    out = tmp_path_factory.mktemp("tiny_hf")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def tiktoken_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LLaMA-3-format tiktoken ``tokenizer.model``: a byte-level BPE of 3,000 ranks trained on
    the bundled sample (``<base64 bytes> <rank>`` lines, every single byte present)."""
    import base64
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from llama_pipe.weights.tiktoken_bpe import _byte_chars

    sample = Path(__file__).resolve().parents[1] / "data" / "sample" / "sharegpt_sample.json"
    texts = [t["value"] for r in json.loads(sample.read_text(encoding="utf-8")) if isinstance(r, dict)
             for t in r.get("conversations") or [] if isinstance(t, dict) and isinstance(t.get("value"), str)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=3000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    to_byte = {c: b for b, c in _byte_chars().items()}
    ranks = sorted(((bytes(to_byte[c] for c in t), i) for t, i in tok.get_vocab().items()), key=lambda x: x[1])
    out = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    out.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for t, i in ranks), encoding="ascii")
    return out


@pytest.fixture(scope="session")
def llama3_tokenizer(tiktoken_model: Path):
    """A LLaMA-3-style tokenizer (tiktoken BPE -> tokenizer.json, LLaMA-3.0 special tokens)."""
    from llama_pipe.weights.tiktoken_bpe import hf_tokenizer_from_tiktoken

    return hf_tokenizer_from_tiktoken(tiktoken_model)
