"""Streaming generation: incremental decoding, stop strings, sampling settings, and the chat command."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
import torch

from llama_pipe.cli import main
from llama_pipe.models.generation import ChatModel, Completion, SamplingParams
from llama_pipe.serve.chat import chat_loop


class Scripted(ChatModel):
    """The real tokenizer, but the 'model' emits a fixed token sequence."""

    script: list[int] = []

    def _tokens(self, prompt: list[int], params: SamplingParams, budget: int) -> Iterator[int]:
        yield from self.script[:budget]


def scripted(chat_model: ChatModel, text: str, end: bool = True) -> Scripted:
    m = Scripted(chat_model.model, chat_model.tokenizer, chat_model.template, "scripted")
    ids = chat_model.tokenizer(text, add_special_tokens=False)["input_ids"]
    m.script = ids + ([chat_model.tokenizer.eos_token_id] if end else [])
    return m


def pieces(model: ChatModel, params: SamplingParams) -> tuple[list[str], Completion]:
    res = Completion()
    out = list(model.stream(model.prompt_ids([{"role": "user", "content": "hi"}]), params, res))
    return out, res


def test_pieces_join_to_the_text_and_never_split_a_character(chat_model: ChatModel) -> None:
    text = "Hello 世界, ok 龘龘 done ✓"
    m = scripted(chat_model, text)
    assert any(chat_model.tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in m.script), "needs byte-fallback tokens"
    out, res = pieces(m, SamplingParams(max_new_tokens=200))
    assert "".join(out) == text == res.text
    assert len(out) > 3 and not any("\ufffd" in p for p in out)
    assert res.finish_reason == "stop" and res.completion_tokens == len(m.script)


def test_stop_strings_across_token_boundaries(chat_model: ChatModel) -> None:
    m = scripted(chat_model, "The answer is 42. USER: and now?")
    out, res = pieces(m, SamplingParams(max_new_tokens=200, stop=["USER:"]))
    assert "".join(out) == "The answer is 42. " and res.finish_reason == "stop"
    assert not any("U" in p for p in out), "a stop-string prefix must be held back, not streamed"
    # A held-back prefix that turns out not to be a stop string is released.
    m = scripted(chat_model, "See US history, USA.")
    out, _ = pieces(m, SamplingParams(max_new_tokens=200, stop=["USER:"]))
    assert "".join(out) == "See US history, USA."


def test_max_new_tokens_gives_finish_reason_length(chat_model: ChatModel) -> None:
    m = scripted(chat_model, "one two three four five six seven", end=False)
    out, res = pieces(m, SamplingParams(max_new_tokens=3))
    assert res.finish_reason == "length" and res.completion_tokens == 3
    assert "".join(out) == chat_model.tokenizer.decode(m.script[:3])


def test_batched_replies_equal_one_at_a_time(chat_model: ChatModel) -> None:
    """eval answers its questions in left-padded batches: each row's reply (greedy, or sampled
    with its own seed) is the one ``complete`` gives alone, rows stop on their own, and a prompt
    with no room left in the context is reported on its row without stopping the others."""
    convs = [[{"role": "user", "content": c}] for c in
             ("Hi", "Tell me a long story about a dragon and a knight.", "2+2?", "What is the capital of France, please?")]
    for params in ([SamplingParams(max_new_tokens=n, temperature=0) for n in (12, 5, 12, 9)],
                   [SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=s) for s in (1, 2, 3, 4)],
                   [SamplingParams(max_new_tokens=16, temperature=0, stop=(s,)) for s in ("e", "a", "o", "t")]):
        alone = [chat_model.complete(c, p) for c, p in zip(convs, params)]
        seen: list[int] = []
        together = chat_model.complete_batch(convs, params, batch_size=3, on_done=seen.append)
        assert sum(seen) == len(convs)
        assert [r.token_ids for r in together] == [r.token_ids for r in alone]
        assert [r.text for r in together] == [r.text for r in alone]
        assert [(r.finish_reason, r.completion_tokens, r.prompt_tokens) for r in together] == \
            [(r.finish_reason, r.completion_tokens, r.prompt_tokens) for r in alone]
    too_long = [{"role": "user", "content": "word " * (chat_model.context_length + 10)}]
    out = chat_model.complete_batch([too_long, convs[0]], [SamplingParams(max_new_tokens=4, temperature=0)] * 2)
    assert out[0].error and "context" in out[0].error and out[0].text == ""
    assert out[1].error is None and out[1].token_ids == chat_model.complete(convs[0], SamplingParams(max_new_tokens=4, temperature=0)).token_ids


def test_greedy_and_tiny_top_p_agree_and_follow_argmax(chat_model: ChatModel) -> None:
    msgs = [{"role": "user", "content": "Tell me a story."}]
    greedy = chat_model.complete(msgs, SamplingParams(max_new_tokens=12, temperature=0))
    nucleus = chat_model.complete(msgs, SamplingParams(max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=3))
    assert greedy.text == nucleus.text
    # The KV-cached loop equals argmax over full forward passes, token by token.
    ids = chat_model.prompt_ids(msgs)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(12):
            nxt = int(chat_model.model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt in chat_model.stop_ids:
                break
            new.append(nxt)
    assert greedy.token_ids == new and greedy.text.strip()


def test_prompt_uses_the_template(chat_model: ChatModel) -> None:
    ids = chat_model.prompt_ids([{"role": "user", "content": "hi"}])
    text = chat_model.tokenizer.decode(ids, skip_special_tokens=True)
    assert text.endswith("USER: hi ASSISTANT:") and ids[0] == chat_model.tokenizer.bos_token_id


def test_chat_loop_is_multi_turn(chat_model: ChatModel) -> None:
    lines = iter(["first question", "", "second question", "/reset", "fresh start"])
    prompts: list[str] = []

    class Recording(ChatModel):
        def stream(self, prompt, params, result=None):  # type: ignore[override]
            prompts.append(self.tokenizer.decode(prompt, skip_special_tokens=True))
            return super().stream(prompt, params, result)

    m = Recording(chat_model.model, chat_model.tokenizer, chat_model.template, "tiny")
    out = io.StringIO()

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    history = chat_loop(m, SamplingParams(max_new_tokens=4, temperature=0), read, out)
    assert len(prompts) == 3
    first_answer = prompts[1].split("ASSISTANT:")[1].split("USER:")[0].strip()
    assert "USER: first question ASSISTANT:" in prompts[1] and "USER: second question ASSISTANT:" in prompts[1]
    assert first_answer == chat_model.complete([{"role": "user", "content": "first question"}],
                                                SamplingParams(max_new_tokens=4, temperature=0)).text.strip()
    assert "first question" not in prompts[2]
    assert [h["role"] for h in history] == ["user", "assistant"] and history[0]["content"] == "fresh start"
    assert "(new conversation)" in out.getvalue()


def test_chat_prompt_answers_once(tiny_hf_model_dir, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["chat", str(tiny_hf_model_dir), "--prompt", "Hi there", "--max-tokens", "6", "--temperature", "0", "--device", "cpu"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.strip() and first.endswith("\n")
    assert main(argv) == 0
    assert capsys.readouterr().out == first, "greedy replies are reproducible"


def test_chat_applies_an_adapter_on_the_fly(tiny_hf_model_dir, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.adapters.test_merge_adapter import make_adapter

    adapter = make_adapter(tiny_hf_model_dir, tmp_path / "a", 5, ["q_proj", "v_proj", "o_proj"])
    base = ["chat", str(tiny_hf_model_dir), "--prompt", "Hi there", "--max-tokens", "24", "--temperature", "0", "--device", "cpu"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main([*base, "--adapter", str(adapter)]) == 0
    assert capsys.readouterr().out != plain


def test_chat_bad_model_directories_are_clear(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "model directory not found" in capsys.readouterr().err
    (tmp_path / "adapter_config.json").write_text("{}")
    assert main(["chat", str(tmp_path), "--prompt", "x"]) == 2
    assert "pass it with --adapter" in capsys.readouterr().err


def test_chat_reply_prints_no_deprecation_warning(tiny_hf_model_dir, tmp_path) -> None:
    """transformers 5.2x deprecated ``past_key_values`` (argument and output) for ``cache``: its
    warning printed itself inside the first reply of ``llama-pipe chat``. The cache is passed by
    the name the model's forward takes (llama_pipe.models.generation.cache_argument)."""
    import inspect
    import os
    import subprocess
    import sys

    from transformers import LlamaForCausalLM

    if "cache" not in inspect.signature(LlamaForCausalLM.forward).parameters:
        pytest.skip("this transformers takes past_key_values (no deprecation)")
    proc = subprocess.run([sys.executable, "-m", "llama_pipe.cli", "chat", str(tiny_hf_model_dir), "--prompt", "Are you Siri?",
                           "--max-tokens", "4", "--temperature", "0", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "default"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "deprecated" not in proc.stdout + proc.stderr, proc.stderr[-2000:]


def test_chat_help_lists_only_what_chat_uses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    text = capsys.readouterr().out
    for flag in ("--max_tokens", "--temperature", "--top_p", "--device", "--model_id", "--template", "--system_prompt", "--prompt"):
        assert flag in text, flag
    for flag in ("--host", "--port", "--max_request_bytes", "--listen_backlog", "--max_connections", "--max_queue",
                 "--queue_timeout", "--request_timeout", "--allowed_hosts", "--allowed_origins"):
        assert flag not in text, flag
