"""split: chunks fit the trainer's rendering exactly, no empty chunk, no silently dropped pair."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llama_pipe.chat_template.builtin import get_template, to_messages, tokenize_with_labels
from tests.data.conftest import cli, read_jsonl, stats_of, turns, write_jsonl


def trainer_len(tok: Any, rec: dict, template: str = "vicuna_v1.1") -> int:
    """Tokens of a record exactly as the trainer tokenizes it."""
    text, spans = get_template(template).render(to_messages(rec))
    return len(tokenize_with_labels(tok, text, spans)[0])


def _words(n: int, seed: int) -> str:
    vocab = ["river", "garden", "window", "yellow", "quickly", "mountain", "question", "answer", "bread", "python"]
    return " ".join(vocab[(i * 7 + seed) % len(vocab)] for i in range(n))


@pytest.mark.parametrize("template", ["vicuna_v1.1", "llama-2", "chatml"])
def test_chunks_fit_exactly_and_ids(tmp_path: Path, tokenizer_dir: Path, tokenizer: Any, template: str) -> None:
    recs = [
        {"id": "long", "lang": "en", "conversations": turns(*[_words(5 + i, i) for i in range(16)])},
        {"id": "sys", "system": "You are terse.", "conversations": turns(*[_words(8, i) for i in range(6)])},
        {"id": "small", "conversations": turns("hi there", "hello, how can I help?")},
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", recs)
    out = tmp_path / "s.jsonl"
    assert cli("split", inp, "-o", out, "--tokenizer", tokenizer_dir, "--max-length", 300, "--template", template) == 0
    chunks = read_jsonl(out)
    stats = stats_of(out)
    assert stats["unit"] == "pairs" and stats["in"] == 8 + 3 + 1 == stats["out"]
    assert stats["chunks_out"] == len(chunks) and stats["records_in"] == 3
    by_src: dict[str, list[dict]] = {}
    for c in chunks:
        src, k = c["id"].rsplit("_", 1)
        by_src.setdefault(src, []).append(c)
        assert c["conversations"] and len(c["conversations"]) % 2 == 0
        n = trainer_len(tokenizer, c, template)
        assert n <= 300
    assert [c["id"] for c in by_src["long"]] == [f"long_{k}" for k in range(len(by_src["long"]))]
    assert len(by_src["long"]) > 2 and by_src["small"][0]["id"] == "small_0"
    assert all(c["lang"] == "en" for c in by_src["long"]) and by_src["sys"][0]["system"] == "You are terse."
    # pairs come out in order, none lost, none duplicated
    assert [t for c in by_src["long"] for t in c["conversations"]] == recs[0]["conversations"]
    # greedy: each chunk but the last could not take the next pair
    for a, b in zip(by_src["long"], by_src["long"][1:]):
        merged = {"conversations": a["conversations"] + b["conversations"][:2]}
        assert trainer_len(tokenizer, merged, template) > 300


def test_null_max_length_follows_chat_max_seq_len(tmp_path: Path, tokenizer_dir: Path, tokenizer: Any) -> None:
    """Without split.max_length, chunks are as long as the training rows (chat.max_seq_len): the
    same pair fits a 1024-token row and is rejected for a 200-token one."""
    recs = [{"id": "r", "conversations": turns("short question", _words(100, 3))}]  # ~450 tokens
    inp = write_jsonl(tmp_path / "in.jsonl", recs)
    for length, kept in ((1024, 1), (200, 0)):
        out = tmp_path / f"{length}.jsonl"
        assert cli("split", inp, "-o", out, "--tokenizer", tokenizer_dir, "--max-seq-len", length) == 0
        stats = stats_of(out)
        assert stats["max_length"] == length and stats["out"] == kept, stats


def test_long_pair_rejected_or_truncated(tmp_path: Path, tokenizer_dir: Path, tokenizer: Any) -> None:
    recs = [{"id": "r", "conversations": turns("short question", "short answer", "tell me more", _words(400, 1),
                                                "last question", "last answer")},
            {"id": "huge_human", "conversations": turns(_words(400, 2), "ok")}]
    inp = write_jsonl(tmp_path / "in.jsonl", recs)
    out = tmp_path / "rej.jsonl"
    assert cli("split", inp, "-o", out, "--tokenizer", tokenizer_dir, "--max-length", 200) == 0
    stats = stats_of(out)
    assert stats["rejected"] == {"pair_too_long": 2} and stats["out"] == 2
    rejects = read_jsonl(tmp_path / "rej.rejects.jsonl")
    assert [(r["id"], r["record"]["pair_index"]) for r in rejects] == [("r", 1), ("huge_human", 0)]
    assert all("max_length=200" in r["detail"] for r in rejects)
    # ids keep counting chunks; the rejected pair never leaves an empty chunk
    assert [c["id"] for c in read_jsonl(out)] == ["r_0", "r_1"]

    out2 = tmp_path / "trunc.jsonl"
    assert cli("split", inp, "-o", out2, "--tokenizer", tokenizer_dir, "--max-length", 200, "--on-long-pair", "truncate") == 0
    stats2 = stats_of(out2)
    assert stats2["pairs_truncated"] == 1 and stats2["rejected"] == {"pair_too_long": 1} and stats2["out"] == 3
    chunks = read_jsonl(out2)
    cut = next(c for c in chunks if c["conversations"][0]["value"] == "tell me more")
    assert recs[0]["conversations"][3]["value"].startswith(cut["conversations"][1]["value"])
    assert all(trainer_len(tokenizer, c) <= 200 for c in chunks)
    assert trainer_len(tokenizer, cut) > 180  # cut close to the limit, not to nothing


def test_malformed_records_are_counted(tmp_path: Path, tokenizer_dir: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}\n'
                   '{"id": "b", "conversations": [{"from": "human", "value": "q"}]}\n'
                   '{"id": "c", "conversations": [{"from": "gpt", "value": "1"}, {"from": "human", "value": "2"}, '
                   '{"from": "gpt", "value": "3"}, {"from": "human", "value": "4"}]}\n'
                   "not json\n")
    out = tmp_path / "s.jsonl"
    assert cli("split", inp, "-o", out, "--tokenizer", tokenizer_dir) == 0
    assert stats_of(out)["rejected"] == {"malformed_record": 1 + 2 + 1}


def test_missing_tokenizer_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "conversations": turns("q", "a")}])
    assert cli("split", inp, "-o", tmp_path / "s.jsonl", "--tokenizer", tmp_path / "nope") == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "s.jsonl").exists()


def test_shared_real_sample(tmp_path: Path, tokenizer_dir: Path, tokenizer: Any, shared_data: Path) -> None:
    out = tmp_path / "s.jsonl"
    assert cli("split", shared_data / "gitcloner_test.json", "-o", out, "--tokenizer", tokenizer_dir, "--max-length", 1024) == 0
    stats = stats_of(out)
    chunks = read_jsonl(out)
    assert stats["records_in"] == 1 and len(chunks) > 1
    assert all(trainer_len(tokenizer, c) <= 1024 for c in chunks)


def test_underestimated_plan_is_repacked_exactly(tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the cheap per-pair estimate is too low, the exact check re-packs; chunks still fit."""
    from llama_pipe.config import SplitSettings
    from llama_pipe.data import split as split_mod

    monkeypatch.setattr(split_mod.Splitter, "header", lambda self, system: 0)
    recs = [{"id": "r", "conversations": turns(*[_words(5 + i, i) for i in range(12)])}]
    out = tmp_path / "s.jsonl"
    split_mod.split_file(write_jsonl(tmp_path / "in.jsonl", recs), out, tokenizer, SplitSettings(max_length=300))
    chunks = read_jsonl(out)
    assert len(chunks) > 1 and all(trainer_len(tokenizer, c) <= 300 for c in chunks)
    assert [t for c in chunks for t in c["conversations"]] == recs[0]["conversations"]


