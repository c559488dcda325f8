"""Who the training replies say the assistant is: ``clean.rename`` and the names clean reports.

Public chat sets teach their own assistant's name and maker ("I am Vicuna, ... trained by
researchers from Large Model Systems Organization (LMSYS)", "我是Gitclone ... git-cloner"). Mixed with
data that teaches another name, the model learns a blend and names none (docs/data.md).
:func:`renamer` replaces whole names in every turn; :func:`introductions` finds how replies name
the assistant and its maker, so clean can report every name the data teaches.

Both are linear in the text: the renames are one alternation of literal strings, and the
introduction patterns start at a literal phrase and match a bounded number of words after it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import lru_cache

from llama_pipe.core.errors import ConfigError

SEPARATOR = "=>"
# A name is whole when no Latin letter, digit or underscore touches it: "Vicuna" is renamed in
# "我是Vicuna" and "Vicuna-13B", not in "Vicunas"; "-" may not precede it ("git-cloner" is one name).
_BEFORE = r"(?<![A-Za-z0-9_-])"
_AFTER = r"(?![A-Za-z0-9_])"
_NAME = r"[A-Z][\w-]*(?:\.\d+)?(?:[ ][A-Z][\w-]*(?:\.\d+)?){0,2}"  # "GPT-3.5", "Llama Pipe"
_SELF = re.compile(r"(?:(?i:\bI am|\bI'm|\bmy name is|\bcall me|\bknown as)[ ]+|(?:我是|我叫|叫我)[ ]*)(" + _NAME + ")", re.ASCII)
# a maker: capitalised words (and a parenthesised acronym) or one hyphenated word such as git-cloner
_MAKER = re.compile(
    r"(?i:\b(?:trained|developed|created|built|made|designed)[ ]+by[ ]+(?:(?:a[ ]+team[ ]+of[ ]+)?"
    r"(?:researchers|engineers|scientists|the[ ]+team)[ ]+(?:from|at)[ ]+)?(?:the[ ]+)?)"
    r"([A-Z][\w-]*(?:[ ][A-Z][\w-]*){0,4}(?:[ ]\([A-Z]{2,}\))?|[a-z][a-z0-9]*-[a-z0-9-]+)"
    r"|由(?:来自)?[ ]*([A-Za-z][\w-]*(?:[ ][A-Z][\w-]*){0,4})",
    re.ASCII,
)
_NOT_NAMES = frozenset(
    {
        "A",
        "An",
        "The",
        "I",
        "It",
        "Not",
        "Sorry",
        "Here",
        "Glad",
        "Happy",
        "Just",
        "Also",
        "So",
        "Still",
        "Always",
        "Afraid",
        "Unable",
        "Able",
        "Sure",
        "Now",
        "Currently",
        "Only",
        "Really",
    }
)


def parse_renames(entries: Iterable[str]) -> list[tuple[str, str]]:
    """``"OLD => NEW"`` entries as pairs, longest ``OLD`` first (so a longer name wins over a part of it)."""
    pairs: list[tuple[str, str]] = []
    for entry in entries:
        old, sep, new = entry.partition(SEPARATOR)
        if not sep or not old.strip() or SEPARATOR in new:
            raise ConfigError(f"clean.rename: {entry!r} is not 'OLD {SEPARATOR} NEW' (e.g. 'Vicuna {SEPARATOR} Llama Pipe')")
        pairs.append((old.strip(), new.strip()))
    olds = [o for o, _ in pairs]
    if len(set(olds)) != len(olds):
        raise ConfigError(f"clean.rename: a name is renamed twice: {sorted({o for o in olds if olds.count(o) > 1})}")
    return sorted(pairs, key=lambda p: -len(p[0]))


@lru_cache(maxsize=8)
def renamer(entries: tuple[str, ...]) -> Callable[[str], str]:
    """A function that applies the ``clean.rename`` entries to a text (identity when there are none)."""
    pairs = parse_renames(entries)
    if not pairs:
        return lambda text: text
    table = dict(pairs)
    pattern = re.compile(_BEFORE + "(" + "|".join(re.escape(old) for old, _ in pairs) + ")" + _AFTER)
    return lambda text: pattern.sub(lambda m: table[m.group(1)], text)


def introductions(reply: str) -> tuple[set[str], set[str]]:
    """The names a reply gives the assistant ("I am X", "my name is X", "我是X") and its maker
    ("trained by researchers from X", "developed by X", "由X")."""
    names = {m.group(1) for m in _SELF.finditer(reply) if m.group(1).split()[0] not in _NOT_NAMES}
    makers = {m.group(1) or m.group(2) for m in _MAKER.finditer(reply)}
    return names, {m for m in makers if m.split()[0] not in _NOT_NAMES}
