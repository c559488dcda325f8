"""Chat templates: the text we train on is the text the Jinja template produces at inference,
and the label mask covers exactly the assistant replies plus their end-of-turn token."""

from __future__ import annotations

import pytest

from llama_pipe.templates import IGNORE_INDEX, TEMPLATES, VICUNA_SYSTEM, get_template, tokenize_with_labels

CONVS = [
    [
        {"role": "user", "content": "Hello, who are you?"},
        {"role": "assistant", "content": "I am a helpful assistant."},
        {"role": "user", "content": "Say something in Chinese."},
        {"role": "assistant", "content": "你好，世界！很高兴认识你。"},
    ],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "请用中文回答：天空是什么颜色？"},
        {"role": "assistant", "content": "天空通常是蓝色的。"},
    ],
    [
        {"role": "user", "content": "Code?"},
        {"role": "assistant", "content": "```python\nprint('hi')\n```\n\nDone."},
    ],
]


def test_vicuna_text_is_fastchats_format() -> None:
    text, spans = get_template("vicuna_v1.1").render(CONVS[0])
    assert text == (
        f"{VICUNA_SYSTEM} USER: Hello, who are you? ASSISTANT: I am a helpful assistant.</s>"
        "USER: Say something in Chinese. ASSISTANT: 你好，世界！很高兴认识你。</s>"
    )
    assert [text[s:e] for s, e in spans] == ["I am a helpful assistant.</s>", "你好，世界！很高兴认识你。</s>"]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conv", range(len(CONVS)))
def test_render_matches_jinja_chat_template(request, name: str, conv: int) -> None:
    tokenizer = _tokenizer(request, name)
    t = get_template(name)
    text, _ = t.render(CONVS[conv])
    jinja = tokenizer.apply_chat_template(CONVS[conv], chat_template=t.chat_template, tokenize=False)
    assert jinja == tokenizer.bos_token + text


def _tokenizer(request: pytest.FixtureRequest, name: str):
    """The tiny sentencepiece tokenizer, or for llama-3 a LLaMA-3-style one (its markers are its
    special tokens)."""
    return request.getfixturevalue("llama3_tokenizer" if name == "llama-3" else "tokenizer")


def test_llama3_text_is_metas_format(llama3_tokenizer) -> None:
    text, spans = get_template("llama-3").render(CONVS[1])
    assert text == (
        "<|start_header_id|>system<|end_header_id|>\n\nYou answer briefly.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n请用中文回答：天空是什么颜色？<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n天空通常是蓝色的。<|eot_id|>"
    )
    assert [text[s:e] for s, e in spans] == ["天空通常是蓝色的。<|eot_id|>"]
    ids = llama3_tokenizer(text)["input_ids"]
    for marker in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):  # one special token each
        assert ids.count(llama3_tokenizer.convert_tokens_to_ids(marker)) == 3


def _runs(labels: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, lab in enumerate(labels + [IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conv", range(len(CONVS)))
def test_label_mask_is_exactly_the_assistant_tokens(request, name: str, conv: int) -> None:
    tokenizer = _tokenizer(request, name)
    t = get_template(name)
    text, spans = t.render(CONVS[conv])
    ids, labels = tokenize_with_labels(tokenizer, text, spans)
    # The ids are the inference tokenisation of the whole text (no per-segment tokenising).
    assert ids == tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    replies = [m["content"] for m in CONVS[conv] if m["role"] == "assistant"]
    runs = _runs(labels)
    assert len(runs) == len(replies)
    eot = tokenizer.convert_tokens_to_ids(t.end_of_turn)
    for (s, e), reply in zip(runs, replies):
        # Token for token: the labelled run decodes to the reply plus the end-of-turn marker ...
        decoded = tokenizer.decode(ids[s:e], skip_special_tokens=False)
        assert decoded.strip() == (reply + (" " if name == "llama-2" else "") + t.end_of_turn).strip()
        assert ids[e - 1] == eot
        # ... and the tokens just before it (the "ASSISTANT:" prompt) are not trained.
        before = tokenizer.decode(ids[:s], skip_special_tokens=False)
        assert reply not in before[-len(reply) :]
    # Everything unlabelled put together holds no assistant text.
    prompt_only = tokenizer.decode([i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX], skip_special_tokens=False)
    for reply in replies:
        assert reply not in prompt_only


def test_pad_is_not_eos(tokenizer) -> None:
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_config_offers_exactly_the_templates_there_are() -> None:
    from typing import get_args

    from llama_pipe.config import TemplateName

    assert sorted(get_args(TemplateName)) == sorted(TEMPLATES)
