"""convert: Meta -> Hugging Face, proven by logits against an independent Meta reference."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from llama_pipe.config import ConvertSettings
from llama_pipe.core.errors import InputError
from llama_pipe.weights import convert as convert_mod
from llama_pipe.weights.convert import convert, parse_size

from . import meta_reference


def _hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


def _max_diff(meta_dir: Path, hf_dir: Path) -> float:
    params, weights = meta_reference.load_merged(meta_dir)
    vocab = weights["tok_embeddings.weight"].shape[0]
    tokens = torch.randint(3, vocab, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = meta_reference.forward(params, weights, tokens)
    d = (ref - _hf_logits(hf_dir, tokens)).abs().max().item()
    print(f"max|ref-hf|={d:.3g} (ref logit scale {ref.abs().max().item():.3g})")
    return d


CASES = {
    "1-shard MHA": dict(n_shards=1, n_kv_heads=None),
    "2-shard GQA": dict(n_shards=2),
    "4-shard GQA, ffn multiplier, rope_theta 5e5": dict(
        n_shards=4, n_heads=8, n_kv_heads=4, ffn_dim_multiplier=1.3, rope_theta=500000.0, norm_eps=1e-6
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_logits_match_meta_reference(make_meta, tmp_path: Path, case: str) -> None:
    meta_dir = make_meta(**CASES[case])
    out = tmp_path / "hf"
    convert(meta_dir, out, ConvertSettings(max_shard_size="200KB"))
    assert len(list(out.glob("*.safetensors"))) > 1  # several output shards exercised too
    assert _max_diff(meta_dir, out) < 1e-4


def test_without_rotary_permutation_logits_differ(make_meta, tmp_path: Path, monkeypatch) -> None:
    """The classic conversion bug: the test above must catch a missing q/k permutation."""
    meta_dir = make_meta(n_shards=2)
    monkeypatch.setattr(convert_mod, "permute_for_rotary", lambda w, n_heads: w)
    convert(meta_dir, tmp_path / "hf", ConvertSettings())
    assert _max_diff(meta_dir, tmp_path / "hf") > 1e-2


def test_bfloat16_checkpoint_converts_to_requested_dtype(make_meta, tmp_path: Path) -> None:
    from safetensors import safe_open

    meta_dir = make_meta(n_shards=2, dtype="bfloat16")
    convert(meta_dir, tmp_path / "f32", ConvertSettings(dtype="float32"))
    assert _max_diff(meta_dir, tmp_path / "f32") < 1e-4  # the reference upcasts the same bf16 values
    convert(meta_dir, tmp_path / "bf16", ConvertSettings(dtype="bfloat16"))
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as fh:
        assert fh.get_tensor("lm_head.weight").dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_cli_make_base_then_convert_loads_with_auto_classes_and_generates(tmp_path: Path, tokenizer_dir: Path) -> None:
    """The acceptance path: make-base -> convert -> AutoModelForCausalLM + AutoTokenizer -> generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llama_pipe.cli import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"conversations": [{"from": "human", "value": f"question {i} about cats and dogs"},
                                          {"from": "gpt", "value": f"answer {i}: cats sleep, dogs bark {i * 7}"}]}) + "\n"
            for i in range(200)
        )
    )
    base, hf = tmp_path / "base", tmp_path / "hf_base"
    assert main(["make-base", str(base), "--tokenizer-corpus", str(corpus), "--tiny.vocab_size", "400"]) == 0
    assert main(["convert", str(base), "-o", str(hf), "--template", "chatml"]) == 0
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf)
    assert len(tok) == model.config.vocab_size == json.loads((base / "params.json").read_text())["vocab_size"]
    assert model.config.num_key_value_heads == 2 and model.config.max_position_embeddings == 1024
    prompt = tok.apply_chat_template([{"role": "user", "content": "cats?"}], add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\ncats?<|im_end|>\n<|im_start|>assistant\n" in prompt
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    gen = json.loads((hf / "generation_config.json").read_text())
    assert gen["eos_token_id"] == sorted([tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")])
    assert gen["pad_token_id"] == tok.pad_token_id != tok.eos_token_id
    assert not list(tmp_path.glob("*.tmp-*"))  # no temporary directories left behind


def test_malicious_pickle_is_refused_naming_the_file(make_meta, tmp_path: Path) -> None:
    meta_dir = make_meta(n_shards=2)
    marker = tmp_path / "code-ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    sd = torch.load(meta_dir / "consolidated.01.pth", weights_only=True)
    sd["norm.weight"] = Evil()
    torch.save(sd, meta_dir / "consolidated.01.pth")
    with pytest.raises(InputError, match=r"consolidated\.01\.pth: refused to load"):
        convert(meta_dir, tmp_path / "hf", ConvertSettings())
    assert not marker.exists()
    assert not (tmp_path / "hf").exists()


def test_llama2_release_layout_and_params(make_meta, tmp_path: Path) -> None:
    """Meta's LLaMA-2 download: tokenizer one level up; params.json without n_kv_heads,
    rope_theta or max_seq_len and with vocab_size -1."""
    release = make_meta(n_shards=1, n_kv_heads=None)
    (release / "llama-2-7b").mkdir()
    for f in release.iterdir():
        if f.is_file() and f.name != "tokenizer.model":
            f.rename(release / "llama-2-7b" / f.name)
    params = {"dim": 64, "multiple_of": 32, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-05, "vocab_size": -1}
    (release / "llama-2-7b" / "params.json").write_text(json.dumps(params))
    convert(release / "llama-2-7b", tmp_path / "hf", ConvertSettings())
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == (release / "tokenizer.model").read_bytes()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["num_key_value_heads"], config["max_position_embeddings"], config["vocab_size"]) == (4, 4096, 1000)
    assert config["rope_parameters"]["rope_theta"] == 10000.0
    assert _max_diff(release / "llama-2-7b", tmp_path / "hf") < 1e-4
    (release / "tokenizer.model").unlink()
    with pytest.raises(InputError, match="no tokenizer.model here or in"):
        convert(release / "llama-2-7b", tmp_path / "hf2", ConvertSettings())


def test_replicated_weights_that_differ_are_refused(make_meta, tmp_path: Path) -> None:
    meta_dir = make_meta(n_shards=2)
    sd = torch.load(meta_dir / "consolidated.01.pth", weights_only=True)
    sd["layers.1.ffn_norm.weight"] = sd["layers.1.ffn_norm.weight"] + 1
    torch.save(sd, meta_dir / "consolidated.01.pth")
    with pytest.raises(InputError, match="replicated weight layers.1.ffn_norm.weight differs between shard 0 and shard 1"):
        convert(meta_dir, tmp_path / "hf", ConvertSettings())


def test_a_damaged_tokenizer_model_is_refused_clearly(make_meta, tmp_path: Path) -> None:
    meta_dir = make_meta(n_shards=1)
    (meta_dir / "tokenizer.model").write_text("IQ== 0\nIg== 1\nIw== 2\n")  # tiktoken format, 3 tokens only
    with pytest.raises(InputError, match="single bytes have no token"):
        convert(meta_dir, tmp_path / "hf", ConvertSettings())
    (meta_dir / "tokenizer.model").write_bytes(b"\x08\x01garbage")
    with pytest.raises(InputError, match="neither a usable sentencepiece model.*nor a tiktoken BPE file"):
        convert(meta_dir, tmp_path / "hf", ConvertSettings())
    assert not (tmp_path / "hf").exists()


def test_checklist_catches_flipped_bytes_and_a_missing_last_shard(make_meta, tmp_path: Path) -> None:
    from llama_pipe.weights import meta

    meta_dir = make_meta(n_shards=2)
    names = [p.name for p in meta_dir.iterdir()]
    (meta_dir / "checklist.chk").write_text(meta.checklist_text(meta_dir, names))
    shard = meta_dir / "consolidated.01.pth"
    good = shard.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01  # inside tensor data: torch.load would not notice
    shard.write_bytes(bytes(flipped))
    with pytest.raises(InputError, match=r"consolidated\.01\.pth: md5 [0-9a-f]+ does not match checklist\.chk"):
        convert(meta_dir, tmp_path / "hf", ConvertSettings())
    convert(meta_dir, tmp_path / "hf", ConvertSettings(verify_checksums=False))  # explicitly off: converts
    shard.unlink()  # only consolidated.00.pth left: looks like a 1-shard model but for the checklist
    with pytest.raises(InputError, match=r"consolidated\.01\.pth listed in checklist\.chk but missing"):
        convert(meta_dir, tmp_path / "hf2", ConvertSettings())


def test_missing_shard_is_named(make_meta, tmp_path: Path) -> None:
    meta_dir = make_meta(n_shards=4, n_heads=4, n_kv_heads=4)
    os.remove(meta_dir / "consolidated.02.pth")
    with pytest.raises(InputError, match=r"missing shard\(s\) consolidated\.02\.pth \(found 3 of 4\)"):
        convert(meta_dir, tmp_path / "hf", ConvertSettings())


def test_params_disagreeing_with_shapes_is_an_input_error(make_meta, tmp_path: Path) -> None:
    meta_dir = make_meta(n_shards=2)
    params = json.loads((meta_dir / "params.json").read_text())
    params["n_kv_heads"] = 4  # the checkpoint has 2 kv heads: wk is (32, 64), not (64, 64)
    (meta_dir / "params.json").write_text(json.dumps(params))
    with pytest.raises(InputError, match=r"layers\.0\.attention\.wk\.weight has shape \[32, 64\].*implies \[64, 64\]"):
        convert(meta_dir, tmp_path / "hf", ConvertSettings())
    params.update(n_kv_heads=2, n_layers=1)
    (meta_dir / "params.json").write_text(json.dumps(params))
    with pytest.raises(InputError, match="unexpected weights"):
        convert(meta_dir, tmp_path / "hf", ConvertSettings())


def test_tokenizer_of_another_model_is_refused(make_meta, tmp_path: Path) -> None:
    meta_dir = make_meta(n_shards=1, vocab_size=1024)
    params = json.loads((meta_dir / "params.json").read_text())
    params["vocab_size"] = -1  # as in Meta's releases: the tokenizer decides
    (meta_dir / "params.json").write_text(json.dumps(params))
    with pytest.raises(InputError, match="tokenizer has 1000 pieces but the checkpoint's embedding has 1024 rows"):
        convert(meta_dir, tmp_path / "hf", ConvertSettings())


def test_hf_input_is_validated_and_passed_through(tiny_hf_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    summary = convert(tiny_hf_model_dir, out, ConvertSettings())
    assert summary["passed_through"]
    assert (out / "model.safetensors").stat().st_size == (tiny_hf_model_dir / "model.safetensors").stat().st_size
    assert (out / "generation_config.json").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_hf_model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"config.json: intermediate_size.*mlp.gate_proj.weight"):
        convert(broken, tmp_path / "hf2", ConvertSettings())


def test_parse_size() -> None:
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    with pytest.raises(InputError):
        parse_size("2 gigs")
