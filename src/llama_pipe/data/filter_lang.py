"""``llama-pipe filter-lang``: one detected language per conversation; keep or drop by it.

The language is detected by langdetect on the conversation's text (all turns, joined) with fenced
code blocks and inline code removed, limited to the first ``max_chars`` characters. langdetect is
randomised; ``DetectorFactory.seed`` (the ``seed`` setting) makes every detection a pure function of
its text, so the result does not depend on record order or the number of workers. A text with no
letters (after code removal), or that langdetect cannot classify, is ``unknown``. A text with fewer
than ``min_chars`` letters is too short for a reliable guess: it is ``und`` (undetermined) unless
its script names its language (Hangul, kana, Han), and so is a longer one whose guess has a
probability under ``min_confidence``; ``undetermined`` keeps (default) or drops those, whatever
``keep`` and ``skip`` say, so short English ("Are you Siri?", which langdetect calls Turkish) is
not dropped on a guess. A text with more CJK words than Latin words is detected without its Latin
words (see :func:`detect_language`).

``detector: cld2`` uses pycld2 (the detector FastChat's optional_clean uses through polyglot)
instead: compiled, about 10x faster, deterministic without a seed; its codes are spelt as
langdetect's (``zh-cn``, ``zh-tw``, ``he``) so keep/skip lists mean the same with either.

Every kept record gets a ``lang`` field (langdetect's code: ``en``, ``de``, ``zh-cn``, ``zh-tw``,
...). ``keep`` and ``skip`` entries match a code exactly or by its primary subtag, so ``zh``
matches ``zh-cn`` and ``zh-tw``; an empty ``keep`` keeps every language not in ``skip``. A run
that gives ``skip`` but no ``keep`` (neither as a flag nor in its ``--config`` file) keeps every
language not skipped: the default ``keep: [en, zh]`` is the pipeline's, written in config.yaml.

Detection of one record has ``time_budget`` seconds (``too_slow`` beyond it); the text it reads is
bounded by ``max_chars`` before code is removed (:func:`prose`).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_pipe.config import FilterLangSettings, load_raw_config, settings_from_args
from llama_pipe.core.budget import TooSlow, within_budget
from llama_pipe.core.errors import ConfigError
from llama_pipe.core.records import InvalidLine
from llama_pipe.core.settings import add_settings_arguments
from llama_pipe.core.stage_writer import StageWriter
from llama_pipe.data.common import add_output_arguments, conversation_problem, log_settings, map_records, progress, resolve_workers
from llama_pipe.data.markdown import code_regions

UNKNOWN = "unknown"  # no language at all: no letters, or nothing langdetect knows
UNDETERMINED = "und"  # too short or too uncertain for a reliable guess (BCP 47's "undetermined")
# detector cld2 with cross_check: langdetect checks the answers on texts with fewer letters than this
# (where cld2 errs on the benchmark set: 4 of 149 pairs of short lines, none of the triples); on
# longer texts it would cost langdetect's time for nothing
CROSS_CHECK_LETTERS = 100
BATCH = 256  # records per worker task: langdetect runs a task's texts side by side


def _without_code(value: str) -> str:
    if "`" not in value and "~~~" not in value:
        return value
    pieces, pos = [], 0
    for s, e in code_regions(value):
        pieces.append(value[pos:s])
        pos = e
    pieces.append(value[pos:])
    return " ".join(pieces)


def prose(rec: dict[str, Any], max_chars: int) -> str:
    """A conversation's text without code, at most ``max_chars`` characters.

    ``max_chars`` bounds the work too: code is removed from a growing prefix of each turn
    (``max_chars``, then 4x as much, ...) until the prefix gives enough prose or is the whole turn,
    so a 10 MB turn costs a few times ``max_chars``, not a scan of 10 MB. (A code span opened
    inside a prefix and closed beyond it is removed to the prefix's end.)
    """
    parts: list[str] = []
    size = 0
    for turn in rec["conversations"]:
        value, need = turn["value"], max_chars - size
        window = need
        while True:
            text = _without_code(value[:window])
            if len(text) >= need or window >= len(value):
                break
            window *= 4
        parts.append(text)
        size += len(text) + 1
        if size >= max_chars:
            break
    return "\n".join(parts)[:max_chars]


def matches(lang: str, codes: list[str]) -> bool:
    """True when ``lang`` equals one of ``codes`` or has it as primary subtag (``zh`` ~ ``zh-cn``)."""
    lang = lang.lower()
    primary = lang.split("-")[0]
    return any(c.lower() in (lang, primary) for c in codes)


_CFG: FilterLangSettings | None = None
_FAST: Any = None  # the FastLangdetect of this process (langdetect_fast), built by _fast()


def _detector() -> Any:
    """A stock langdetect ``Detector`` (seeded by ``DetectorFactory.seed``): the reference the
    batch detector (:mod:`llama_pipe.data.langdetect_fast`) is checked against, and what
    bench/lang_short.py asks for probabilities."""
    from langdetect.detector_factory import init_factory

    init_factory()
    from langdetect.detector_factory import _factory

    return _factory.create()


def _fast() -> Any:
    """This process's :class:`~llama_pipe.data.langdetect_fast.FastLangdetect` for the current
    ``DetectorFactory.seed`` (profiles loaded once; forked workers inherit them)."""
    global _FAST
    from langdetect import DetectorFactory
    from langdetect.detector_factory import init_factory

    from llama_pipe.data.langdetect_fast import FastLangdetect

    seed = DetectorFactory.seed if DetectorFactory.seed is not None else 0
    if _FAST is None or _FAST.seed != seed:
        init_factory()
        _FAST = FastLangdetect(seed)
    return _FAST


def _init(cfg: FilterLangSettings) -> None:
    """Load langdetect's profiles once per process and fix its seed (nothing to load for cld2)."""
    global _CFG
    _CFG = cfg
    if cfg.detector == "cld2" and not cfg.cross_check:
        return
    from langdetect import DetectorFactory
    from langdetect.detector_factory import init_factory

    DetectorFactory.seed = cfg.seed
    init_factory()
    _fast()


# cld2 codes that langdetect spells differently (so keep/skip lists work with either detector)
CLD2_CODES = {"zh": "zh-cn", "zh-hant": "zh-tw", "iw": "he", "un": UNKNOWN, "xxx": UNKNOWN}


def detect_cld2(text: str) -> tuple[str, bool]:
    """pycld2's top language for ``text`` in langdetect's spelling (``zh-cn``/``zh-tw``), or
    ``unknown``; and whether cld2 calls its guess reliable.

    cld2 is deterministic (no seed). Text it cannot take (e.g. a lone surrogate) is ``unknown``.
    """
    import pycld2

    try:
        reliable, _, details = pycld2.detect(text)
    except (pycld2.error, UnicodeError, ValueError):
        return UNKNOWN, False
    code = str(details[0][1]).lower() if details else "un"
    return CLD2_CODES.get(code, code), bool(reliable)


_HAN_KANA = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_KANA = re.compile(r"[\u3040-\u30ff]")
_HANGUL = re.compile(r"[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]")
_HANGUL_WORD = re.compile(r"[\uac00-\ud7af]+")
_LATIN_WORD = re.compile(r"[A-Za-z\u00c0-\u024f]+")


def cjk_words(text: str) -> float:
    """Words of CJK script in ``text``: two Han/kana characters count as a word (Chinese and
    Japanese words average about two characters), a run of Hangul syllables as one (Korean puts
    spaces between words)."""
    if not text or max(text) < "\u1100":
        return 0
    return len(_HAN_KANA.findall(text)) / 2 + len(_HANGUL_WORD.findall(text))


def letters(text: str) -> int:
    """The letters of ``text`` (Unicode alphabetic characters; CJK ideographs and syllables count)."""
    return sum(n for ch, n in Counter(text).items() if ch.isalpha())


def script_language(text: str, n_letters: int | None = None) -> str | None:
    """The language a text's script names, when most of its letters are Hangul (``ko``), kana and
    Han with some kana (``ja``) or Han alone (``zh-cn``); else None. Used for texts too short for
    a statistical guess: a few CJK characters say more than a few Latin letters."""
    if not text or max(text) < "\u1100":  # no Hangul, kana or Han at all (a fast test for most texts)
        return None
    han, kana, hangul = (len(rx.findall(text)) for rx in (_HAN, _KANA, _HANGUL))
    if 2 * (han + kana + hangul) <= (letters(text) if n_letters is None else n_letters):
        return None
    if hangul >= han + kana:
        return "ko"
    return "ja" if kana else "zh-cn"


def detect_language(text: str, min_chars: int, detector: str = "langdetect", min_confidence: float = 0.0,
                    cross_check: bool = False) -> str:
    """The language code of ``text``: ``und`` when it is too short or too uncertain for a reliable
    guess, ``unknown`` when it has no language at all; by langdetect or, with
    ``detector="cld2"``, by :func:`detect_cld2`.

    Reliability: a text whose letters are mostly Hangul, kana or Han gets the language its script
    names (:func:`script_language`; the detector's answer where it agrees, which tells zh-cn from
    zh-tw). Any other text with fewer than ``min_chars`` letters is ``und``: on a few words
    langdetect is often wrong and sure of itself ("Are you Siri?" is Turkish at p = 0.99999), so
    its guess is not used. A longer text whose top language has a probability under
    ``min_confidence`` (with its variants: zh-cn and zh-tw share Chinese text's probability;
    cld2: a guess cld2 flags as unreliable) is ``und`` too, and with ``cross_check`` so is an
    answer the other detector does not share (langdetect takes "Hi! Are you a person? Hi! No, I
    am not a person. I'm Llama Pipe, an AI assistant." for Catalan at p = 0.99999; cld2 says
    English). With detector cld2 langdetect checks texts under ``CROSS_CHECK_LETTERS`` letters
    only. docs/benchmarks.md measures this on a labelled set of short texts (bench/lang_short.py).

    Mixed-script rule: when a text has more CJK words (:func:`cjk_words`) than Latin-script words,
    the Latin words are removed before detection. Without it, a short Chinese sentence with a
    product name ("我叫Gitclone，是git-cloner开发的模型") is classified from the Latin n-grams as
    Vietnamese, Italian or Catalan. Counting words rather than characters keeps a mostly English
    conversation that quotes some Chinese and Korean English (counting characters, the 37 CJK
    characters outweighed 26 English words and the Korean n-grams won).
    """
    return detect_languages([text], min_chars, detector, min_confidence, cross_check)[0]


def detect_languages(texts: list[str], min_chars: int, detector: str = "langdetect", min_confidence: float = 0.0,
                     cross_check: bool = False) -> list[str]:
    """:func:`detect_language` of each text; langdetect runs the texts together (langdetect_fast)."""
    pending = [screen_text(t, min_chars, detector, cross_check) for t in texts]
    return finish(pending, detector, min_confidence, cross_check)


@dataclass
class Pending:
    """A text that needs a detector: the text it sees, its letters and script, langdetect's
    n-gram rows (when langdetect runs on it) and cld2's answer (detector cld2)."""

    text: str
    letters: int
    script: str | None
    rows: Any = None
    cld2: tuple[str, bool] | None = None


def screen_text(text: str, min_chars: int, detector: str = "langdetect", cross_check: bool = False) -> str | Pending:
    """The label when no detector is needed (``unknown``: no letters; ``und``: too short), else
    what :func:`finish` needs (the per-text work: counts, the mixed-script rule, n-grams; cld2's
    answer with detector cld2)."""
    n_letters = letters(text)
    if n_letters == 0:
        return UNKNOWN
    script = script_language(text, n_letters)
    if n_letters < min_chars and script is None:
        return UNDETERMINED
    cjk = cjk_words(text)
    if cjk and cjk > len(_LATIN_WORD.findall(text)):
        text = _LATIN_WORD.sub(" ", text)
    p = Pending(text, n_letters, script)
    if detector == "cld2":
        p.cld2 = detect_cld2(text)
        if cross_check and script is None and n_letters < CROSS_CHECK_LETTERS:
            p.rows = _fast().prepare(text)  # langdetect checks cld2's answer on short text
    else:
        p.rows = _fast().prepare(text)
    return p


def finish(pending: list[str | Pending], detector: str, min_confidence: float, cross_check: bool) -> list[str]:
    """The labels of :func:`screen_text`'s results: langdetect's probabilities for all texts at
    once, then the confidence, script and cross-check rules of :func:`detect_language`."""
    todo = [p for p in pending if isinstance(p, Pending) and p.rows is not None and len(p.rows)]
    ranked: dict[int, list[tuple[str, float]]] = {}
    if todo:
        fast = _fast()
        ranked = {id(p): fast.ranked(prob) for p, prob in zip(todo, fast.run([p.rows for p in todo]))}
    out: list[str] = []
    for p in pending:
        if not isinstance(p, Pending):
            out.append(p)
            continue
        ld = ranked.get(id(p), [])
        ld_top = ld[0][0] if ld else UNKNOWN
        if detector == "cld2":
            assert p.cld2 is not None
            top, reliable = p.cld2
            confident = reliable or min_confidence <= 0
        else:
            top = ld_top
            # zh-cn and zh-tw share Chinese text's probability between them: sure of Chinese is enough
            confident = sum(prob for lang, prob in ld if lang.split("-")[0] == top.split("-")[0]) >= min_confidence
        if p.script is not None:
            # the script names the language; the detector may still tell zh-cn from zh-tw
            out.append(top if top.split("-")[0] == p.script.split("-")[0] else p.script)
        elif top == UNKNOWN or not confident:
            out.append(UNDETERMINED)  # letters, but no answer (cld2's "un" on short text) or an unsure one
        elif cross_check and (detector != "cld2" or p.letters < CROSS_CHECK_LETTERS):
            other = detect_cld2(p.text)[0] if detector != "cld2" else ld_top
            # two detectors that disagree: neither is reliable here
            out.append(UNDETERMINED if other.split("-")[0] != top.split("-")[0] else top)
        else:
            out.append(top)
    return out


TOO_SLOW = "too_slow"  # what _detect_batch returns for a record over its time budget


def _screen_record(rec: dict[str, Any], cfg: FilterLangSettings) -> str | Pending:
    return screen_text(prose(rec, cfg.max_chars), cfg.min_chars, cfg.detector, cfg.cross_check)


def _detect_batch(batch: list[Any]) -> list[str | None]:
    """Labels of a batch of records (None: malformed). Each record's own work (its text, counts,
    n-grams) has ``time_budget`` seconds; langdetect's trials, bounded per text, run for the batch."""
    assert _CFG is not None
    cfg = _CFG
    pending: list[str | Pending] = []
    where: list[int] = []
    out: list[str | None] = [None] * len(batch)
    for k, rec in enumerate(batch):
        if rec is None or conversation_problem(rec):
            continue
        try:
            pending.append(within_budget(cfg.time_budget, _screen_record, rec, cfg))
            where.append(k)
        except TooSlow:
            out[k] = TOO_SLOW
    for k, lang in zip(where, finish(pending, cfg.detector, cfg.min_confidence, cfg.cross_check)):
        out[k] = lang
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="JSONL written by clean")
    add_output_arguments(parser, "filtered JSONL (records get 'lang')")
    add_settings_arguments(parser, FilterLangSettings, "filter_lang")