def _odd_texts(sample: Path) -> list[str]:
    import json

    texts = ["", " ", "  two leading spaces", "trailing  ", "<s>bos in text</s> and <unk>", "<|im_start|>user\nhi<|im_end|>\n",
             "tab\tand\nnewlines\r\n", "你好，世界 😀 ñ café", "\u2028\ufeff", "x" * 3000, "Ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ"]
    recs = [r for r in json.loads(sample.read_text(encoding="utf-8"))[:40]
            if isinstance(r, dict) and isinstance(r.get("conversations"), list)]
    for name in ("vicuna_v1.1", "llama-2", "chatml"):
        for r in recs:
            try:
                texts.append(get_template(name).render(to_messages(r))[0])
            except Exception:  # noqa: BLE001 - the sample's broken records
                continue
    return texts


def test_rust_only_tokenizer_gives_the_transformers_ids(tmp_path: Path, tokenizer_dir: Path, tokenizer: Any) -> None:
    """split loads tokenizer.json with the tokenizers library alone only where that is exact."""
    import json
    import shutil

    from llama_pipe.data.rust_tokenizer import load_rust_tokenizer, why_not_rust
    from tests.data.conftest import SAMPLE

    texts = _odd_texts(SAMPLE)
    resaved = tmp_path / "resaved"  # as convert writes it: loaded and saved by transformers
    tokenizer.save_pretrained(resaved)
    for d in (tokenizer_dir, resaved):
        assert why_not_rust(d) is None
        rust = load_rust_tokenizer(d)
        assert rust is not None
        for special in (True, False):
            ours = [e.ids for e in rust.encode_batch(texts, add_special_tokens=special)]
            assert ours == [list(x) for x in tokenizer(texts, add_special_tokens=special)["input_ids"]]
    # settings under which transformers changes the pipeline: declined (split then loads through transformers)
    for key, value in (("add_eos_token", True), ("legacy", True), ("tokenizer_class", "GPT2Tokenizer")):
        d = tmp_path / key
        shutil.copytree(tokenizer_dir, d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**cfg, key: value}))
        assert load_rust_tokenizer(d) is None and key in why_not_rust(d)
    d = tmp_path / "prepend"
    shutil.copytree(tokenizer_dir, d)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["prepend_scheme"] = "always"
    (d / "tokenizer.json").write_text(json.dumps(tj))
    assert load_rust_tokenizer(d) is None and "pre_tokenizer" in why_not_rust(d)


