"""Settings of the data stages: ``data``, ``merge``, ``clean``, ``filter_lang``, ``split``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llama_pipe.settings import SEED_MAX, opt


@dataclass
class DataSettings:
    """Raw inputs and how the data stages are scattered."""

    inputs: list[str] = opt(
        ["data/sample/sharegpt_sample.json", "data/sample/identity_sample.json"],
        "ShareGPT / OpenAI-messages / Alpaca files (.json list or .jsonl) merged in this order",
    )
    shards: int = opt(2, "shards the merged data is split into for the clean/filter/split stages", minimum=1)
    val_fraction: float = opt(0.1, "fraction of conversations held out for validation", minimum=0, maximum=0.9)
    seed: int = opt(0, "seed of the train/validation assignment (hash of the first question + seed)", minimum=0, maximum=SEED_MAX)


@dataclass
class MergeSettings:
    """``merge``: validate, normalise roles, drop duplicate ids."""

    dedupe: Literal["first", "reject_all"] = opt(
        "first", "on a duplicate id keep the first record ('first') or reject every copy ('reject_all'); a record "
        "whose id was already used by a different conversation from another file is not a duplicate: it is kept "
        "as '<file stem>:<id>'"
    )


@dataclass
class CleanSettings:
    """``clean``: HTML -> markdown and FastChat's clean_sharegpt filters."""

    blocked_words: list[str] = opt(["openai", "chatgpt"], "drop a conversation whose gpt turns contain one of these (case-insensitive)")
    blocked_replies: list[str] = opt(
        ["Too many requests in 1 hour. Try again later.", "!Too many requests in 1 hour. Try again later."],
        "drop a conversation with a turn that starts with one of these (rate-limit and error replies)",
    )
    min_turns: int = opt(2, "drop conversations with fewer turns after cleaning", minimum=1)
    min_chars: int = opt(16, "drop a conversation with fewer characters than this in all its cleaned turns (FastChat: 16)", minimum=0)
    drop_duplicate_first_exchange: bool = opt(True, "drop later conversations that start with an already-seen first human+gpt exchange")
    fix_roles: Literal["reject", "drop_first_gpt"] = opt(
        "drop_first_gpt",
        "a conversation that starts with a gpt turn: drop that turn ('drop_first_gpt', FastChat) or reject it",
    )
    time_budget: float = opt(
        10.0, "seconds one record may take to clean; a slower one is rejected as too_slow instead of stalling its "
        "shard (0 = no limit; normal records take milliseconds)", minimum=0,
    )
    max_growth: float = opt(
        4.0, "reject a record (too_large) when cleaning would make one of its turns longer than this many times the "
        "turn's input plus 10,000 characters (table padding, list indentation); checked before the text is built",
        minimum=1,
    )
    workers: int = opt(0, "processes to use; 0 = all cores", minimum=0)


@dataclass
class FilterLangSettings:
    """``filter-lang``: one langdetect language per conversation."""

    keep: list[str] = opt(
        ["en", "zh"], "keep only these languages (ISO 639-1, 'zh' matches zh-cn/zh-tw); empty keeps all. When a "
        "run gives skip but no keep (neither flag nor config file), keep is empty: --skip ko alone keeps every "
        "other language"
    )
    skip: list[str] = opt([], "drop these languages")
    seed: int = opt(0, "langdetect seed (makes detection deterministic)", minimum=0, maximum=SEED_MAX)
    min_chars: int = opt(
        10, "a text with fewer letters than this (code removed) is too short for a guess: labelled 'und' (see "
        "undetermined) unless its script names its language (Hangul: ko, kana: ja, Han: zh)", minimum=0,
    )
    min_confidence: float = opt(
        0.9, "a longer text whose guess has a lower probability (langdetect; cld2: its unreliable flag) is labelled 'und' too",
        minimum=0, maximum=1,
    )
    cross_check: bool = opt(
        True, "keep the detector's answer only when the other one names the same language, else 'und': on short text "
        "each is often wrong and sure of itself ('Are you Siri?' is Turkish to langdetect at p = 0.99999). langdetect is "
        "checked by cld2 (a tenth of its cost); cld2 by langdetect on texts under 100 letters (docs/benchmarks.md)"
    )
    undetermined: Literal["keep", "drop"] = opt(
        "keep", "conversations labelled 'und' (too short or too uncertain for a reliable guess): keep them (lang 'und', "
        "whatever keep and skip say) or drop them (lang_undetermined)"
    )
    keep_unknown: bool = opt(False, "keep conversations with no language at all (no letters, e.g. only code, numbers or emoji)")
    max_chars: int = opt(1000, "detect on at most this many characters of a conversation's text (code removed)", minimum=100)
    time_budget: float = opt(
        10.0, "seconds one record may take to detect; a slower one is rejected as too_slow (0 = no limit)", minimum=0,
    )
    workers: int = opt(0, "processes to use; 0 = all cores", minimum=0)
    detector: Literal["langdetect", "cld2"] = opt(
        "langdetect", "language detector: langdetect (seeded, pure Python) or cld2 (pycld2, compiled, ~10x faster; pip install pycld2)"
    )


@dataclass
class SplitSettings:
    """``split``: whole human/gpt pairs into chunks of at most ``max_length`` tokens."""

    max_length: int | None = opt(
        None, "largest chunk in tokens (rendered with chat.template); null: chat.max_seq_len, so chunks are as long "
        "as the rows training takes; a value over chat.max_seq_len is a config error", minimum=16
    )
    on_long_pair: Literal["reject", "truncate"] = opt(
        "reject", "a single pair longer than max_length: reject it with a reason, or truncate its gpt turn"
    )
    batch_size: int = opt(256, "texts per fast-tokenizer batch", minimum=1)
