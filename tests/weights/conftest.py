"""Fixtures for the weights tests: small Meta checkpoints of any shape, built in a few ms."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def make_meta(tmp_path: Path, tokenizer_dir: Path) -> Callable[..., Path]:
    """``make_meta(n_shards=2, dim=64, n_heads=4, n_kv_heads=2, ...)`` -> a Meta checkpoint dir.

    Uses the session tokenizer (1000 pieces). q/k weights are scaled up so that attention is
    sharp: with near-uniform attention a wrong rotary layout would barely change the logits.
    """
    from llama_pipe.weights import meta
    from llama_pipe.weights.tiny import random_weights, write_meta_checkpoint

    counter = iter(range(1000))

    def build(n_shards: int = 2, dtype: str = "float32", seed: int = 0, **shape: Any) -> Path:
        defaults: dict[str, Any] = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=1000)
        params = meta.MetaParams(**{**defaults, **shape})
        weights = random_weights(params, params.vocab_size, seed=seed, dtype="float32")
        for name in weights:
            if name.endswith(("attention.wq.weight", "attention.wk.weight")):
                weights[name] = weights[name] * 15.0
        weights = {k: v.to(getattr(__import__("torch"), dtype)) for k, v in weights.items()}
        out = tmp_path / f"meta{next(counter)}"
        out.mkdir()
        write_meta_checkpoint(out, params, weights, n_shards)
        shutil.copyfile(tokenizer_dir / "tokenizer.model", out / "tokenizer.model")
        return out

    return build


@pytest.fixture(scope="session")
def tiktoken_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LLaMA-3-format tiktoken ``tokenizer.model``: a byte-level BPE of 3,000 ranks trained on
    the bundled sample (``<base64 bytes> <rank>`` lines, every single byte present)."""
    import base64
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from llama_pipe.weights.tiktoken_bpe import _byte_chars

    sample = Path(__file__).resolve().parents[2] / "data" / "sample" / "sharegpt_sample.json"
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
