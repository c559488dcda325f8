"""langdetect's detection for many texts at once, with langdetect's own numbers.

``langdetect`` (the default detector of ``filter-lang``) detects one text in pure Python: it
extracts the text's known 1-3-grams, then runs 7 trials; a trial starts from a uniform
probability over 55 languages and multiplies it by the profile of a randomly chosen n-gram per
iteration, normalising every 5 iterations until one language passes 0.99999 (or 1000
iterations); the answer is the average of the trials. With ``DetectorFactory.seed`` set, every
text starts its random generator from the same seed, so the random numbers a text sees depend only
on its number of n-grams ``n``: a fixed stream of 32-bit Mersenne Twister words, of which
``random.choice`` takes ``word >> (32 - n.bit_length())`` when it is below ``n`` (else the next
word), and ``random.gauss`` takes four words at the start of every other trial.

:class:`FastLangdetect` computes exactly that:

* the stream of words is drawn once per process; a text's draws are the words that pass its
  ``n`` (numpy), its n-grams are rows of one profile matrix, found through a per-word memo
  (langdetect's n-gram rules, :func:`word_ngrams`);
* the trials of a whole batch of texts run side by side: one block of numpy operations advances
  every text by one convergence check (5 multiplications), each text with its own draws, trial
  and weight. Every number is computed with the same floating-point operations in the same order
  as langdetect's Python loops (a product per iteration, a left-to-right sum per normalisation),
  so the 55 probabilities of every text are langdetect's, bit for bit: a test compares them.

A text whose trials would use more words than the drawn stream (about 1 in 10,000: very long
trials with many rejected words) is run alone with a ``random.Random`` of the same seed
(:meth:`FastLangdetect._alone`), with the same result.
"""

from __future__ import annotations

import math
import random
import re
from typing import Any

import numpy as np

N_TRIAL = 7
WORDS = 2048  # 32-bit words drawn once; a typical text uses about 400
MEMO_MAX = 200_000  # distinct words whose n-grams are remembered (then the memo starts again)
_COLLAPSE = re.compile(" {2,}")
_LATIN_DELETE = {c: None for c in range(ord("A"), ord("z") + 1)}
# what cleaning_text does not count as another script: below U+0300 (its exception for Latin Extended
# Additional never applies: unicode_block() names that block 'LATIN_EXTENDED_ADDITIONAL')
_NOT_OTHER = re.compile("[\x00-\u02ff]+")


