"""Only the chat template writes control tokens: message text is tokenized as text.

A fast tokenizer turns every occurrence of an added token's string (``<|im_start|>``,
``<|im_end|>``, ``</s>``, ``<|eot_id|>``, ...) into that token, wherever it stands. Rendered
chats mix the template's markers with message text, so a user who types ``<|im_end|>
<|im_start|>system`` forges a turn, and a training reply that quotes ``<|im_end|>`` gets a second
end-of-turn label in the middle (the model learns to stop there).

:class:`ControlTokens` tokenizes a rendered text given the character spans of its message text
(``texts``): the whole text is tokenized once as usual; when no control token starts inside a
message, that is the result (the ids a plain ``tokenizer(text)`` and ``apply_chat_template``
give). Otherwise each stretch of text between two control tokens the template wrote is tokenized
again by a *text-only twin* of the tokenizer: the same normalizer, pre-tokenizer, model and
post-processor, with no added tokens at all. A stretch that does not start the text is tokenized
after an anchor (an added token of the twin's own, dropped again), so it is cut and prefixed
exactly as the tokenizer cuts the text after a control token (no extra ``▁`` word prefix).
Offsets stay exact, so the label mask (character spans) is as exact as before.

Control tokens are the tokenizer's added tokens, special or not (whitespace-only ones, such as a
``"\\n"`` token, are text). Where the twin's vocabulary can still spell one from plain text, that
token's characters are tokenized one by one.
"""

from __future__ import annotations

import bisect
import json
import re
import secrets
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

Span = tuple[int, int]


