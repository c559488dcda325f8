"""LLaMA-3's tiktoken tokenizer as a Hugging Face tokenizer: the same ids as tiktoken itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_pipe.config import ConvertSettings
from llama_pipe.core.errors import InputError
from llama_pipe.weights.convert import convert
from llama_pipe.weights.tiktoken_bpe import (
    BOS,
    EOS,
    LLAMA3_PATTERN,
    PAD,
    hf_tokenizer_from_tiktoken,
    is_tiktoken_file,
    llama3_special_tokens,
    read_ranks,
)

REPO = Path(__file__).resolve().parents[2]
PROBES = [
    "  spaced   out\n\n\nlines\t\ttabs  ", "Numbers 1234567 and 3.14159, 1,000,000!", "emoji 😀👍🏽 and ZWJ 👩‍💻 done",
    "他们说：“你好，世界。” 日本語のテキスト", "Ελληνικά, русский, العربية", "I'm sure they'll say it's fine; we'd've",
    "<|eot_id|> inside <|start_header_id|>user<|end_header_id|>\n\nhi", "```python\ndef f(x):\n    return x ** 2\n```",
    "", "a", " ", "\n",
]


def _sample_texts() -> list[str]:
    recs = json.loads((REPO / "data" / "sample" / "sharegpt_sample.json").read_text(encoding="utf-8"))
    return [t["value"] for r in recs if isinstance(r, dict) for t in r.get("conversations") or []
            if isinstance(t, dict) and isinstance(t.get("value"), str)][:400]


def test_ids_equal_tiktoken_on_multilingual_text(tiktoken_model: Path) -> None:
    pytest.importorskip("tiktoken")
    import tiktoken.load

    ranks = tiktoken.load.load_tiktoken_bpe(str(tiktoken_model))
    specials = {s: len(ranks) + i for i, s in enumerate(llama3_special_tokens())}
    ref = tiktoken.Encoding("llama3-test", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    tok = hf_tokenizer_from_tiktoken(tiktoken_model)
    texts = _sample_texts() + PROBES
    for text in texts:
        assert tok(text, add_special_tokens=False)["input_ids"] == ref.encode(text, allowed_special="all"), text[:80]
    # BOS is prepended, nothing appended; special tokens sit after the ranks; decoding round-trips.
    assert tok("hi")["input_ids"][0] == tok.bos_token_id == len(ranks) and tok.convert_ids_to_tokens(len(ranks)) == BOS
    assert tok.eos_token == EOS and tok.pad_token == PAD and tok.pad_token_id != tok.eos_token_id
    assert len(tok) == len(ranks) + 256 and tok.convert_tokens_to_ids("<|eot_id|>") == len(ranks) + 9
    for text in PROBES:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # Offsets (used for the assistant-only loss mask) are character positions in the original
    # string, in order, covering it (a character split over byte tokens is in each of them).
    text = "héllo wörld 😀"
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert [a for a, _ in offsets] == sorted(a for a, _ in offsets) and offsets[-1][1] == len(text)
    assert set().union(*(range(a, b) for a, b in offsets)) == set(range(len(text)))


def test_damaged_tiktoken_files_are_named(tmp_path: Path, tiktoken_model: Path) -> None:
    lines = tiktoken_model.read_text().splitlines()
    bad = tmp_path / "bad.model"
    bad.write_text("\n".join(lines[:10] + ["!!not-base64 7"] + lines[11:]) + "\n")
    with pytest.raises(InputError, match="line 11"):
        read_ranks(bad)
    short = tmp_path / "short.model"
    short.write_text("IQ== 0\nIg== 1\nIw== 2\n")  # three tokens: not every byte is covered
    assert is_tiktoken_file(short)
    with pytest.raises(InputError, match="single bytes have no token"):
        read_ranks(short)
    assert not is_tiktoken_file(REPO / "README.md")


def test_llama3_meta_checkpoint_converts_and_loads(make_meta, tiktoken_model: Path, tmp_path: Path) -> None:
    """A LLaMA-3-layout checkpoint (tiktoken tokenizer, GQA, rope_theta 5e5, vocabulary split
    across shards) converts; the HF directory's tokenizer and model agree and load with Auto*."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llama_pipe.weights.tokenizer import load_tokenizer

    vocab = len(read_ranks(tiktoken_model)) + 256
    meta_dir = make_meta(n_shards=2, vocab_size=vocab, rope_theta=500000.0)
    (meta_dir / "tokenizer.model").write_bytes(tiktoken_model.read_bytes())
    out = tmp_path / "hf"
    convert(meta_dir, out, ConvertSettings())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == vocab and cfg["max_position_embeddings"] == 8192
    assert cfg["bos_token_id"] == vocab - 256 and cfg["eos_token_id"] == vocab - 255
    auto = AutoTokenizer.from_pretrained(str(out))
    ours = load_tokenizer(out)
    text = "Convert me, please: 123 😀"
    assert auto(text)["input_ids"] == ours(text)["input_ids"] == hf_tokenizer_from_tiktoken(tiktoken_model)(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        assert model(torch.tensor([ours(text)["input_ids"]])).logits.shape[-1] == vocab
    # A directory holding only Meta's tiktoken file loads too (what split/train get from a raw release).
    only = tmp_path / "only"
    only.mkdir()
    (only / "tokenizer.model").write_bytes(tiktoken_model.read_bytes())
    assert load_tokenizer(only)(text)["input_ids"] == ours(text)["input_ids"]


def test_a_tokenizer_without_pad_or_unk_gets_a_spare_special_token(tiktoken_model: Path, tmp_path: Path) -> None:
    """LLaMA-3 HF repos have no pad and no <unk>: padding must not fall back to the EOS, which is a
    label at the end of every reply; an unused special token is taken instead."""
    from llama_pipe.weights.tokenizer import load_tokenizer

    tok = hf_tokenizer_from_tiktoken(tiktoken_model)
    tok.pad_token = None
    tok.save_pretrained(str(tmp_path / "nopad"))
    loaded = load_tokenizer(tmp_path / "nopad")
    assert loaded.pad_token == PAD and loaded.pad_token_id != loaded.eos_token_id


def test_converted_llama3_trains_with_the_llama3_template(make_meta, tiktoken_model: Path, tmp_path: Path) -> None:
    """convert -> train (template llama-3) on a LLaMA-3-layout checkpoint: replies and <|eot_id|>
    are the only labels, and the loss goes down."""
    from llama_pipe.chat_template.builtin import get_template, to_messages, tokenize_with_labels
    from llama_pipe.config import ChatSettings, LoraSettings, TrainSettings
    from llama_pipe.train.train import train
    from llama_pipe.weights.tokenizer import load_tokenizer

    vocab = len(read_ranks(tiktoken_model)) + 256
    meta_dir = make_meta(n_shards=1, vocab_size=vocab)
    (meta_dir / "tokenizer.model").write_bytes(tiktoken_model.read_bytes())
    hf = tmp_path / "hf"
    convert(meta_dir, hf, ConvertSettings(), "llama-3")
    recs = json.loads((REPO / "data" / "sample" / "sharegpt_sample.json").read_text(encoding="utf-8"))
    recs = [{"id": r["id"], "conversations": r["conversations"][:2]} for r in recs
            if isinstance(r, dict) and isinstance(r.get("conversations"), list) and len(r["conversations"]) >= 2
            and [t.get("from") for t in r["conversations"][:2]] == ["human", "gpt"]
            and all(isinstance(t.get("value"), str) and t["value"] for t in r["conversations"][:2])][:40]
    train_f, val_f = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train_f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs[:32]), encoding="utf-8")
    val_f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs[32:]), encoding="utf-8")

    tok = load_tokenizer(hf)
    text, spans = get_template("llama-3").render(to_messages(recs[0]))
    ids, labels = tokenize_with_labels(tok, text, spans)
    labelled = [i for i, lab in zip(ids, labels) if lab != -100]
    assert tok.decode(labelled) == recs[0]["conversations"][1]["value"] + "<|eot_id|>"

    s = TrainSettings(micro_batch_size=4, max_steps=6, lr=1e-2, warmup_steps=0,
                      eval_every=6, save_every=100, lora=LoraSettings(r=8, alpha=16, dropout=0.0), device="cpu")
    summary = train(hf, train_f, val_f, tmp_path / "run", s, ChatSettings(template="llama-3", max_seq_len=512))
    assert summary["val_loss_after"] < summary["val_loss_before"]
    assert "<|eot_id|>" in (tmp_path / "run" / "chat_template.jinja").read_text()
