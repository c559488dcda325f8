"""How ``split`` plans and measures chunks (:class:`Splitter`): FastChat's greedy rule
(:mod:`llama_pipe.data.split`), computed with few tokenizer calls.

Speed: the tokenizer is loaded with the ``tokenizers`` library alone when that is known to give
the transformers ids (:mod:`llama_pipe.data.rust_tokenizer`); every record is tokenized whole once, in batches; one that fits is done. For a longer one
the token offsets give each pair's share, chunks are planned from the shares, then every planned
chunk is measured exactly in batches; a record whose planned chunk overflows is re-planned pair
by pair with exact measurements.

Cost is linear in the pairs of a record. A built-in template renders a conversation and its
reply spans in one pass. A model's own Jinja template finds each
reply's span by rendering the conversation up to it, which is quadratic in the turns (1,200 pairs
in one record took 5x as long as in 60 records); so a record of more than :data:`FEW_PAIRS` pairs
is rendered as text alone (one pass), measured whole, and, when it does not fit, packed by the
exact greedy rule (each next pair measured with the chunk so far: the chunk text is bounded by
``max_length``, so the work per pair is too). The chunks are those FastChat's rule defines
(:mod:`llama_pipe.data.split`).

Giant turns are not tokenized: a text has at least (its non-whitespace characters after the
tokenizer's normaliser) / (the longest vocabulary entry) tokens, as long as the tokenizer can
neither drop a character nor stand one token for an unknown run of them (BPE with byte
fallback, or byte-level BPE; otherwise the bound is not used). A pair whose bound already
exceeds ``max_length`` is rejected (or, in ``truncate``, its gpt turn first cut to the longest
prefix whose bound fits) without tokenizing the whole of it: a 10 MB turn costs a linear scan,
not a BPE pass over 10 MB. The chunks around it come out as if it had been measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llama_pipe.chat_template.builtin import BuiltinTemplate, ChatTemplate, render_for_tokens
from llama_pipe.chat_template.control_tokens import control_tokens
from llama_pipe.config import SplitSettings
from llama_pipe.core.records import Record
from llama_pipe.data.common import batched

#: Under a model's own template, a record of more pairs than this is rendered as text alone (see
#: the module docstring): rendering with reply spans costs time quadratic in the pairs.
FEW_PAIRS = 16


@dataclass
class SplitRecord:
    """One record being split: its pairs, their estimates, the planned chunks."""

    rec: Record
    pairs: list[tuple[str, str]]
    system: str | None
    est: list[int] = field(default_factory=list)
    chunks: list[list[int]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # exact tokens of each chunk
    long: dict[int, str] = field(default_factory=dict)  # pair index -> reject detail
    cut: dict[int, str] = field(default_factory=dict)  # pair index -> truncated gpt value
    over: dict[int, int] = field(default_factory=dict)  # pair index -> lower bound on its tokens (> max_length)


class Splitter:
    """Measures chunks with one tokenizer and template; see the module docstring."""

    def __init__(self, tokenizer: Any, cfg: SplitSettings, template: ChatTemplate, max_length: int) -> None:
        self.tok = tokenizer
        self.cfg = cfg
        self.template = template
        self.max_length = max_length  # cfg.max_length, or chat.max_seq_len when that is null
        self._header: dict[str | None, int] = {}
        self._backend = self._rust_backend(tokenizer)
        self._bound = self._char_bound()
        self.controls = control_tokens(tokenizer)
        self._texts: dict[str, list[tuple[int, int]]] = {}  # rendered text -> its message-text spans, when they hold control strings
        self._text_only = self._text_renderer(template)

    def _text_renderer(self, template: ChatTemplate) -> Any:
        """A one-pass renderer of a model template's text (what ``render()[0]`` gives, without the
        per-reply renderings that locate the spans), when it agrees with ``render`` on probes; else
        None (and long records are rendered with spans as before)."""
        if isinstance(template, BuiltinTemplate):
            return None  # its render is one pass already
        from llama_pipe.chat_template.model import ModelTemplate

        if not isinstance(template, ModelTemplate):
            return None

        def text(pairs: list[tuple[str, str]], system: str | None) -> str:
            msgs: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
            for q, a in pairs:
                msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            full = template._apply(msgs, False)  # noqa: SLF001 - the same rendering render() starts from
            return full[len(template.strip_bos):] if template.strip_bos and full.startswith(template.strip_bos) else full

        probes = [[("Hi there.", "Hello!")], [("a", "b"), ("c d", "e f"), ("g", "h")]]
        for pairs in probes:
            for system in (None, "You are terse."):
                try:
                    if text(pairs, system) != self.template.render(self._messages(pairs), system=system)[0]:
                        return None
                except Exception:  # noqa: BLE001 - a template that fails here keeps the general path
                    return None
        return text

    @staticmethod
    def _rust_backend(tok: Any) -> Any:
        """The Rust ``tokenizers.Tokenizer`` behind a fast HF tokenizer, when it gives the same ids.

        Batches go straight to it (``encode_batch_fast`` skips offsets and the HF wrapper, ~40%
        less time); a probe on a few texts, with and without special tokens, guards equality.
        """
        from tokenizers import Tokenizer

        if isinstance(tok, Tokenizer):  # loaded by rust_tokenizer.load_rust_tokenizer: the ids are the HF ids
            return tok
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch_fast"):
            return None
        probe = ["Hello there.", " USER: hi ASSISTANT: yo</s>", "你好，世界 <|im_end|>\n", ""]
        for special in (True, False):
            ours = [e.ids for e in backend.encode_batch_fast(probe, add_special_tokens=special)]
            if ours != [list(x) for x in tok(probe, add_special_tokens=special)["input_ids"]]:
                return None
        return backend

    def _char_bound(self) -> tuple[Any, int] | None:
        """(normaliser or None, longest vocabulary entry in characters) when "non-whitespace
        characters / longest entry" bounds a text's token count from below; else None."""
        import json

        backend = self._backend if self._backend is not None else getattr(self.tok, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "to_str"):
            return None
        spec = json.loads(backend.to_str())
        model = spec.get("model") or {}
        byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
        if model.get("type") != "BPE" or not (model.get("byte_fallback") or byte_level):
            return None  # an unknown token may stand for a whole run of characters, or characters may be dropped
        vocab = model.get("vocab") or {}
        longest = max([len(t) for t in vocab] + [len(t.get("content", "")) for t in spec.get("added_tokens") or []] + [1])
        return backend.normalizer, longest

    def min_tokens(self, text: str) -> int:
        """A lower bound on the tokens of ``text`` (0 when no bound is known); linear time."""
        if self._bound is None:
            return 0
        normalizer, longest = self._bound
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        chars = len(text) - sum(text.count(c) for c in " \t\n\r\x0b\x0c")
        return -(-chars // longest)

    def _pair_bound(self, r: SplitRecord, pair: tuple[str, str]) -> int:
        return self.min_tokens(self.render([pair], r.system))

    def find_oversized(self, r: SplitRecord) -> None:
        """Mark in ``r.over`` the pairs that provably exceed ``max_length`` without tokenizing them.

        Only pairs longer than ``max_length`` characters are looked at: shorter ones are cheap to
        tokenize, and a bound of at most one token per character rarely proves them too long.
        """
        limit = self.max_length
        if self._bound is None:
            return
        for j, (q, a) in enumerate(r.pairs):
            if len(q) + len(a) > limit:
                bound = self._pair_bound(r, (q, a))
                if bound > limit:
                    r.over[j] = bound

    def render(self, pairs: list[tuple[str, str]], system: str | None) -> str:
        """The chunk's text (for bounds and probes; :meth:`_measured` for texts that are measured),
        in one pass where the template allows."""
        if self._text_only is not None:
            return str(self._text_only(pairs, system))
        return self.template.render(self._messages(pairs), system=system)[0]

    def lengths(self, texts: list[str], special: bool = True) -> list[int]:
        """Token counts, as training tokenizes: a text whose messages hold a control token's string
        (recorded by :meth:`_measured`) goes through :class:`~llama_pipe.chat_template.control_tokens.ControlTokens`."""
        out: list[int] = []
        for b in batched(texts, self.cfg.batch_size):
            if self._backend is not None:
                out += [len(e) for e in self._backend.encode_batch_fast(b, add_special_tokens=special)]
            else:
                out += [len(ids) for ids in self.tok(b, add_special_tokens=special)["input_ids"]]
        if special and self._texts:
            out = [len(self.controls.encode(t, self._texts[t])[0]) if t in self._texts else n for t, n in zip(texts, out)]
        return out

    def _with_offsets(self, texts: list[str]) -> list[tuple[int, list[tuple[int, int]]]]:
        """(token count, character offsets of each token) for each text, special tokens added."""
        if self._backend is not None:
            out = [(len(e), e.offsets) for e in self._backend.encode_batch(texts, add_special_tokens=True)]
        else:
            enc = self.tok(texts, add_special_tokens=True, return_offsets_mapping=True)
            out = [(len(ids), offs) for ids, offs in zip(enc["input_ids"], enc["offset_mapping"])]
        for i, t in enumerate(texts):
            if t in self._texts:
                ids, offsets = self.controls.encode(t, self._texts[t])
                out[i] = (len(ids), offsets)
        return out

    def header(self, system: str | None) -> int:
        """Tokens a chunk has beyond its pairs alone (BOS, system prompt), estimated once per system."""
        if system not in self._header:
            pair = [("Hello there.", "Hi! How can I help?")]
            full, bare = self.lengths([self.render(pair, system), self.render(pair, "")])
            self._header[system] = max(0, full - bare) + 1
        return self._header[system]

    def exact(self, r: SplitRecord, idx: list[int]) -> int:
        return self.lengths([self._measured([self.pair(r, j) for j in idx], r.system)[0]])[0]

    @staticmethod
    def pair(r: SplitRecord, j: int) -> tuple[str, str]:
        return (r.pairs[j][0], r.cut[j]) if j in r.cut else r.pairs[j]

    def plan(self, recs: list[SplitRecord]) -> None:
        """Fill ``chunks`` (and ``long``/``cut``) of each record; every chunk fits exactly.

        Each record is rendered and tokenized whole once; a record that fits is one chunk (its
        length is exact). For a longer one, the token offsets give each pair's share of that
        tokenization, chunks are planned from those shares and then measured exactly.
        """
        limit = self.max_length
        self._texts.clear()
        for r in recs:
            self.find_oversized(r)
            if r.over:  # never tokenize the giant pair: exact greedy packing around it
                self._replan(r)
        recs = [r for r in recs if not r.over]
        if self._text_only is not None:  # a model template: long records by text alone (linear)
            # (not where message text holds a control token's string: those are measured as training does)
            bulky = [r for r in recs if len(r.pairs) > FEW_PAIRS and not self.controls.in_any([r.system, *(t for p in r.pairs for t in p)])]
            recs = [r for r in recs if not any(r is b for b in bulky)]
            whole = self.lengths([self.render(r.pairs, r.system) for r in bulky])
            for r, n_tokens in zip(bulky, whole):
                if n_tokens <= limit:
                    r.chunks, r.sizes = [list(range(len(r.pairs)))], [n_tokens]
                else:
                    self._replan(r)
        rendered = [self._measured(r.pairs, r.system) for r in recs]
        long_recs: list[SplitRecord] = []
        for b_start in range(0, len(recs), self.cfg.batch_size):
            b_recs = recs[b_start : b_start + self.cfg.batch_size]
            b_text = rendered[b_start : b_start + self.cfg.batch_size]
            encoded = self._with_offsets([t for t, _ in b_text])
            for r, (_, spans), (n_tokens, offsets) in zip(b_recs, b_text, encoded):
                if n_tokens <= limit:
                    r.chunks, r.sizes = [list(range(len(r.pairs)))], [n_tokens]
                    continue
                ends = [e for _, e in spans]  # a pair ends where its gpt turn (and end-of-turn) ends
                r.est = [0] * len(r.pairs)
                j = 0
                for start, _ in offsets:
                    while j < len(ends) - 1 and start >= ends[j]:
                        j += 1
                    r.est[j] += 1
                long_recs.append(r)
        for r in long_recs:
            head, size = self.header(r.system), 0
            cur: list[int] = []
            for j, n in enumerate(r.est):
                n = n if j else max(0, n - head)  # the first pair's share includes the header
                if cur and size + n > limit:
                    r.chunks.append(cur)
                    cur, size = [], 0
                cur.append(j)
                size += n if size else head + n
            if cur:
                r.chunks.append(cur)
        planned = [(r, c) for r in long_recs for c in r.chunks]
        sizes = self.lengths([self._measured([r.pairs[j] for j in c], r.system)[0] for r, c in planned])
        for (r, _), n in zip(planned, sizes):
            r.sizes.append(n)
        for r in long_recs:
            if any(n > limit for n in r.sizes):
                self._replan(r)

    @staticmethod
    def _messages(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
        msgs = []
        for q, a in pairs:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return msgs

    def _measured(self, pairs: list[tuple[str, str]], system: str | None) -> tuple[str, list[tuple[int, int]]]:
        """Text and target spans of a chunk about to be measured; where its messages hold a control
        token's string, their spans are recorded so that :meth:`lengths` counts them as training does."""
        text, targets, texts = render_for_tokens(self.controls.tokenizer, self.template, self._messages(pairs), system)
        if texts:
            self._texts[text] = texts
        return text, targets

    def _replan(self, r: SplitRecord) -> None:
        """Exact greedy packing for a record whose estimated plan overflowed."""
        limit = self.max_length
        r.chunks = []
        cur: list[int] = []
        for j in range(len(r.pairs)):
            if cur and j not in r.over and self.exact(r, cur + [j]) <= limit:
                cur.append(j)
                continue
            if cur:
                r.chunks.append(cur)
                cur = []
            if (j not in r.over and self.exact(r, [j]) <= limit) or self._fit_long(r, j):
                cur = [j]
        if cur:
            r.chunks.append(cur)
        r.sizes = [self.exact(r, c) for c in r.chunks]

    def _fit_long(self, r: SplitRecord, j: int) -> bool:
        """A pair too long alone: truncate its gpt turn if allowed (True), else mark it rejected."""
        limit = self.max_length
        q, a = r.pairs[j]
        alone = f"at least {r.over[j]}" if j in r.over else str(self.exact(r, [j]))
        if self.cfg.on_long_pair == "truncate":
            r.cut[j] = ""
            if self._pair_bound(r, (q, "")) <= limit and self.exact(r, [j]) <= limit:
                def fits_exactly(n: int) -> bool:
                    r.cut[j] = a[:n]
                    return self.exact(r, [j]) <= limit

                hi = len(a)  # the longest prefix of the gpt turn that fits
                if j in r.over:  # first by the bound (linear scans), so no giant prefix is tokenized
                    hi = _longest_prefix(hi, lambda n: self._pair_bound(r, (q, a[:n])) <= limit)
                r.cut[j] = a[: _longest_prefix(hi, fits_exactly)].rstrip()
                if r.cut[j]:
                    return True
            del r.cut[j]
            r.long[j] = f"pair {j} is {alone} tokens; its human turn alone leaves no room for an answer within max_length={limit}"
        else:
            r.long[j] = f"pair {j} is {alone} tokens > max_length={limit} (on_long_pair: reject)"
        return False


def _longest_prefix(hi: int, fits: Any) -> int:
    """The largest n in [0, hi] with ``fits(n)``, for a ``fits`` true up to some n and false after
    (n = 0 is taken to fit); binary search."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
