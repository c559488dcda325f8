"""The checks ``distill`` applies to a generated reply: what a rewrite must keep of the original
(``distill.require``: terms, numbers, code, URLs, names), what it may not bring in (a name of its
own, the instruction's words), and when it or a replay answer is unusable (empty, cut off,
looping). Pure functions of text, so each rule is tested on its own (tests/data/test_distill_checks.py).
"""

from __future__ import annotations

import re

from llama_pipe.config import DistillSettings

#: Phrases of a rewrite that talks about the task instead of answering (refused unless the original has them).
LEAK_PHRASES = ("reference", "own words", "rewrit", "original answer", "this answer", "the answer to your question",
                "here is the answer", "here's the answer")

_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.S)
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_URL = re.compile(r"https?://[^\s<>\"')\]]+")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,:/]\d+)*")
_LIST_MARKER = re.compile(r"(?m)^\s*\d+[.)]\s")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-'’][A-Za-z0-9]+)*")
_OPENERS = " \t\"'“‘(*_[#>-"
_PRONOUN_I = {"I", "I'm", "I've", "I'll", "I'd", "I’m", "I’ve", "I’ll", "I’d"}


def fold(text: str) -> str:
    """``text`` with whitespace runs as one space, case-folded (how terms and phrases are compared)."""
    return " ".join(text.split()).casefold()


def code_blocks(text: str) -> list[str]:
    """Fenced code blocks' contents."""
    return [m.group(1) for m in _FENCE.finditer(text)]


def _prose(text: str) -> str:
    """``text`` without code blocks, inline code and URLs (numbers and names are looked for in it)."""
    text = _FENCE.sub(" ", text)
    text = _INLINE_CODE.sub(" ", text)
    return _URL.sub(lambda m: " " + m.group()[len(m.group().rstrip(".,;:!?")):], text)  # the sentence's end stays


def urls(text: str) -> list[str]:
    return [u.rstrip(".,;:!?") for u in _URL.findall(text)]


def numbers(text: str) -> set[str]:
    """Numbers written in the prose (list markers ``1.`` at a line start are numbering, not facts)."""
    prose = _LIST_MARKER.sub(" ", _prose(text))
    return {n.rstrip(".,:/") for n in _NUMBER.findall(prose)}


def names(text: str, new_only: bool = False) -> set[str]:
    """Names: capitalised words inside a sentence, CamelCase words anywhere, and (unless
    ``new_only``) acronyms. ``new_only`` gives the kind a rewrite may not bring in: an acronym
    ("AI") often appears in a paraphrase, a name ("SmolLM") should not."""
    prose = _prose(text)
    found = set()
    for m in _WORD.finditer(prose):
        word = re.sub(r"['’]s$", "", m.group())
        if word in _PRONOUN_I or len(word) < 2:
            continue
        camel = any(c.isupper() for c in word[1:]) and any(c.islower() for c in word)
        acronym = word.isupper() and len(word) >= 2
        if acronym:
            if not new_only:
                found.add(word)
            continue
        if camel or (word[0].isupper() and not _starts_sentence(prose[max(0, m.start() - 64) : m.start()])):
            found.add(word)
    return found


def _starts_sentence(before: str) -> bool:
    """Whether a word after ``before`` (the text's last few dozen characters before it) begins a
    sentence, a line, a list item or a table cell."""
    tail = before.rstrip(_OPENERS)
    return not tail or tail[-1] in ".!?:;|\n"


def _has_word(text: str, word: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", text, flags=re.IGNORECASE) is not None


def _has_number(text: str, number: str) -> bool:
    return re.search(r"(?<![\d])" + re.escape(number) + r"(?!\d|[.,]\d)", text) is not None


def distinct_ratio(text: str, n: int = 4) -> float:
    """Distinct word n-grams over all n-grams (1.0 for a short text): low means the text loops."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if len(grams) >= 12 else 1.0


def degenerate(text: str, original: str) -> bool:
    """A rewrite that loops: a word run repeated (``text-based text-based ...``), or few distinct
    4-grams where the original has many."""
    if re.search(r"(\b\S+(?:\s+\S+){0,3}\b)(?:\s+\1){3,}", text):
        return True
    ratio = distinct_ratio(text)
    return ratio < 0.6 and ratio < distinct_ratio(original) - 0.1


def rewrite_problem(new: str, original: str, context: str, finish: str | None, settings: DistillSettings,
                    foreign: set[str]) -> str | None:
    """Why the rewrite ``new`` of ``original`` cannot replace it (the reason counted), or None.

    ``context`` is the user's messages (and the system prompt): a name found there may appear in
    the rewrite; ``foreign`` are the base's own names (from its default system prompt),
    refused in a rewrite whose original does not have them."""
    if not new.strip():
        return "empty"
    if finish != "stop":
        return "truncated"
    if degenerate(new, original):
        return "degenerate"
    folded, orig_folded = fold(new), fold(original)
    if any(p in folded and p not in orig_folded for p in LEAK_PHRASES):
        return "leak"
    require = set(settings.require)
    if "terms" in require and any(t.strip() and fold(t) in orig_folded and fold(t) not in folded for t in settings.keep_terms):
        return "term"
    if "numbers" in require and any(not _has_number(_prose(new), n) for n in numbers(original)):
        return "number"
    if "code" in require:
        blocks = code_blocks(original)
        squashed = fold(new)
        if any(fold(b) not in squashed for b in blocks) or (not blocks and code_blocks(new)):
            return "code"
        if any(c.strip() not in new for c in _INLINE_CODE.findall(_FENCE.sub(" ", original))):
            return "code"
    if "urls" in require and any(u not in new for u in urls(original)):
        return "url"
    if "names" in require:
        if any(not _has_word(new, n) for n in names(original)):
            return "name"
        known = f"{original}\n{context}"
        if any(not _has_word(known, n) for n in names(new, new_only=True)):
            return "new_name"
    if any(not _has_word(original, n) and _has_word(new, n) for n in foreign):
        return "new_name"
    return None


def replay_problem(answer: str, finish: str | None, foreign: set[str]) -> str | None:
    """Why a replay answer is not added (counted), or None."""
    if not answer.strip():
        return "empty"
    if finish != "stop":
        return "truncated"
    if degenerate(answer, ""):
        return "degenerate"
    if any(_has_word(answer, n) for n in foreign):
        return "base_identity"  # the base naming itself would undo what training teaches
    return None
