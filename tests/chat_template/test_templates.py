"""Chat templates: the text we train on is the text the Jinja template produces at inference,
and the label mask covers exactly the assistant replies plus their end-of-turn token."""

from __future__ import annotations

import pytest

from llama_pipe.chat_template.builtin import IGNORE_INDEX, TEMPLATES, VICUNA_SYSTEM, get_template, tokenize_with_labels

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


# ----------------------------------------------------------------------------- written with a model


def _byte_level_tokenizer(tmp_path_factory: pytest.TempPathFactory, chat_template: str | None = None):  # type: ignore[no-untyped-def]
    """A GGUF-converted byte-level tokenizer whose BOS is <|im_start|> and which adds no BOS (like SmolLM2)."""
    from transformers import AutoTokenizer

    from llama_pipe.config import ConvertSettings
    from llama_pipe.weights.convert import convert
    from tests.weights.gguf_fixture import tiny_llama, write_gguf

    d = tmp_path_factory.mktemp("bytelevel")
    write_gguf(tiny_llama(True), d / "t.gguf", chat_template=chat_template)
    convert(d / "t.gguf", d / "hf", ConvertSettings())
    return AutoTokenizer.from_pretrained(d / "hf")


def _chat_ids(tokenizer, msgs) -> list[int]:  # type: ignore[no-untyped-def]
    out = tokenizer.apply_chat_template(msgs, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _training_ids(tokenizer, template, msgs) -> tuple[list[int], list[int]]:  # type: ignore[no-untyped-def]
    from llama_pipe.chat_template.builtin import to_messages
    from llama_pipe.train.dataset import encode_record

    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    turns = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in msgs if m["role"] != "system"]
    record = {"conversations": turns, **({"system": system} if system else {})}
    assert to_messages(record) == msgs
    ex = encode_record(record, tokenizer, template, None)
    return ex.input_ids, ex.labels


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("kind", ["sentencepiece", "byte-level"])
def test_written_jinja_gives_the_training_ids(request, tmp_path_factory, name: str, kind: str) -> None:  # type: ignore[no-untyped-def]
    """The Jinja stored with a model renders, through apply_chat_template(tokenize=True), exactly
    the ids training used - also for a tokenizer that adds no BOS and whose BOS is <|im_start|>
    (the double-<|im_start|> bug)."""
    tokenizer = _tokenizer(request, name) if kind == "sentencepiece" else _byte_level_tokenizer(tmp_path_factory)
    template = get_template(name)
    tokenizer.chat_template = template.jinja_for(tokenizer)
    for conv in CONVS:
        ids, _ = _training_ids(tokenizer, template, conv)
        assert _chat_ids(tokenizer, conv) == ids, (name, conv)
    if kind == "byte-level":
        assert _chat_ids(tokenizer, CONVS[0])[:2] != [1, 1]


def _check_model_template(tokenizer) -> None:  # type: ignore[no-untyped-def]
    template = get_template("auto", tokenizer)
    assert template.name == "model"
    eot = tokenizer.eos_token
    for conv in CONVS:
        ids, labels = _training_ids(tokenizer, template, conv)
        assert _chat_ids(tokenizer, conv) == ids
        runs = _runs(labels)
        replies = [m["content"] for m in conv if m["role"] == "assistant"]
        assert [tokenizer.decode(ids[s:e], skip_special_tokens=False) for s, e in runs] == [r + eot for r in replies]


def test_model_template_masks_exactly_the_replies(tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    from tests.weights.test_gguf_import import CHATML

    tokenizer = _byte_level_tokenizer(tmp_path_factory, CHATML)
    _check_model_template(tokenizer)
    # The generation prompt is the template's own.
    text, _ = get_template("model", tokenizer).render(CONVS[2][:1], add_generation_prompt=True)
    assert text == "<|im_start|>user\nCode?<|im_end|>\n<|im_start|>assistant\n"


def test_model_template_with_a_bos_adding_tokenizer(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """A template that writes bos_token, on a tokenizer that adds a BOS itself: one BOS, as apply_chat_template."""
    tokenizer = __import__("copy").deepcopy(tokenizer)
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant: ' }}{% endif %}"
    )
    _check_model_template(tokenizer)
    # Text right after "<s>": the sentencepiece tokenizer's word prefix differs between BOS-added
    # and BOS-in-text, so the ids could not agree: refused, naming the way out.
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ '### ' + m['content'] + eos_token }}{% endfor %}"
    with pytest.raises(ValueError, match="name a built-in template"):
        get_template("model", tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    with pytest.raises(ValueError, match="adds a BOS but its chat template does not write one"):
        get_template("model", tokenizer)


def test_auto_picks_builtin_own_or_vicuna(request, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    tokenizer = __import__("copy").deepcopy(_tokenizer(request, "vicuna_v1.1"))
    tokenizer.chat_template = get_template("llama-2").chat_template
    assert get_template("auto", tokenizer).name == "llama-2"
    tokenizer.chat_template = None
    assert get_template("auto", tokenizer).name == "vicuna_v1.1"
    with pytest.raises(ValueError, match="no chat template"):
        get_template("model", tokenizer)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        get_template("auto")


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer) -> None:  # type: ignore[no-untyped-def]
    tokenizer = __import__("copy").deepcopy(tokenizer)
    # Drops every assistant reply but the last (as some reasoning templates drop past thoughts).
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(ValueError, match="name a built-in template"):
        get_template("model", tokenizer).render(CONVS[0])


@pytest.mark.slow
def test_smollm2_own_template_gives_the_training_ids() -> None:
    from transformers import AutoTokenizer

    from tests.weights.smollm2 import smollm2

    _, hf = smollm2()
    tokenizer = AutoTokenizer.from_pretrained(hf)
    _check_model_template(tokenizer)
    # Without a system message SmolLM2's template inserts its own; a system_prompt replaces it.
    text, _ = get_template("model", tokenizer).render(CONVS[0][:2])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    text, _ = get_template("model", tokenizer).render(CONVS[0][:2], system="You are Llama Pipe.")
    assert text.startswith("<|im_start|>system\nYou are Llama Pipe.<|im_end|>\n<|im_start|>user\n")
