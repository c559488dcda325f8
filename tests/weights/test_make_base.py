"""make-base: the embedded tiny LLaMA in Meta's original, model-parallel layout."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from llama_pipe.cli import main
from llama_pipe.config import BaseSettings, TinyModelSettings
from llama_pipe.core.atomic import MARKER
from llama_pipe.core.errors import ConfigError
from llama_pipe.weights import meta
from llama_pipe.weights.make_base import make_base

REPO = Path(__file__).resolve().parents[2]


def _corpus(path: Path, n: int = 150) -> Path:
    lines = [
        json.dumps({"id": str(i), "conversations": [
            {"from": "human", "value": f"How do I sort a list of {i} numbers in Python?"},
            {"from": "gpt", "value": f"Use sorted(xs) or xs.sort(); both are O(n log n). 第{i}个例子。"},
        ]})
        for i in range(n)
    ]
    lines.insert(3, "{not json")  # a broken line is skipped, not fatal
    lines.insert(5, json.dumps(["not", "a", "record"]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _md5s(d: Path) -> dict[str, str]:
    return {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """make-base with the default settings (and the bundled sample corpus), from the repo root."""
    out = tmp_path_factory.mktemp("tiny") / "base"
    sample = REPO / "data/sample/sharegpt_sample.json"
    if not sample.is_file():
        pytest.skip("data/sample/sharegpt_sample.json not present")
    import os

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert main(["make-base", str(out)]) == 0  # defaults = the shipped config.yaml
    finally:
        os.chdir(cwd)
    return out


def test_layout_names_and_checklist(base: Path) -> None:
    import sentencepiece as spm

    assert sorted(p.name for p in base.iterdir() if p.name != MARKER) == [
        "checklist.chk", "consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model",
    ]
    params = json.loads((base / "params.json").read_text())
    assert params == {
        "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": params["vocab_size"],
        "multiple_of": 32, "norm_eps": 1e-5, "rope_theta": 10000.0, "max_seq_len": 1024,
    }
    assert params["vocab_size"] == spm.SentencePieceProcessor(model_file=str(base / "tokenizer.model")).get_piece_size()
    sums = meta.parse_checksums((base / "checklist.chk").read_text(), "checklist.chk")
    assert sums == {name: ("md5", digest) for name, digest in _md5s(base).items() if name not in ("checklist.chk", MARKER)}
    assert sum(f.stat().st_size for f in base.iterdir()) < 10 * 2**20


def test_shards_split_the_way_meta_splits(base: Path) -> None:
    s0, s1 = (torch.load(base / f"consolidated.0{i}.pth", weights_only=True) for i in range(2))
    params = json.loads((base / "params.json").read_text())
    dim, vocab, hidden = 64, params["vocab_size"], meta.ffn_hidden_dim(64, 32, None)
    kv = 2 * 16
    expect = {  # per-rank shapes: column-parallel halves dim 0, row-parallel halves dim 1
        "tok_embeddings.weight": (vocab, dim // 2),
        "layers.0.attention.wq.weight": (dim // 2, dim),
        "layers.0.attention.wk.weight": (kv // 2, dim),
        "layers.0.attention.wv.weight": (kv // 2, dim),
        "layers.0.attention.wo.weight": (dim, dim // 2),
        "layers.1.feed_forward.w1.weight": (hidden // 2, dim),
        "layers.1.feed_forward.w2.weight": (dim, hidden // 2),
        "layers.1.feed_forward.w3.weight": (hidden // 2, dim),
        "layers.1.attention_norm.weight": (dim,),
        "layers.1.ffn_norm.weight": (dim,),
        "norm.weight": (dim,),
        "output.weight": (vocab // 2, dim),
    }
    for name, shape in expect.items():
        assert tuple(s0[name].shape) == tuple(s1[name].shape) == shape, name
    assert set(s0) == set(s1) == set(meta.expected_shapes(meta.MetaParams(**params), vocab)) | {"rope.freqs"}
    for name in ("norm.weight", "layers.0.ffn_norm.weight", "rope.freqs"):
        assert torch.equal(s0[name], s1[name])  # replicated
    assert not torch.equal(s0["layers.0.attention.wq.weight"], s1["layers.0.attention.wq.weight"])
    assert not torch.allclose(s0["norm.weight"], torch.ones(dim))  # norms are not trivially 1


def test_same_settings_give_the_same_bytes(base: Path, tmp_path: Path) -> None:
    settings = BaseSettings(tokenizer_corpus=[str(REPO / "data/sample/sharegpt_sample.json")])
    again = make_base(tmp_path / "again", settings)
    assert _md5s(again) == _md5s(base)
    other = make_base(tmp_path / "seed1", BaseSettings(tokenizer_corpus=settings.tokenizer_corpus, tiny=TinyModelSettings(seed=1)))
    assert _md5s(other)["consolidated.00.pth"] != _md5s(base)["consolidated.00.pth"]


def test_small_corpus_shrinks_the_vocabulary_to_a_shardable_size(tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO", logger="llama_pipe")
    corpus = _corpus(tmp_path / "c.jsonl")
    settings = BaseSettings(tokenizer_corpus=[str(corpus)], tiny=TinyModelSettings(vocab_size=5000, n_shards=4, n_kv_heads=4))
    out = make_base(tmp_path / "b", settings)
    vocab = json.loads((out / "params.json").read_text())["vocab_size"]
    assert 300 <= vocab < 5000 and vocab % 4 == 0
    assert len(meta.shard_paths(out)) == 4
    assert "records used, 2 skipped" in caplog.text


def test_shards_that_do_not_divide_the_model_are_a_config_error(tmp_path: Path) -> None:
    settings = BaseSettings(tokenizer_corpus=[str(_corpus(tmp_path / "c.jsonl"))], tiny=TinyModelSettings(n_shards=4))
    with pytest.raises(ConfigError, match="n_shards=4 must divide n_kv_heads=2"):
        make_base(tmp_path / "b", settings)
    assert not list(tmp_path.glob("b*"))