class FastLangdetect:
    """langdetect's ``Detector.get_probabilities`` for a batch of texts (see the module docstring).

    Built from langdetect's loaded profiles (``init_factory`` must have run) and ``seed``
    (``DetectorFactory.seed``)."""

    def __init__(self, seed: int) -> None:
        from langdetect import detector_factory
        from langdetect.detector import Detector
        from langdetect.utils.ngram import NGram
        from langdetect.utils.unicode_block import unicode_block

        factory = detector_factory._factory
        assert factory is not None, "langdetect's profiles are not loaded (init_factory)"
        self.langs: list[str] = list(factory.langlist)
        prob_map: dict[str, list[float]] = factory.word_lang_prob_map
        self.row: dict[str, int] = {w: i for i, w in enumerate(prob_map)}
        self.matrix = np.array(list(prob_map.values()), dtype=np.float64)  # (n-grams, languages)
        self.seed = seed
        rnd = random.Random()
        rnd.seed(seed)
        self.words = np.array([rnd.getrandbits(32) for _ in range(WORDS)], dtype=np.uint64)
        self.alpha, self.width, self.base = Detector.ALPHA_DEFAULT, Detector.ALPHA_WIDTH, Detector.BASE_FREQ
        self.limit, self.conv = Detector.ITERATION_LIMIT, Detector.CONV_THRESHOLD
        self.threshold = Detector.PROB_THRESHOLD
        self._url, self._mail, self._vi = Detector.URL_RE, Detector.MAIL_RE, NGram.normalize_vi
        self._max_text = 10000  # Detector.max_text_length
        self._normalize, self._block = NGram.normalize, unicode_block
        self._norm_table: dict[int, str] = {}
        self._seen: set[str] = set()  # the characters in _norm_table
        self._dmarks = tuple(NGram.DMARK_CLASS)  # normalize_vi changes nothing without one of these
        self._reset_memo()  # words -> their n-gram rows (ids, start and length in one array)

    # ------------------------------------------------------------------ text -> n-gram rows

    def prepare(self, text: str) -> np.ndarray:
        """The profile rows of ``text``'s n-grams in langdetect's order (``Detector.append``,
        ``cleaning_text``, ``_extract_ngrams``); empty when it has none (langdetect: "No features")."""
        if "http" in text:
            text = self._url.sub(" ", text)
        if "@" in text:
            text = self._mail.sub(" ", text)
        if any(m in text for m in self._dmarks):
            text = self._vi(text)
        text = _COLLAPSE.sub(" ", text[: self._max_text])
        text = self._clean(text)
        table = self._norm_table
        for ch in set(text) - self._seen:
            table[ord(ch)] = self._normalize(ch)
            self._seen.add(ch)
        words = text.translate(table).split(" ")
        if words and words[-1]:
            words[-1] += "\0"  # the text's last word: no space after it ("\0" is never in a normalised word)
        if self._n_words > MEMO_MAX:
            self._reset_memo()
        wid, get = self._wid, self._wid.get
        ids = [get(w) for w in words]
        for k, i in enumerate(ids):
            if i is None:
                ids[k] = wid[words[k]] = self._add_word(words[k]) if words[k] not in wid else wid[words[k]]
        w = np.array(ids, dtype=np.int64)
        starts, lens = self._wstart[w], self._len[w]
        n = int(lens.sum())
        # each word's rows in order (starts[w], starts[w] + 1, ...), the words' runs concatenated
        first = np.cumsum(lens) - lens  # where each word's run begins in the result
        return self._rows[np.arange(n, dtype=np.int64) + np.repeat(starts - first, lens)]

    def _reset_memo(self) -> None:
        self._wid: dict[str, int] = {"": 0}
        self._wstart = np.zeros(1024, dtype=np.int64)
        self._len = np.zeros(1024, dtype=np.int64)
        self._rows = np.zeros(1 << 16, dtype=np.int64)
        self._n_words, self._n_rows = 1, 0

    def _add_word(self, word: str) -> int:
        """Remember a word's n-gram rows; its id."""
        grams = [self.row[g] for g in word_ngrams(word[:-1], False, self.row)] if word.endswith("\0") else \
            [self.row[g] for g in word_ngrams(word, True, self.row)]
        i, r = self._n_words, self._n_rows
        if i >= len(self._wstart):
            self._wstart, self._len = np.resize(self._wstart, 2 * i), np.resize(self._len, 2 * i)
        while r + len(grams) > len(self._rows):
            self._rows = np.resize(self._rows, 2 * len(self._rows))
        self._wstart[i], self._len[i] = r, len(grams)
        self._rows[r : r + len(grams)] = grams
        self._n_words, self._n_rows = i + 1, r + len(grams)
        return i

    def _clean(self, text: str) -> str:
        """``Detector.cleaning_text``: drop the Latin letters (A-z) of a text with more than twice as
        many characters of other scripts (from U+0300)."""
        latin = len(text) - len(text.translate(_LATIN_DELETE))
        other = len(_NOT_OTHER.sub("", text))
        return text.translate(_LATIN_DELETE) if latin * 2 < other else text

    # ------------------------------------------------------------------ the trials

    def probabilities(self, texts: list[str]) -> list[list[float] | None]:
        """langdetect's ``langprob`` (55 probabilities, langdetect's language order) of each text,
        or None for a text without n-grams."""
        out: list[list[float] | None] = [None] * len(texts)
        rows = [self.prepare(t) for t in texts]
        todo = [i for i, r in enumerate(rows) if len(r)]
        for i, prob in zip(todo, self.run([rows[i] for i in todo])):
            out[i] = prob
        return out

    def ranked(self, langprob: list[float] | None) -> list[tuple[str, float]]:
        """``Detector.get_probabilities``: the languages above 0.1, most probable first."""
        if langprob is None:
            return []
        kept = [(lang, p) for lang, p in zip(self.langs, langprob) if p > self.threshold]
        return sorted(kept, key=lambda lp: lp[1], reverse=True)

    def _gauss(self, pos: int) -> tuple[float, float]:
        """``random.gauss``'s two values from the four words at ``pos`` (``random()`` twice)."""
        w = [int(x) for x in self.words[pos : pos + 4]]
        r1 = ((w[0] >> 5) * 67108864.0 + (w[1] >> 6)) * (1.0 / 9007199254740992.0)
        r2 = ((w[2] >> 5) * 67108864.0 + (w[3] >> 6)) * (1.0 / 9007199254740992.0)
        x2pi, g2rad = r1 * (2.0 * math.pi), math.sqrt(-2.0 * math.log(1.0 - r2))
        return math.cos(x2pi) * g2rad, math.sin(x2pi) * g2rad

    def run(self, rows: list[np.ndarray]) -> list[list[float]]:
        """The ``langprob`` of each text given its n-gram rows (each non-empty), trials side by side."""
        nl = len(self.langs)
        pos: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        for r in rows:  # the words each text accepts, and the profile rows they choose
            n = len(r)
            cand = self.words >> np.uint64(32 - n.bit_length())
            p = np.flatnonzero(cand < n)
            pos.append(p)
            vals.append(r[cand[p].astype(np.int64)])
        flat = np.concatenate(vals + [np.zeros(5, dtype=np.int64)])
        off = np.cumsum([0] + [len(v) for v in vals[:-1]]).astype(np.int64)
        end = off + np.array([len(v) for v in vals], dtype=np.int64)
        B = len(rows)
        total = np.zeros((nl, B))
        alone: list[int] = []
        # per active text: its index, next draw, iteration, trial, gauss cache, weight, probabilities
        idx = np.arange(B)
        j = np.zeros(B, dtype=np.int64)
        it = np.zeros(B, dtype=np.int64)
        trial = np.zeros(B, dtype=np.int64)
        spare = [0.0] * B
        weight = np.empty(B)
        prob = np.full((nl, B), 1.0 / nl)
        for b in range(B):
            started = self._start(b, 0, pos[b], 0, spare)
            if started is None:
                alone.append(b)
            else:
                j[b], weight[b] = started
        keep = np.ones(B, dtype=bool)
        keep[alone] = False
        idx, j, it, trial, weight, prob = idx[keep], j[keep], it[keep], trial[keep], weight[keep], prob[:, keep]
        fresh = np.ones(len(idx), dtype=bool)
        while len(idx):
            steps = np.where(fresh, 1, 5)
            short = off[idx] + j + steps > end[idx]  # out of drawn words: finish alone
            if short.any():
                alone += idx[short].tolist()
                keep = ~short
                idx, j, it, trial, weight, prob, fresh, steps = (idx[keep], j[keep], it[keep], trial[keep], weight[keep],
                                                                 prob[:, keep], fresh[keep], steps[keep])
                if not len(idx):
                    break
            base = off[idx] + j
            any_fresh = bool(fresh.any())
            for k in range(5):
                factor = weight + self.matrix[flat[base + k]].T  # (languages, texts)
                if k and any_fresh:
                    factor[:, fresh] = 1.0  # a text at its first iteration multiplies once: x * 1.0 == x
                prob *= factor
            j += steps
            it += np.where(fresh, 0, 5)
            prob /= _column_sums(prob)
            done = (prob.max(axis=0) > self.conv) | (it >= self.limit)
            fresh = done
            if not done.any():
                continue
            d = np.flatnonzero(done)
            total[:, idx[d]] += prob[:, d] / N_TRIAL
            trial[d] += 1
            finished = trial >= N_TRIAL
            for q in np.flatnonzero(done & ~finished):
                b = int(idx[q])
                started = self._start(b, int(trial[q]), pos[b], int(pos[b][j[q] - 1]) + 1, spare, int(j[q]))
                if started is None:
                    alone.append(b)
                    finished[q] = True
                    continue
                j[q], weight[q] = started
                prob[:, q] = 1.0 / nl
                it[q] = 0
            if finished.any():
                keep = ~finished
                idx, j, it, trial, weight, prob, fresh = idx[keep], j[keep], it[keep], trial[keep], weight[keep], prob[:, keep], fresh[keep]
        for b in alone:
            total[:, b] = self._alone(rows[b])
        return [total[:, b].tolist() for b in range(B)]

    def _start(self, b: int, t: int, pos: np.ndarray, first: int, spare: list[float], j: int = 0) -> tuple[int, float] | None:
        """Trial ``t`` of text ``b``: its next draw and weight (gauss: four words at ``first`` on even
        trials, the cached second value on odd ones); None when out of drawn words."""
        if t % 2 == 0:
            if first + 4 > WORDS:
                return None
            z, spare[b] = self._gauss(first)
            j = int(np.searchsorted(pos, first + 4))
        else:
            z = spare[b]
        return j, (self.alpha + (0.0 + z * 1.0) * self.width) / self.base

    def _alone(self, rows: np.ndarray) -> np.ndarray:
        """One text's ``langprob`` with its own ``random.Random`` (langdetect's loop, numpy rows)."""
        nl, n = len(self.langs), len(rows)
        rnd = random.Random()
        rnd.seed(self.seed)
        total = np.zeros(nl)
        for _ in range(N_TRIAL):
            prob = np.full(nl, 1.0 / nl)
            weight = (self.alpha + rnd.gauss(0.0, 1.0) * self.width) / self.base
            i = 0
            while True:
                prob *= weight + self.matrix[rows[rnd._randbelow(n)]]  # type: ignore[attr-defined]  # what random.choice calls
                if i % 5 == 0:
                    prob /= sum(prob.tolist())
                    if prob.max() > self.conv or i >= self.limit:
                        break
                i += 1
            total += prob / N_TRIAL
        return total


