"""Benchmark: the language filter on short texts, before and after the reliability rule (issue 28).

    .venv/bin/python bench/lang_short.py [--data bench/data/short_texts.jsonl] [--detector langdetect]

The data: bench/data/short_texts.jsonl, ~300 short chat lines written for this benchmark and
labelled by hand (en, zh, fr, de, es, it, ca, pt, ru, ja, ko; one {"lang", "text"} per line).
Besides the lines themselves it scores them joined two and three at a time (same language, the
lines in file order), which shows how langdetect's accuracy grows with the length of the text.

Printed, for "before" (the rule of earlier versions: fewer than 10 characters is ``unknown``,
anything longer is langdetect's top language) and "after" (this version's ``filter_lang``
defaults: ``min_chars``, ``min_confidence``, ``und``):

* per language, the precision and recall of the label (``und`` and ``unknown`` are no answer:
  they lower recall, not precision);
* the filter's decision with the pipeline's ``keep: [en, zh]``: the share of each language's
  texts kept, and the precision/recall of the kept set (``undetermined: keep``, ``keep_unknown:
  false``, as in config.yaml);
* langdetect's top-language accuracy by length (letters) and by its probability.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llama_pipe.config import FilterLangSettings  # noqa: E402
from llama_pipe.data.filter_lang import UNDETERMINED, UNKNOWN, _init, detect_language, letters, matches  # noqa: E402

KEEP = ["en", "zh"]


def before(text: str, detector: str) -> str:
    """The rule of earlier versions: under 10 characters ``unknown``, else the detector's top
    language (after the same mixed-script rule), whatever its length or probability."""
    from langdetect.lang_detect_exception import LangDetectException

    from llama_pipe.data.filter_lang import _LATIN_WORD, _detector, cjk_words, detect_cld2

    if len(text.strip()) < 10:
        return UNKNOWN
    cjk = cjk_words(text)
    if cjk and cjk > len(_LATIN_WORD.findall(text)):
        text = _LATIN_WORD.sub(" ", text)
    if detector == "cld2":
        return detect_cld2(text)[0]
    try:
        det = _detector()
        det.append(text)
        return str(det.detect())
    except LangDetectException:
        return UNKNOWN


def after(text: str, detector: str, cfg: FilterLangSettings) -> str:
    return detect_language(text, cfg.min_chars, detector, cfg.min_confidence, cfg.cross_check)


def kept(label: str, undetermined: str = "keep") -> bool:
    if label == UNKNOWN:
        return False
    if label == UNDETERMINED:
        return undetermined == "keep"
    return matches(label, KEEP)


def scores(rows: list[dict[str, str]], labels: list[str]) -> dict[str, dict[str, float]]:
    langs = sorted({r["lang"] for r in rows})
    out: dict[str, dict[str, float]] = {}
    for lang in langs:
        gold = [r["lang"] == lang for r in rows]
        pred = [lab.split("-")[0] == lang for lab in labels]
        tp = sum(g and p for g, p in zip(gold, pred))
        out[lang] = {"n": sum(gold), "precision": tp / sum(pred) if sum(pred) else float("nan"),
                     "recall": tp / sum(gold), "und": sum(g and lab in (UNDETERMINED, UNKNOWN) for g, lab in zip(gold, labels)),
                     "kept": sum(g and kept(lab) for g, lab in zip(gold, labels)) / sum(gold)}
    return out


def filter_scores(rows: list[dict[str, str]], labels: list[str]) -> dict[str, float]:
    wanted = [r["lang"] in KEEP for r in rows]
    keep = [kept(lab) for lab in labels]
    tp = sum(w and k for w, k in zip(wanted, keep))
    return {"kept": sum(keep), "precision": tp / sum(keep) if sum(keep) else float("nan"), "recall": tp / sum(wanted),
            "wanted_dropped": sum(w and not k for w, k in zip(wanted, keep)),
            "others_kept": sum(k and not w for w, k in zip(wanted, keep))}


def joined(rows: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    """Texts of ``n`` consecutive lines of one language, joined with a space."""
    out = []
    by_lang: dict[str, list[str]] = {}
    for r in rows:
        by_lang.setdefault(r["lang"], []).append(r["text"])
    for lang, texts in by_lang.items():
        for i in range(0, len(texts) - n + 1, n):
            out.append({"lang": lang, "text": " ".join(texts[i:i + n])})
    return out


def table(name: str, rows: list[dict[str, str]], labels_before: list[str], labels_after: list[str]) -> None:
    b, a = scores(rows, labels_before), scores(rows, labels_after)
    print(f"\n### {name}: {len(rows)} texts, {min(letters(r['text']) for r in rows)}-{max(letters(r['text']) for r in rows)} letters\n")
    print("| lang | n | precision before | recall before | precision after | recall after | und after | kept before | kept after |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for lang in a:
        print(f"| {lang} | {a[lang]['n']:.0f} | {b[lang]['precision']:.2f} | {b[lang]['recall']:.2f} | {a[lang]['precision']:.2f} | "
              f"{a[lang]['recall']:.2f} | {a[lang]['und']:.0f} | {b[lang]['kept']:.2f} | {a[lang]['kept']:.2f} |")
    fb, fa = filter_scores(rows, labels_before), filter_scores(rows, labels_after)
    print(f"\nfilter keep {KEEP}: before: kept {fb['kept']}, precision {fb['precision']:.3f}, recall {fb['recall']:.3f} "
          f"({fb['wanted_dropped']} en/zh texts dropped, {fb['others_kept']} others kept); after: kept {fa['kept']}, "
          f"precision {fa['precision']:.3f}, recall {fa['recall']:.3f} ({fa['wanted_dropped']} en/zh texts dropped, "
          f"{fa['others_kept']} others kept)")


def by_length(rows: list[dict[str, str]], detector: str) -> None:
    """langdetect's top-language accuracy (Latin and Cyrillic texts) by letters and by probability."""
    from llama_pipe.data.filter_lang import _detector, script_language

    buckets: dict[str, Counter[str]] = {}
    confident: dict[str, Counter[str]] = {}
    for r in rows:
        if script_language(r["text"]):
            continue
        det = _detector()
        det.append(r["text"])
        ranked = det.get_probabilities()
        if not ranked:
            continue
        ok = str(ranked[0].lang).split("-")[0] == r["lang"]
        n = letters(r["text"])
        band = "<20" if n < 20 else "20-39" if n < 40 else "40-59" if n < 60 else "60+"
        buckets.setdefault(band, Counter())["ok" if ok else "wrong"] += 1
        p = "p>=0.9" if ranked[0].prob >= 0.9 else "p<0.9"
        confident.setdefault(f"{band} {p}", Counter())["ok" if ok else "wrong"] += 1
    print("\n### langdetect's top language on Latin and Cyrillic texts, by letters (lines, pairs and triples)\n")
    print("| letters | texts | right | right with p >= 0.9 | right with p < 0.9 |")
    print("| --- | --- | --- | --- | --- |")
    for band in ("<20", "20-39", "40-59", "60+"):
        c = buckets.get(band, Counter())
        hi, lo = confident.get(f"{band} p>=0.9", Counter()), confident.get(f"{band} p<0.9", Counter())
        total = c["ok"] + c["wrong"]
        if total:
            print(f"| {band} | {total} | {c['ok'] / total:.2f} | {hi['ok']}/{hi['ok'] + hi['wrong']} | {lo['ok']}/{lo['ok'] + lo['wrong']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT / "bench" / "data" / "short_texts.jsonl"))
    parser.add_argument("--detector", default="langdetect", choices=["langdetect", "cld2"])
    args = parser.parse_args()
    cfg = FilterLangSettings(detector=args.detector)
    _init(cfg)
    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    print(f"detector {args.detector}; after = min_chars {cfg.min_chars}, min_confidence {cfg.min_confidence}, "
          f"cross_check {cfg.cross_check}, undetermined {cfg.undetermined}")
    for name, part in (("lines", rows), ("two lines joined", joined(rows, 2)), ("three lines joined", joined(rows, 3))):
        table(name, part, [before(r["text"], args.detector) for r in part], [after(r["text"], args.detector, cfg) for r in part])
    everything = rows + joined(rows, 2) + joined(rows, 3)
    print("\n### the filter (keep [en, zh]) on lines, pairs and triples together, by min_chars and min_confidence\n")
    print("| min_chars | min_confidence | cross_check | en/zh dropped | others kept | precision | recall |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    fb = filter_scores(everything, [before(r["text"], args.detector) for r in everything])
    print(f"| before (10 characters: unknown) | - | - | {fb['wanted_dropped']} | {fb['others_kept']} | {fb['precision']:.3f} | "
          f"{fb['recall']:.3f} |")
    for cross_check in (False, True):
        for min_chars in (10, 20, 30, 40):
            for min_confidence in (0.0, 0.9, 0.99):
                swept = FilterLangSettings(detector=args.detector, min_chars=min_chars, min_confidence=min_confidence,
                                           cross_check=cross_check)
                f = filter_scores(everything, [after(r["text"], args.detector, swept) for r in everything])
                default = (min_chars, min_confidence, cross_check) == (cfg.min_chars, cfg.min_confidence, cfg.cross_check)
                print(f"| {min_chars}{' (default)' if default else ''} | {min_confidence} | {cross_check} | {f['wanted_dropped']} | "
                      f"{f['others_kept']} | {f['precision']:.3f} | {f['recall']:.3f} |")
    if args.detector == "langdetect":
        by_length(everything, args.detector)
    return 0


if __name__ == "__main__":
    sys.exit(main())
