"""filter-lang: deterministic detection, code removed, zh matching, keep/skip/unknown."""

from __future__ import annotations

import json
from pathlib import Path

from llama_pipe.data.filter_lang import matches, prose
from tests.data.conftest import cli, read_jsonl, stats_of, turns, write_jsonl

EN = "The weather was lovely today, so we walked along the river and talked about our plans for the summer holidays."
ZH_CN = "今天天气很好，我们沿着河边散步，聊了聊暑假的计划。我想去北京看看故宫和长城。"
ZH_TW = "今天天氣很好，我們沿著河邊散步，聊了聊暑假的計劃。我想去台北看看故宮博物院。"
DE = "Heute war das Wetter herrlich, also sind wir am Fluss spazieren gegangen und haben über den Sommerurlaub gesprochen."
KO = "오늘은 날씨가 정말 좋아서 강을 따라 산책하면서 여름 방학 계획에 대해 이야기했습니다."
CODE = "```python\n" + "\n".join(f"def function_number_{i}(value):\n    return value * {i}  # multiply the value" for i in range(30)) + "\n```"


def _records() -> list[dict]:
    return [
        {"id": "en", "conversations": turns(EN, EN)},
        {"id": "zhcn", "conversations": turns(ZH_CN, ZH_CN)},
        {"id": "zhtw", "conversations": turns(ZH_TW, ZH_TW)},
        {"id": "de", "conversations": turns(DE, DE)},
        {"id": "ko", "conversations": turns(KO, KO)},
        # Chinese prose around a long English-looking code block: the code must not decide
        {"id": "zhcode", "conversations": turns("请帮我写一个函数。" + ZH_CN, "好的，下面是代码：\n\n" + CODE + "\n\n" + ZH_CN + " `inline_code_value`")},
        {"id": "short", "conversations": turns("ok", "```python\nprint(1)\n```")},  # too short to tell: und
        {"id": "none", "conversations": turns("👍 42", "```python\nprint(1)\n```")},  # no letters: unknown
    ]