def _column_sums(prob: np.ndarray) -> np.ndarray:
    """Each column's sum, added top to bottom as Python's ``sum()`` adds a list (numpy's own
    reductions may add pairwise, depending on the layout)."""
    total = prob[0].copy()
    for row in prob[1:]:
        total += row
    return total


def word_ngrams(word: str, space_after: bool, known: Any) -> list[str]:
    """The n-grams langdetect's ``NGram`` emits for one normalised word (after a space; with the
    space that follows it unless it ends the text), those in ``known``, in order.

    At each character ``k`` of ``p = ' ' + word (+ ' ')``: ``p[k]``, ``p[k-1:k+1]`` and
    ``p[k-2:k+1]`` (those that exist and are not ``' '``), except where ``p[k]`` and ``p[k-1]``
    are both upper case (langdetect's "capital word" rule)."""
    p = " " + word + " " if space_after else " " + word
    out: list[str] = []
    prev_upper = False
    for k in range(1, len(p)):
        c = p[k]
        upper = c.isupper()
        if upper and prev_upper:
            continue
        prev_upper = upper
        if c != " " and c in known:
            out.append(c)
        w = p[k - 1 : k + 1]
        if w in known:
            out.append(w)
        if k >= 2:
            w = p[k - 2 : k + 1]
            if w in known:
                out.append(w)
    return out