def filter_file(inp: str | Path, out: str | Path, cfg: FilterLangSettings,
                rejects: str | Path | None = None, stats: str | Path | None = None,
                also_read: Iterable[str | Path] = ()) -> StageWriter:
    """Run the stage; returns the finished writer (stats on disk). ``also_read``: further files
    the run reads (its ``--config``), which no output may replace."""
    if cfg.keep and cfg.skip:
        overlap = [c for c in cfg.keep if matches(c, cfg.skip)]
        if overlap:
            raise ConfigError(f"filter_lang: {overlap} are in both keep and skip")
    if cfg.detector == "cld2":
        try:
            import pycld2  # noqa: F401
        except ImportError:
            raise ConfigError("filter_lang.detector: cld2 needs the pycld2 package (pip install pycld2); "
                              "or use detector: langdetect") from None
    _init(cfg)  # load the profiles once here; forked workers inherit them
    workers, results = map_records(inp, _detect_batch, resolve_workers(cfg.workers), BATCH, initializer=_init, initargs=(cfg,))
    detected: dict[str, int] = {}
    with StageWriter("filter_lang", out, rejects, stats, inputs=[inp, *also_read]) as w:
        for where, obj, lang in progress(results, "filter-lang"):
            w.count_in()
            if isinstance(obj, InvalidLine):
                w.reject(obj, obj.reason, f"{where}: {obj.error}")
                continue
            if lang is None:
                w.reject(obj, "malformed_record", f"{where}: {conversation_problem(obj)}")
                continue
            if lang == TOO_SLOW:
                w.reject(obj, "too_slow", f"{where}: detection took longer than time_budget={cfg.time_budget:g} s")
                continue
            detected[lang] = detected.get(lang, 0) + 1
            if lang == UNKNOWN:
                if not cfg.keep_unknown:
                    w.reject(obj, "lang_unknown", f"{where}: no language to detect (no letters)")
                    continue
            elif lang == UNDETERMINED:
                if cfg.undetermined == "drop":
                    w.reject(obj, "lang_undetermined", f"{where}: too short or too uncertain for a reliable guess")
                    continue
            elif cfg.skip and matches(lang, cfg.skip):
                w.reject(obj, "lang_skipped", f"{where}: {lang}")
                continue
            elif cfg.keep and not matches(lang, cfg.keep):
                w.reject(obj, "lang_not_kept", f"{where}: {lang}")
                continue
            w.keep({**obj, "lang": lang})
        w.extra["detected"] = dict(sorted(detected.items(), key=lambda kv: (-kv[1], kv[0])))
        w.extra["workers"] = workers
    return w


def skip_only(args: argparse.Namespace) -> bool:
    """True when this run sets ``skip`` but not ``keep``, neither by flag nor in its config file."""
    given = {k[len("setting:filter_lang:"):] for k in vars(args) if k.startswith("setting:filter_lang:")}
    if getattr(args, "config", None):
        given |= set((load_raw_config(args.config).get("filter_lang") or {}).keys())
    return "skip" in given and "keep" not in given


def run(args: argparse.Namespace) -> int:
    cfg = settings_from_args(args, FilterLangSettings, "filter_lang")
    if skip_only(args):
        # "--skip ko" alone means "everything but Korean": the default keep list (en, zh) is the
        # pipeline's choice, written in config.yaml, not a filter a hand-run --skip should add.
        cfg.keep = []
    log_settings("filter-lang", cfg, input=args.input, output=args.output)
    w = filter_file(args.input, args.output, cfg, args.rejects, args.stats, also_read=[args.config] if args.config else [])
    print(w.summary())
    return 0
