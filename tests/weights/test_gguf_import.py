"""convert from GGUF: logits against the original model and against transformers' own GGUF load."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_pipe.config import ConvertSettings
from llama_pipe.core.errors import InputError
from llama_pipe.weights.convert import convert

from .gguf_fixture import tiny_llama, write_gguf

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _logits(model: object, ids: list[int]) -> object:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]  # type: ignore[operator]


@pytest.mark.parametrize("tie,quant", [(True, "F32"), (False, "F32"), (True, "Q8_0")])
def test_logits_match_the_original_and_transformers_gguf_load(tmp_path: Path, tie: bool, quant: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    original = tiny_llama(tie)
    gguf = write_gguf(original, tmp_path / "tiny.gguf", quant=quant, chat_template=CHATML)
    out = tmp_path / "hf"
    summary = convert(tmp_path, out, ConvertSettings())  # a directory holding one .gguf
    assert summary["own_template"]
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = list(torch.randint(0, original.config.vocab_size, (48,), generator=torch.Generator().manual_seed(1)))
    ref = _logits(reference, ids)
    assert (_logits(ours, ids) - ref).abs().max().item() < 1e-4  # type: ignore[operator]
    if quant == "F32":  # lossless: the original weights come back exactly
        assert (_logits(ours, ids) - _logits(original, ids)).abs().max().item() < 1e-4  # type: ignore[operator]
    assert ours.config.tie_word_embeddings == tie
    assert ours.config.rope_parameters["rope_theta"] == 5e5 and ours.config.num_key_value_heads == 2


def test_without_unpermuting_qk_the_logits_differ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The q/k inverse permutation matters: replaced by identity, the logits are far off."""
    import torch
    from transformers import AutoModelForCausalLM

    import llama_pipe.weights.gguf_import as gguf_import

    original = tiny_llama(True)
    write_gguf(original, tmp_path / "tiny.gguf")
    monkeypatch.setattr(gguf_import, "permute_for_rotary", lambda w, n: w)
    convert(tmp_path / "tiny.gguf", tmp_path / "hf", ConvertSettings())
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = list(range(5, 53))
    assert (_logits(ours, ids) - _logits(original, ids)).abs().max().item() > 1e-2  # type: ignore[operator]


def test_tokenizer_and_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    write_gguf(tiny_llama(True), tmp_path / "tiny.gguf", chat_template=CHATML)
    convert(tmp_path / "tiny.gguf", tmp_path / "hf", ConvertSettings())
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in ("the theme", "naïve café 東京 😀", "<|im_start|>user\nhi<|im_end|>", "x 12"):
        assert tok(text)["input_ids"] == ref(text)["input_ids"], text
    assert tok.convert_ids_to_tokens(tok(" the")["input_ids"]) == ["Ġthe"]
    assert tok("<|im_start|>")["input_ids"] == [1]  # control tokens stay whole; no BOS is added
    assert tok.chat_template == CHATML
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


@pytest.mark.parametrize("pre,written", [("smollm", "smollm"), ("gpt-2", "gpt-2"), ("gpt2", "gpt-2"), ("default", "gpt-2"),
                                         ("llama-bpe", "llama-bpe"), ("llama3", "llama-bpe")])
def test_pre_tokenizer_is_recorded_and_exported_back(tmp_path: Path, pre: str, written: str) -> None:
    """convert records the llama.cpp split it built (tokenizer_config.json gguf_pre_tokenizer); export
    finds the same one from tokenizer.json and writes it (`default` becomes GPT-2's split, named so)."""
    import json

    import gguf

    from llama_pipe.config import ExportSettings
    from llama_pipe.weights.export import export_gguf

    write_gguf(tiny_llama(True), tmp_path / "tiny.gguf", pre=pre)
    convert(tmp_path / "tiny.gguf", tmp_path / "hf", ConvertSettings())
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["gguf_pre_tokenizer"] == written
    export_gguf(tmp_path / "hf", tmp_path / "out" / "back.gguf", ExportSettings(type="f32"))
    assert gguf.GGUFReader(tmp_path / "out" / "back.gguf").fields["tokenizer.ggml.pre"].contents() == written


def test_without_own_template_the_configured_one_is_written(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from llama_pipe.chat_template.builtin import get_template

    write_gguf(tiny_llama(True), tmp_path / "tiny.gguf")
    convert(tmp_path / "tiny.gguf", tmp_path / "hf", ConvertSettings(), template="chatml")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    # The tokenizer adds no BOS, so the stored chatml Jinja writes none either.
    assert tok.chat_template == get_template("chatml").jinja_for(tok)
    assert not tok.chat_template.startswith("{{- bos_token")


def test_refuses_other_architectures(tmp_path: Path) -> None:
    write_gguf(tiny_llama(True), tmp_path / "x.gguf", arch="qwen2")
    with pytest.raises(InputError, match=r"x.gguf: general.architecture is 'qwen2'"):
        convert(tmp_path / "x.gguf", tmp_path / "hf", ConvertSettings())
    assert not (tmp_path / "hf").exists()


def test_two_gguf_files_are_ambiguous(tmp_path: Path) -> None:
    write_gguf(tiny_llama(True), tmp_path / "a.gguf")
    (tmp_path / "b.gguf").write_bytes((tmp_path / "a.gguf").read_bytes())
    with pytest.raises(InputError, match="2 GGUF files"):
        convert(tmp_path, tmp_path / "hf", ConvertSettings())


@pytest.mark.slow
def test_smollm2_converts_exactly() -> None:
    """The real model: logits equal transformers' own GGUF load; ids equal its GGUF tokenizer's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .smollm2 import smollm2

    gguf, hf = smollm2()
    ours = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf)
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    texts = ["The capital of France is", "Héllo wörld — naïve café 東京 😀 Привет, مرحبا",
             "def f(x):\n\treturn x ** 2  # 2024-12-01\r\n", "<|im_start|>user\nhi<|im_end|>\n", "  leading  spaces \n\n"]
    for text in texts:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text
    assert tok.chat_template == ref_tok.chat_template and "<|im_start|>" in tok.chat_template
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tok(texts[0] + " " + texts[1])["input_ids"]
    diff = (_logits(ours, ids) - _logits(reference, ids)).abs().max().item()  # type: ignore[operator]
    assert diff < 1e-4, diff
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = ours.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0][prompt["input_ids"].shape[1]:])
