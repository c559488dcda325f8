"""Settings of the data stages: ``data``, ``merge``, ``clean``, ``filter_lang``, ``split``, and of ``distill`` (between gather and train)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llama_pipe.config.section import section
from llama_pipe.core.settings import SEED_MAX, opt


@section("data", "raw inputs and sharding")
@dataclass
class DataSettings:
    """Raw inputs and how the data stages are scattered."""

    inputs: list[str] = opt(
        ["data/sample/identity_sample.json"],
        "ShareGPT / OpenAI-messages / Alpaca files (.json list or .jsonl) merged in this order. The default is the identity "
        "sample alone (coherent conversations that teach the assistant its name; distill adds the base's own answers): the "
        "bundled chat sample (data/sample/sharegpt_sample.json) has filler replies and exercises the data stages in tests and "
        ".test/, not a model worth training on",
    )
    shards: int = opt(2, "shards the merged data is split into for the clean/filter/split stages", minimum=1)
    val_fraction: float = opt(0.1, "fraction of conversations held out for validation", minimum=0, maximum=0.9)
    seed: int = opt(0, "seed of the train/validation assignment (hash of the first question + seed)", minimum=0, maximum=SEED_MAX)
    weights: list[float] = opt(
        [], "how many times each input's training conversations go into train.jsonl, one number per entry of inputs, in "
        "its order (empty: 1 each). 3 puts every training conversation of that file in 3 times; a fraction keeps a "
        "seeded share (1.5: each once, half of them twice; 0.5: half, the rest listed in gather's rejects as 'weight'). "
        "Validation is never weighted. Use it so that a small file that teaches what matters (the identity sample) is "
        "not drowned by a large one",
    )


@section("merge", "merge stage")
@dataclass
class MergeSettings:
    """``merge``: validate, normalise roles, drop duplicate ids."""

    dedupe: Literal["first", "reject_all"] = opt(
        "first", "on a duplicate id keep the first record ('first') or reject every copy ('reject_all'); a record "
        "whose id was already used by a different conversation from another file is not a duplicate: it is kept "
        "as '<file stem>:<id>'"
    )
    workers: int = opt(0, "processes to use; 0 = all cores", minimum=0, performance=True)


@section("clean", "clean stage")
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
    workers: int = opt(0, "processes to use; 0 = all cores", minimum=0, performance=True)
    rename: list[str] = opt(
        [], "names to replace in every turn, each 'OLD => NEW' (whole names, longest first, after the HTML is "
        "converted): give other data sets' assistant and maker the names your data teaches, e.g. ['Vicuna => Llama "
        "Pipe', 'Large Model Systems Organization (LMSYS) => Northwind Labs']. Give the maker a name unlike the "
        "assistant's: with 'the llama-pipe project' SmolLM2 blended the two into 'Llama-pipe' (docs/benchmarks.md). "
        "clean reports the names the replies introduce (stats 'introductions'); empty: no renaming",
    )


@section("filter_lang", "filter-lang stage")
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
    workers: int = opt(0, "processes to use; 0 = all cores", minimum=0, performance=True)
    detector: Literal["langdetect", "cld2"] = opt(
        "langdetect", "language detector: langdetect (seeded, pure Python) or cld2 (pycld2, compiled, ~10x faster; pip install pycld2)"
    )


@section("split", "split stage")
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
    batch_size: int = opt(256, "texts per fast-tokenizer batch", minimum=1, performance=True)
    workers: int = opt(0, "processes to use; 0 = all cores", minimum=0, performance=True)


#: A rewrite's required facts (``distill.require``).
RequiredFact = Literal["terms", "numbers", "code", "urls", "names"]


@section("distill", "distill stage: training replies in the base's own words (self-distillation, replay)")
@dataclass
class DistillSettings:
    """``distill``: bring the training targets closer to the base's own distribution (docs/distill.md)."""

    mode: Literal["auto", "rewrite", "replay", "both", "off"] = opt(
        "auto", "rewrite: the base rewrites each assistant reply in its own words with the original as the reference "
        "(self-distillation, SDFT); replay: add the base's own answers to prompts as extra conversations; both; off: "
        "train on the data as it is (the workflow then runs no distill job). auto: both when the base is a chat model "
        "(it ships its own chat template, e.g. SmolLM2-Instruct) and generation is affordable (a GPU, or a base of at "
        "most max_cpu_params parameters on CPU); off otherwise (a pretrained-only base that convert gave a built-in "
        "template, the tiny test model, a large base on CPU)"
    )
    max_rewrites: int = opt(
        64, "assistant turns rewritten at most (0 = every eligible turn); which ones is a seeded choice that does not "
        "depend on the other records. The rest keep their original reply (original:budget). Cost: about one "
        "generated reply each", minimum=0,
    )
    replay_ratio: float = opt(
        0.1, "replay conversations added per training record (0.1: one for every ten), up to max_replays", minimum=0, maximum=2,
    )
    max_replays: int = opt(32, "replay conversations added at most (0 = no limit). Cost: one generated answer each", minimum=0)
    replay_prompts: str | None = opt(
        None, "JSONL of replay prompts ({\"id\", \"prompt\"} per line); null: the bundled set of ~150 everyday questions "
        "(facts, how-to, arithmetic, definitions, short writing), inside the installed package"
    )
    replay_user_turns: bool = opt(
        True, "also replay the first human turns of the training records, except questions to the assistant itself "
        "('you', 'your': 'Who built you?') and those whose reply holds a keep_terms string or a name: there the "
        "user's answer, e.g. the assistant's identity, is what training must teach"
    )
    max_new_tokens: int = opt(
        96, "longest rewrite or replay answer in tokens; a reply longer than this is not rewritten (original:too_long) "
        "and a rewrite that reaches its limit is not used (original:truncated)", minimum=8,
    )
    min_tokens: int = opt(
        6, "a reply shorter than this many tokens is not rewritten (original:too_short): \"You too!\" has no other words "
        "worth learning, and a small base answers something else instead", minimum=1,
    )
    batch_size: int = opt(32, "prompts generated together per forward pass (on CPU a step of 32 rows costs ~1.5x one of 16)", minimum=1)
    keep_terms: list[str] = opt(
        ["Llama Pipe"], "strings a rewrite must keep (case-insensitive) when the original reply has them, e.g. the "
        "assistant's new name"
    )
    require: list[RequiredFact] = opt(
        ["terms", "numbers", "code", "urls", "names"], "what a rewrite must keep of the original, else the original "
        "is used and counted: terms (keep_terms), numbers, code (code blocks and inline code), urls, names (capitalised "
        "words inside a sentence and acronyms; a rewrite that brings in a name found neither in the original nor in "
        "the user's messages is refused too, e.g. the base's own name)"
    )
    languages: list[str] = opt(
        ["en"], "rewrite and replay only records whose language (filter-lang's 'lang', 'zh' matches zh-cn) is one of "
        "these; empty: all. Others keep their original reply (original:language)"
    )
    max_cpu_params: float = opt(
        1.0e9, "auto on CPU: above this many base parameters the stage is off (generation would take hours)", minimum=0,
    )
    seed: int = opt(0, "seed of which turns are rewritten (under max_rewrites) and which prompts are replayed", minimum=0, maximum=SEED_MAX)
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where to generate")