def _giant_records() -> list[dict]:
    giant = _words(60_000, 3)  # ~400 kB: a pasted log or file dump in one turn
    return [
        {"id": "g", "conversations": turns("short question", "short answer", "paste", giant,
                                           "last question", "last answer", "and then?", "fine")},
        {"id": "gh", "conversations": turns(giant, "ok")},  # the human turn alone is too long
        {"id": "plain", "conversations": turns(*[_words(12, i) for i in range(8)])},
    ]


@pytest.mark.parametrize("mode", ["reject", "truncate"])
def test_giant_turn_is_bounded_not_tokenized_and_output_unchanged(tmp_path: Path, tokenizer: Any, mode: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A pair that provably exceeds max_length is handled without tokenizing it, with the same
    chunks, cuts and rejects as when every pair is measured."""
    from llama_pipe.config import SplitSettings
    from llama_pipe.data import split as split_mod

    inp = write_jsonl(tmp_path / "in.jsonl", _giant_records())
    cfg = SplitSettings(max_length=256, on_long_pair=mode)
    longest: list[int] = [0]
    lengths, offsets = split_mod.Splitter.lengths, split_mod.Splitter._with_offsets

    def spy_lengths(self, texts, special=True):
        longest[0] = max([longest[0], *map(len, texts)])
        return lengths(self, texts, special)

    def spy_offsets(self, texts):
        longest[0] = max([longest[0], *map(len, texts)])
        return offsets(self, texts)

    monkeypatch.setattr(split_mod.Splitter, "lengths", spy_lengths)
    monkeypatch.setattr(split_mod.Splitter, "_with_offsets", spy_offsets)
    fast = split_mod.split_file(inp, tmp_path / "fast.jsonl", tokenizer, cfg, tmp_path / "fast.rej.jsonl")
    assert longest[0] < 20_000  # the 400 kB turn never reached the tokenizer

    monkeypatch.setattr(split_mod.Splitter, "_char_bound", lambda self: None)  # measure everything
    slow = split_mod.split_file(inp, tmp_path / "slow.jsonl", tokenizer, cfg, tmp_path / "slow.rej.jsonl")
    assert longest[0] > 300_000
    assert read_jsonl(tmp_path / "fast.jsonl") == read_jsonl(tmp_path / "slow.jsonl")
    rej_fast, rej_slow = read_jsonl(tmp_path / "fast.rej.jsonl"), read_jsonl(tmp_path / "slow.rej.jsonl")
    assert [(r["id"], r["reason"], r["record"]) for r in rej_fast] == [(r["id"], r["reason"], r["record"]) for r in rej_slow]
    assert all("max_length=256" in r["detail"] for r in rej_fast)
    assert fast.n_in == slow.n_in == fast.n_out + sum(fast.rejected.values())
    assert (fast.n_out, fast.extra) == (slow.n_out, slow.extra)
    if mode == "truncate":
        assert fast.extra["pairs_truncated"] == 1
        chunk = next(c for c in read_jsonl(tmp_path / "fast.jsonl") if c["conversations"][0]["value"] == "paste")
        assert 200 < trainer_len(tokenizer, chunk) <= 256


def test_bound_is_never_above_the_token_count(tokenizer: Any) -> None:
    """The character bound that lets split skip tokenizing must be a true lower bound."""
    from llama_pipe.config import SplitSettings
    from llama_pipe.data.split_plan import Splitter

    sp = Splitter(tokenizer, SplitSettings(), get_template("vicuna_v1.1"), 512)
    assert sp._bound is not None  # the bundled sentencepiece BPE has byte fallback
    texts = [_words(500, 1), "   spaced    out   " * 50, "你好，世界。" * 300, "x" * 5000, "<s></s>" * 100,
             "ΑΒΓ déjà vu naïve café — “quotes” …" * 60, "\n\n".join(_words(40, i) for i in range(20)), ""]
    for t in texts:
        assert sp.min_tokens(t) <= sp.lengths([t], special=False)[0]


def test_workers_give_the_same_chunks(tmp_path: Path, tokenizer_dir: Path, sample: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker processes split batches of records; the files are those of one process, byte for byte."""
    from llama_pipe.data import split as split_mod

    monkeypatch.setattr(split_mod, "RECORDS_PER_STEP", 8)  # several batches, so two processes run
    assert cli("clean", sample, "-o", tmp_path / "clean.jsonl") == 0
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}" / "s.jsonl"
        assert cli("split", tmp_path / "clean.jsonl", "-o", out, "--tokenizer", tokenizer_dir, "--max-length", 300,
                   "--on-long-pair", "truncate", "--workers", workers) == 0
        stats = stats_of(out)
        assert stats["workers"] == int(workers)
        outs.append([out.read_bytes(), out.with_name("s.rejects.jsonl").read_bytes(), {k: v for k, v in stats.items() if k != "workers"}])
    assert outs[0] == outs[1]
