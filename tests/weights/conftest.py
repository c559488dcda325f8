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
    from llama_pipe.weights.make_base import random_weights, write_meta_checkpoint

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