def test_keep_matches_primary_subtag_and_code_is_ignored(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", _records())
    out = tmp_path / "f.jsonl"
    assert cli("filter-lang", inp, "-o", out, "--keep", "en,zh") == 0
    kept = {r["id"]: r["lang"] for r in read_jsonl(out)}
    assert kept == {"en": "en", "zhcn": "zh-cn", "zhtw": "zh-tw", "zhcode": "zh-cn", "short": "und"}
    stats = stats_of(out)
    assert stats["rejected"] == {"lang_not_kept": 2, "lang_unknown": 1}


def test_skip_and_keep_unknown_and_exact_subtag(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", _records())
    out = tmp_path / "f.jsonl"
    assert cli("filter-lang", inp, "-o", out, "--keep", "[]", "--skip", "ko,zh-tw", "--keep-unknown", "true") == 0
    kept = {r["id"]: r["lang"] for r in read_jsonl(out)}
    assert set(kept) == {"en", "zhcn", "de", "zhcode", "short", "none"} and kept["none"] == "unknown"
    assert stats_of(out)["rejected"] == {"lang_skipped": 2}


def test_deterministic_across_workers_and_order(tmp_path: Path, sample: Path, monkeypatch) -> None:
    from llama_pipe.data import filter_lang

    monkeypatch.setattr(filter_lang, "BATCH", 16)  # several tasks, so --workers 2 runs two processes
    assert cli("clean", sample, "-o", tmp_path / "clean.jsonl") == 0
    recs = read_jsonl(tmp_path / "clean.jsonl")
    a = write_jsonl(tmp_path / "a.jsonl", recs)
    b = write_jsonl(tmp_path / "b.jsonl", recs[::-1])
    outs = []
    for name, inp, workers in (("1", a, "1"), ("2", a, "2"), ("3", b, "2")):
        out = tmp_path / f"o{name}.jsonl"
        assert cli("filter-lang", inp, "-o", out, "--keep", "[]", "--workers", workers) == 0
        outs.append({r["id"]: r["lang"] for r in read_jsonl(out)})
        assert stats_of(out)["workers"] == int(workers)
    assert outs[0] == outs[1] == outs[2]
    assert {"en", "zh-cn", "de", "fr", "es", "ja", "ko"} <= set(outs[0].values())


def test_shared_chinese_and_english(tmp_path: Path, shared_data: Path) -> None:
    for name, lang, min_share in (("gitcloner_dummy_cn.json", "zh", 0.99), ("gitcloner_dummy_en.json", "en", 0.99)):
        out = tmp_path / f"{lang}.jsonl"
        part = write_jsonl(tmp_path / f"{name}l", json.loads((shared_data / name).read_text())[:300])
        assert cli("filter-lang", part, "-o", out, "--keep", lang) == 0
        stats = stats_of(out)
        assert stats["out"] >= min_share * stats["in"], stats


def test_helpers() -> None:
    assert matches("zh-cn", ["zh"]) and matches("zh-tw", ["zh-tw"]) and not matches("zh-cn", ["zh-tw"])
    assert not matches("en", ["zh"])
    text = prose({"conversations": turns("a `x_y` b", "```js\nlet q = 1;\n```\nc")}, 100)
    assert "x_y" not in text and "let q" not in text and "a" in text and "c" in text


def test_short_chinese_with_latin_names_is_chinese(tmp_path: Path) -> None:
    recs = [{"id": f"r{i}", "conversations": turns("你是谁?", v)} for i, v in enumerate([
        "我叫Gitclone,我是git-cloner开发的语言模型。",
        "你可以叫我Gitclone, 我接受过一个语言模型，是由git-cloner研究人员训练的。",
        "我是一个语言模型叫Gitclone, 我受过git-cloner研究人员的训练。",
    ])]
    out = tmp_path / "f.jsonl"
    assert cli("filter-lang", write_jsonl(tmp_path / "in.jsonl", recs), "-o", out, "--keep", "zh") == 0
    assert [r["lang"] for r in read_jsonl(out)] == ["zh-cn"] * 3


def _stock_langprob(text: str) -> list[float] | None:
    from langdetect.lang_detect_exception import LangDetectException

    from llama_pipe.data import filter_lang as L

    d = L._detector()  # stock langdetect, seeded
    d.append(text)
    try:
        d.get_probabilities()
    except LangDetectException:
        return None
    return list(d.langprob)


def test_batch_detector_gives_langdetects_probabilities_bit_for_bit(tmp_path: Path, sample: Path) -> None:
    """All 55 probabilities of every text equal stock langdetect's exactly, in batches of any size
    (the trials run side by side) and for a text run alone (out of drawn words)."""
    from langdetect import DetectorFactory

    from llama_pipe.config import FilterLangSettings
    from llama_pipe.data import filter_lang as L

    assert cli("clean", sample, "-o", tmp_path / "clean.jsonl") == 0
    texts = [L.prose(r, 1000) for r in read_jsonl(tmp_path / "clean.jsonl")]
    texts += [EN, ZH_CN, ZH_TW, DE, KO, "x", " ", "", "1234 !!", "ABC def GHI jkl", "https://example.com a@b.org", "Tiếng Việt có dấu"]
    # ambiguous texts, where trials disagree and run long
    texts += ["Ciao hello bonjour hola", "Das ist gut, that is good", "no sí oui", "Salut ok merci bien danke",
              "我叫Gitclone，是git-cloner开发的模型", "banco casa porta mesa", "Mi piace la pizza, I like it"]
    L._init(FilterLangSettings())
    assert DetectorFactory.seed == 0
    theirs = [_stock_langprob(t) for t in texts]
    fast = L._fast()
    assert fast.probabilities(texts) == theirs
    assert [fast.probabilities([t])[0] for t in texts[-12:]] == theirs[-12:]
    rows = [fast.prepare(t) for t in texts[-7:]]
    assert [fast._alone(r).tolist() for r in rows] == theirs[-7:]


def test_ngram_rows_match_langdetect(tmp_path: Path, sample: Path) -> None:
    from llama_pipe.data import filter_lang as L

    assert cli("clean", sample, "-o", tmp_path / "clean.jsonl") == 0
    texts = [L.prose(r, 1000) for r in read_jsonl(tmp_path / "clean.jsonl")]
    texts += ["ABC def GHI jkl", "Hello World  two  spaces ", "ÀÉÎ õü ß 123 !!", "カタカナ ひらがな 漢字", "x", " ", "ŞȚș țara", "aB Cd EFg",
              "Python 中的列表和元组有什么区别？学习机器学习之前", "mail me at someone@example.org or https://x.y/z?q=1 now"]
    fast = L._fast()
    for t in texts:
        d = L._detector()
        d.append(t)
        d.cleaning_text()
        assert fast.prepare(t).tolist() == [fast.row[g] for g in d._extract_ngrams()], t[:60]


def test_drawn_words_are_the_random_generators() -> None:
    """The words drawn once per process give random.gauss's values and random.choice's picks."""
    import random

    from llama_pipe.data import filter_lang as L

    fast = L._fast()
    rnd = random.Random()
    rnd.seed(fast.seed)
    assert fast._gauss(0) == (rnd.gauss(0.0, 1.0), rnd.gauss(0.0, 1.0))
    for n in (1, 2, 3, 7, 100, 1000, 2999):
        rnd.seed(fast.seed)
        want = [rnd._randbelow(n) for _ in range(50)]
        cand = fast.words >> (32 - n.bit_length())
        assert cand[cand < n][:50].tolist() == want


def test_mostly_english_with_chinese_and_korean_quotes_is_english(tmp_path: Path) -> None:
    """CJK text is counted in words (2 Han characters, or one run of Hangul syllables, a word), so
    an English conversation quoting Chinese and Korean is not detected without its English."""
    rec = {"id": "mixed", "conversations": turns(
        "Can you translate 'good morning' into Chinese and Korean? 请用中文和韩语回答。",
        "In Chinese it is 早上好 (zǎoshang hǎo); in Korean 좋은 아침입니다. Bonjour en français.",
        "谢谢！那么'晚安'怎么说？", "晚安 (wǎn'ān) in Chinese, 안녕히 주무세요 in Korean.")}
    out = tmp_path / "f.jsonl"
    assert cli("filter-lang", write_jsonl(tmp_path / "in.jsonl", [rec]), "-o", out) == 0
    assert [r["lang"] for r in read_jsonl(out)] == ["en"]


def test_cld2_detector_spells_codes_as_langdetect(tmp_path: Path) -> None:
    """detector: cld2 gives the same labels on clear texts, so keep/skip lists mean the same."""
    import pytest

    pytest.importorskip("pycld2")
    from llama_pipe.data.filter_lang import detect_cld2

    assert detect_cld2("text with a lone \ud83d surrogate") == ("unknown", False)  # not encodable: unknown, not a crash
    inp = write_jsonl(tmp_path / "in.jsonl", _records())
    out = tmp_path / "f.jsonl"
    assert cli("filter-lang", inp, "-o", out, "--keep", "[]", "--keep-unknown", "true", "--detector", "cld2") == 0
    kept = {r["id"]: r["lang"] for r in read_jsonl(out)}
    assert kept == {"en": "en", "zhcn": "zh-cn", "zhtw": "zh-tw", "de": "de", "ko": "ko", "zhcode": "zh-cn",
                    "short": "und", "none": "unknown"}


def test_cld2_without_pycld2_is_a_config_error(tmp_path: Path, monkeypatch, capsys) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pycld2", None)  # import fails as if not installed
    inp = write_jsonl(tmp_path / "in.jsonl", _records())
    assert cli("filter-lang", inp, "-o", tmp_path / "f.jsonl", "--detector", "cld2") == 2
    assert "pycld2" in capsys.readouterr().err and not (tmp_path / "f.jsonl").exists()


SHORT = Path(__file__).resolve().parents[2] / "bench" / "data" / "short_texts.jsonl"


def test_short_english_is_not_dropped_on_a_guess(tmp_path: Path) -> None:
    """langdetect calls "Are you Siri?" Turkish (p = 0.99999) and "Tell me a joke." Finnish: a text
    too short for a reliable guess is 'und' and kept (undetermined: keep), or dropped with its own
    reason (undetermined: drop); short CJK text is labelled by its script."""
    lines = {"siri": "Are you Siri?", "joke": "Tell me a joke.", "night": "Good night!", "hi": "Hi there!",
             "zh": "谢谢你的帮助。", "ja": "おやすみなさい！", "ko": "안녕하세요!", "fr": "Peux-tu m'aider ?"}
    recs = [{"id": k, "conversations": turns(v, "OK.")} for k, v in lines.items()]
    inp = write_jsonl(tmp_path / "in.jsonl", recs)
    out = tmp_path / "f.jsonl"
    assert cli("filter-lang", inp, "-o", out, "--keep", "en,zh") == 0
    kept = {r["id"]: r["lang"] for r in read_jsonl(out)}
    # langdetect's Turkish, Finnish, Afrikaans are not shared by cld2: und, kept; French both agree on
    assert kept == {"siri": "und", "joke": "und", "night": "und", "hi": "und", "zh": "zh-cn"}
    assert stats_of(out)["rejected"] == {"lang_not_kept": 3}  # fr; ja, ko: their script names them
    assert cli("filter-lang", inp, "-o", out, "--keep", "en,zh", "--undetermined", "drop") == 0
    assert {r["id"] for r in read_jsonl(out)} == {"zh"}
    assert stats_of(out)["rejected"] == {"lang_not_kept": 3, "lang_undetermined": 4}
    # without the cross-check, langdetect's guess decides from min_chars letters on
    assert cli("filter-lang", inp, "-o", out, "--keep", "en,zh", "--cross-check", "false") == 0
    assert "siri" not in {r["id"] for r in read_jsonl(out)}  # Turkish, dropped: what the cross-check prevents


def test_no_english_or_chinese_line_of_the_labelled_set_is_dropped() -> None:
    """bench/data/short_texts.jsonl (hand-labelled short chat lines in 11 languages): with the
    default settings and the pipeline's keep [en, zh], no en/zh line is dropped (before: 40 of
    102), and a line that gets a language gets the right one (bench/lang_short.py measures more)."""
    from llama_pipe.config import FilterLangSettings
    from llama_pipe.data.filter_lang import UNDETERMINED, _init, detect_language

    cfg = FilterLangSettings()
    _init(cfg)
    rows = [json.loads(line) for line in SHORT.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 290 and len({r["lang"] for r in rows}) == 11
    labels = [detect_language(r["text"], cfg.min_chars, cfg.detector, cfg.min_confidence, cfg.cross_check) for r in rows]
    dropped = [r["text"] for r, lab in zip(rows, labels) if r["lang"] in ("en", "zh") and not (lab == UNDETERMINED or matches(lab, cfg.keep))]
    assert dropped == []
    wrong = [(r["text"], lab) for r, lab in zip(rows, labels) if lab != UNDETERMINED and lab.split("-")[0] != r["lang"]]
    assert wrong == []