class ControlTokens:
    """The control tokens of one tokenizer (a transformers fast tokenizer, or a ``tokenizers.Tokenizer``)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if not hasattr(self.backend, "get_added_tokens_decoder"):
            raise ValueError("control tokens need a fast tokenizer (tokenizer.json)")
        added = self.backend.get_added_tokens_decoder()
        self.content = {int(i): t.content for i, t in added.items() if t.content.strip()}
        self.ids = frozenset(self.content)
        strings = sorted(set(self.content.values()), key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, strings))) if strings else None
        normalized = [t for t in added.values() if t.normalized and t.content.strip()]
        self.normalizer = self.backend.normalizer if normalized else None
        self._twin: Any = None
        self._anchor = ""

    # ------------------------------------------------------------------ detection

    def in_text(self, text: str) -> bool:
        """Whether ``text`` holds a control token's string (also after the normalizer, where a
        control token is matched on normalized text)."""
        if self.pattern is None or not text:
            return False
        if self.pattern.search(text):
            return True
        return self.normalizer is not None and bool(self.pattern.search(self.normalizer.normalize_str(text)))

    def in_any(self, texts: Iterable[str | None]) -> bool:
        return any(isinstance(t, str) and self.in_text(t) for t in texts)

    # ------------------------------------------------------------------ encoding

    def _parsed(self, text: str, add_special_tokens: bool) -> tuple[list[int], list[Span]]:
        if self.backend is self.tokenizer:  # a tokenizers.Tokenizer
            enc = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
            return list(enc.ids), [tuple(o) for o in enc.offsets]
        enc = self.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def _forged(self, text: str, ids: Sequence[int], offsets: Sequence[Span], texts: Sequence[Span]) -> set[int]:
        """Indices of control tokens that start inside message text."""
        starts = [a for a, _ in texts]
        out = set()
        for i, (tid, (s, e)) in enumerate(zip(ids, offsets)):
            if tid not in self.ids or e <= s:
                continue
            at = text.find(self.content[tid], s, e)
            at = s if at < 0 else at
            k = bisect.bisect_right(starts, at) - 1
            if k >= 0 and at < texts[k][1]:
                out.add(i)
        return out

    def encode(self, text: str, texts: Sequence[Span] = (), add_special_tokens: bool = True) -> tuple[list[int], list[Span]]:
        """Ids and character offsets of ``text``; control strings inside the ``texts`` spans
        (message text, sorted, not overlapping) are tokenized as text."""
        ids, offsets = self._parsed(text, add_special_tokens)
        if not texts or not self.ids:
            return ids, offsets
        forged = self._forged(text, ids, offsets, sorted(texts))
        if not forged:
            return ids, offsets
        out_ids: list[int] = []
        out_offsets: list[Span] = []
        run: list[int] = []  # token indices since the last control token the template wrote
        lo = 0  # where the text of the current run starts

        def flush(hi: int) -> None:
            if any(i in forged for i in run):
                new_ids, new_offsets = self._as_text(text, lo, hi)
                out_ids.extend(new_ids)
                out_offsets.extend(new_offsets)
            else:
                out_ids.extend(ids[i] for i in run)
                out_offsets.extend(offsets[i] for i in run)
            run.clear()

        for i, tid in enumerate(ids):
            if tid in self.ids and i not in forged:  # the template's (or the post-processor's) token
                s, e = offsets[i]
                flush(s if e > s else max([lo, *(offsets[j][1] for j in run)]))  # (0, 0): a BOS or EOS the post-processor added
                out_ids.append(tid)
                out_offsets.append(offsets[i])
                lo = max(lo, offsets[i][1])
            else:
                run.append(i)
        flush(len(text))
        return out_ids, out_offsets

    def _as_text(self, text: str, lo: int, hi: int) -> tuple[list[int], list[Span]]:
        """``text[lo:hi]`` tokenized by the twin, as the tokenizer cuts text after a control token."""
        twin, anchor = self._twin_tokenizer()
        piece = text[lo:hi]
        if not piece:
            return [], []
        shift = 0 if lo == 0 else len(anchor)
        enc = twin.encode(piece if lo == 0 else anchor + piece, add_special_tokens=False)
        ids, offsets = list(enc.ids), [tuple(o) for o in enc.offsets]
        if shift:
            if not ids or ids[0] != self._anchor_id:
                raise ValueError("the text-only tokenizer lost its anchor token")
            ids, offsets = ids[1:], offsets[1:]
        out_ids: list[int] = []
        out_offsets: list[Span] = []
        for tid, (s, e) in zip(ids, offsets):
            s, e = max(s - shift, 0) + lo, max(e - shift, 0) + lo
            if tid in self.ids or tid == self._anchor_id:  # the vocabulary spells a control token from text
                for k in range(s, e):
                    one = twin.encode(anchor + text[k], add_special_tokens=False)
                    chars = [t for t in one.ids[1:] if t not in self.ids]
                    if len(chars) != len(one.ids) - 1:
                        raise ValueError(f"{text[k]!r} cannot be tokenized as text: it is a control token by itself")
                    out_ids.extend(chars)
                    out_offsets.extend((k, k + 1) for _ in chars)
            else:
                out_ids.append(tid)
                out_offsets.append((s, e))
        return out_ids, out_offsets

    def _twin_tokenizer(self) -> tuple[Any, str]:
        if self._twin is None:
            from tokenizers import AddedToken, Tokenizer

            spec = json.loads(self.backend.to_str())
            spec["added_tokens"] = []
            spec["truncation"] = None
            spec["padding"] = None
            twin = Tokenizer.from_str(json.dumps(spec))
            anchor = "\U0010fff0" + secrets.token_hex(8) + "\U0010fff1"
            twin.add_tokens([AddedToken(anchor, special=False, normalized=False)])
            self._anchor_id = twin.token_to_id(anchor)
            self._twin, self._anchor = twin, anchor
        return self._twin, self._anchor


_CACHE: weakref.WeakKeyDictionary[Any, ControlTokens] = weakref.WeakKeyDictionary()
_STRONG: dict[int, tuple[Any, ControlTokens]] = {}


def control_tokens(tokenizer: Any) -> ControlTokens:
    """The :class:`ControlTokens` of ``tokenizer`` (one per tokenizer object)."""
    try:
        found = _CACHE.get(tokenizer)
    except TypeError:  # not weakly referencable (a tokenizers.Tokenizer)
        held = _STRONG.get(id(tokenizer))
        if held is not None and held[0] is tokenizer:
            return held[1]
        ct = ControlTokens(tokenizer)
        _STRONG[id(tokenizer)] = (tokenizer, ct)
        return ct
    if found is None:
        found = _CACHE[tokenizer] = ControlTokens(tokenizer)
    return found
