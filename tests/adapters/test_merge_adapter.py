"""merge-adapter: merged weights reproduce base + adapters through peft; output layout; bad inputs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from llama_pipe.cli import main

TEXT = "USER: What is the capital of France? ASSISTANT: Paris is the capital.</s>"


def make_adapter(
    base_dir: Path, out: Path, seed: int, targets: list[str], quantized: bool = False, extra_tokens: int = 0, r: int = 4, **lora: object
) -> Path:
    """A peft LoRA adapter with random non-zero lora_B (so merging changes the logits), saved like our trainer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from llama_pipe.weights.tokenizer import load_tokenizer

    kwargs: dict = {"dtype": torch.float32}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        kwargs["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)
    tok = load_tokenizer(base_dir)
    save_modules = None
    if extra_tokens:
        tok.add_tokens([f"<extra_{i}>" for i in range(extra_tokens)])
        model.resize_token_embeddings(len(tok))
        save_modules = ["embed_tokens", "lm_head"]
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets, modules_to_save=save_modules, **lora)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
            if extra_tokens and "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def logits(model, tok, text: str = TEXT) -> torch.Tensor:
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapters(tiny_hf_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(tiny_hf_model_dir, root / "a", 1, ["q_proj", "v_proj"]),
        "b": make_adapter(tiny_hf_model_dir, root / "b", 2, ["o_proj", "gate_proj", "down_proj", "k_proj"]),
    }


def test_one_adapter_matches_peft(tiny_hf_model_dir: Path, adapters: dict[str, Path], tmp_path: Path, tokenizer) -> None:
    from peft import PeftModel

    out = tmp_path / "merged"
    assert main(["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(adapters["a"]),
                 "-o", str(out), "--max-shard-size", "200KB"]) == 0
    base_logits = logits(load(tiny_hf_model_dir), tokenizer)
    ref = PeftModel.from_pretrained(load(tiny_hf_model_dir), str(adapters["a"])).eval()
    ref_logits = logits(ref, tokenizer)
    merged_logits = logits(load(out), tokenizer)
    assert (ref_logits - base_logits).abs().max() > 1e-2, "the adapter must change the model for this test to mean anything"
    assert (merged_logits - ref_logits).abs().max() < 1e-4
    # Layout: several safetensors shards + index, tokenizer, chat template, generation config, sidecar.
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert not list(out.glob("*.bin")) and not list(tmp_path.glob("merged.tmp-*"))
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer.json").is_file()
    side = json.loads((out / "llama_pipe.json").read_text())
    assert side["template"] == "vicuna_v1.1" and side["adapters"][0]["path"] == str(adapters["a"])
    gen = json.loads((out / "generation_config.json").read_text())
    assert tokenizer.eos_token_id in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])
    from llama_pipe.chat_template.builtin import get_template
    from llama_pipe.weights.tokenizer import load_tokenizer

    written = load_tokenizer(out)
    assert written.chat_template == get_template("vicuna_v1.1").jinja_for(written)


def test_two_chained_adapters_match_peft(tiny_hf_model_dir: Path, adapters: dict[str, Path], tmp_path: Path, tokenizer, caplog) -> None:
    from peft import PeftModel

    out = tmp_path / "merged2"
    assert main(["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(adapters["a"]),
                 "--adapter", str(adapters["b"]), "-o", str(out)]) == 0
    # Neither adapter records what it was trained on (made by peft, not by llama-pipe train): merged,
    # but not silently - the second one is flagged as right only if trained on the first's merge.
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "no record of the model" in r.getMessage()]
    assert len(warned) == 2 and "it is merged on top of" in warned[1] and f"+ {adapters['a']} [" in warned[1]
    # Reference: both adapters active at once on the unmerged base (x W0 + x dA + x dB).
    ref = PeftModel.from_pretrained(load(tiny_hf_model_dir), str(adapters["a"]), adapter_name="a")
    ref.load_adapter(str(adapters["b"]), adapter_name="b")
    ref.base_model.set_adapter(["a", "b"])
    ref.eval()
    only_a = PeftModel.from_pretrained(load(tiny_hf_model_dir), str(adapters["a"])).eval()
    ref_logits = logits(ref, tokenizer)
    assert (ref_logits - logits(only_a, tokenizer)).abs().max() > 1e-2, "adapter b must matter"
    assert (logits(load(out), tokenizer) - ref_logits).abs().max() < 1e-4


def test_qlora_adapter_merges_into_float_base(tiny_hf_model_dir: Path, tmp_path: Path, tokenizer) -> None:
    """An adapter trained over a 4-bit base merges into the float weights (not into re-quantised ones)."""
    from peft import PeftModel

    adapter = make_adapter(tiny_hf_model_dir, tmp_path / "qlora", 3, ["q_proj", "v_proj", "up_proj"], quantized=True)
    out = tmp_path / "merged"
    assert main(["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(adapter), "-o", str(out)]) == 0
    ref = PeftModel.from_pretrained(load(tiny_hf_model_dir), str(adapter)).eval()
    assert (logits(load(out), tokenizer) - logits(ref, tokenizer)).abs().max() < 1e-4


def test_dora_and_rslora_adapters_merge_exactly(tiny_hf_model_dir: Path, tmp_path: Path, tokenizer) -> None:
    from peft import PeftModel

    adapter = make_adapter(tiny_hf_model_dir, tmp_path / "dora", 6, ["q_proj", "v_proj", "down_proj"], use_dora=True, use_rslora=True)
    out = tmp_path / "merged"
    assert main(["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(adapter), "-o", str(out)]) == 0
    ref = PeftModel.from_pretrained(load(tiny_hf_model_dir), str(adapter)).eval()
    ref_logits = logits(ref, tokenizer)
    assert (ref_logits - logits(load(tiny_hf_model_dir), tokenizer)).abs().max() > 1e-2
    assert (logits(load(out), tokenizer) - ref_logits).abs().max() < 1e-4


def test_larger_tokenizer_resizes_and_is_copied(tiny_hf_model_dir: Path, tmp_path: Path, tokenizer) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llama_pipe.weights.tokenizer import load_tokenizer

    adapter = make_adapter(tiny_hf_model_dir, tmp_path / "grown", 4, ["q_proj"], extra_tokens=3)
    out = tmp_path / "merged"
    assert main(["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(adapter), "-o", str(out)]) == 0
    merged = load(out)
    assert merged.get_input_embeddings().weight.shape[0] == len(tokenizer) + 3
    mtok = load_tokenizer(out)
    assert len(mtok) == len(tokenizer) + 3 and mtok.convert_tokens_to_ids("<extra_2>") == len(tokenizer) + 2
    base = AutoModelForCausalLM.from_pretrained(str(tiny_hf_model_dir), dtype=torch.float32)
    base.resize_token_embeddings(len(mtok))
    ref = PeftModel.from_pretrained(base, str(adapter)).eval()
    text = TEXT + " <extra_1>"
    assert (logits(merged, mtok, text) - logits(ref, mtok, text)).abs().max() < 1e-4


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> HF q/k row order, as transformers' convert_llama_weights_to_hf does it."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def test_meta_format_round_trips(tiny_hf_model_dir: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "merged"
    assert main(["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(adapters["a"]),
                 "-o", str(out), "--format", "meta"]) == 0
    params = json.loads((out / "params.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    sd = torch.load(out / "consolidated.00.pth", weights_only=True)
    hf = load_file(str(next(out.glob("model*.safetensors"))))
    assert (params["dim"], params["n_layers"], params["n_heads"], params["n_kv_heads"]) == (64, 2, 4, 2)
    hidden = int(2 * 4 * params["dim"] / 3)
    if params["ffn_dim_multiplier"] is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    hidden = params["multiple_of"] * math.ceil(hidden / params["multiple_of"])
    assert hidden == cfg["intermediate_size"]
    for i in range(2):
        assert torch.equal(hf_permute(sd[f"layers.{i}.attention.wq.weight"], 4), hf[f"model.layers.{i}.self_attn.q_proj.weight"])
        assert torch.equal(hf_permute(sd[f"layers.{i}.attention.wk.weight"], 2), hf[f"model.layers.{i}.self_attn.k_proj.weight"])
        assert torch.equal(sd[f"layers.{i}.feed_forward.w1.weight"], hf[f"model.layers.{i}.mlp.gate_proj.weight"])
    # The merged q projection (not the base's) is what was exported.
    base_q = load_file(str(next(tiny_hf_model_dir.glob("model*.safetensors"))))["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.allclose(hf["model.layers.0.self_attn.q_proj.weight"], base_q)
    assert set(sd) >= {"tok_embeddings.weight", "norm.weight", "output.weight"}


def test_output_is_replaced_atomically(tiny_hf_model_dir: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    argv = ["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(adapters["a"]), "-o", str(out)]
    # A directory holding files merge-adapter did not write is never replaced (they would be lost).
    assert main(argv) == 2 and (out / "stale.txt").read_text() == "old"
    (out / "stale.txt").unlink()
    assert main(argv) == 0  # an empty one is
    (out / "config.json").write_text("{}")
    assert main(argv) == 0  # and so is merge-adapter's own earlier output, whole
    assert json.loads((out / "config.json").read_text()) != {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_bad_adapters_are_clear_errors(tiny_hf_model_dir: Path, adapters: dict[str, Path], tmp_path: Path, capsys) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(adapters["a"], pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    out = tmp_path / "out"
    assert main(["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(pickled), "-o", str(out)]) == 2
    assert "safetensors only" in capsys.readouterr().err
    assert main(["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(tmp_path / "nope"), "-o", str(out)]) == 2
    assert "adapter directory not found" in capsys.readouterr().err
    # An adapter whose module names exist nowhere in the base must not silently merge as a no-op.
    foreign = tmp_path / "foreign"
    shutil.copytree(adapters["a"], foreign)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(foreign / "adapter_model.safetensors"))
    save_file({k.replace("q_proj", "qkv_proj"): v for k, v in tensors.items()}, str(foreign / "adapter_model.safetensors"))
    cfg = json.loads((foreign / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj"]
    (foreign / "adapter_config.json").write_text(json.dumps(cfg))
    assert main(["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(foreign), "-o", str(out)]) == 2
    assert "match no module" in capsys.readouterr().err
    assert not out.exists()


def test_full_model_run_is_the_starting_point(tiny_hf_model_dir: Path, adapters: dict[str, Path], tmp_path: Path, tokenizer) -> None:
    """train.mode full leaves a whole model in the run directory: it replaces the base, later adapters apply on top."""
    from peft import PeftModel

    full = tmp_path / "full"
    assert main(["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(adapters["a"]), "-o", str(full)]) == 0
    out = tmp_path / "merged"
    assert main(["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(full), "--adapter", str(adapters["b"]), "-o", str(out)]) == 0
    ref = PeftModel.from_pretrained(load(full), str(adapters["b"])).eval()
    assert (logits(load(out), tokenizer) - logits(ref, tokenizer)).abs().max() < 1e-4
    assert json.loads((out / "llama_pipe.json").read_text())["full_model"] == str(full)
    assert main(["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(adapters["b"]), "--adapter", str(full), "-o", str(tmp_path / "x")]) == 2


# ----------------------------------------------------------------------------- weighted combination


def reference_sum(base_dir: Path, parts: list[tuple[Path, float]]):
    """The base with sum_i w_i * scale_i * B_i @ A_i added to each adapted weight, computed by hand."""
    from safetensors.torch import load_file

    model = load(base_dir)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for adapter, w in parts:
            cfg = json.loads((adapter / "adapter_config.json").read_text())
            scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
            tensors = load_file(str(adapter / "adapter_model.safetensors"))
            for key, a in tensors.items():
                if ".lora_A." not in key:
                    continue
                b = tensors[key.replace(".lora_A.", ".lora_B.")]
                target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                params[target].add_(w * scale * (b @ a))
    return model


@pytest.fixture(scope="module")
def ranked(tiny_hf_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two independent adapters of the base with different ranks, overlapping modules, one with rslora."""
    root = tmp_path_factory.mktemp("ranked")
    return {
        "r4": make_adapter(tiny_hf_model_dir, root / "r4", 11, ["q_proj", "v_proj", "up_proj"], r=4),
        "r2": make_adapter(tiny_hf_model_dir, root / "r2", 12, ["q_proj", "o_proj"], r=2, use_rslora=True),
    }


def test_cat_combination_is_the_weighted_sum_of_the_updates(tiny_hf_model_dir: Path, ranked: dict[str, Path], tmp_path: Path,
                                                             tokenizer) -> None:
    out = tmp_path / "cat"
    # the rslora adapter first: peft gives the combination its settings (rslora would scale it by sqrt(rank))
    assert main(["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(ranked["r2"]), "--adapter", str(ranked["r4"]),
                 "--combine", "cat", "--weights=-0.4,0.7", "-o", str(out)]) == 0
    ref = logits(reference_sum(tiny_hf_model_dir, [(ranked["r4"], 0.7), (ranked["r2"], -0.4)]), tokenizer)
    assert (ref - logits(load(tiny_hf_model_dir), tokenizer)).abs().max() > 1e-2
    assert (logits(load(out), tokenizer) - ref).abs().max() < 1e-4
    side = json.loads((out / "llama_pipe.json").read_text())
    assert side["combine"] == "cat" and side["weights"] == [-0.4, 0.7]
    (step,) = side["lineage"]["steps"]
    assert step["combine"] == "cat" and [a["adapter"] for a in step["adapters"]] == [str(ranked["r2"]), str(ranked["r4"])]


def test_svd_combination_truncates_the_sum(tiny_hf_model_dir: Path, ranked: dict[str, Path], tmp_path: Path, tokenizer) -> None:
    ref = logits(reference_sum(tiny_hf_model_dir, [(ranked["r4"], 0.5), (ranked["r2"], 0.5)]), tokenizer)
    base = ["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(ranked["r4"]), "--adapter", str(ranked["r2"]),
            "--combine", "svd", "--weights", "[0.5, 0.5]"]
    assert main([*base, "--svd-rank", "6", "-o", str(tmp_path / "full")]) == 0  # rank 4 + 2: nothing is cut
    assert (logits(load(tmp_path / "full"), tokenizer) - ref).abs().max() < 1e-4
    assert main([*base, "-o", str(tmp_path / "cut")]) == 0  # rank 4: an approximation
    cut = (logits(load(tmp_path / "cut"), tokenizer) - ref).abs().max()
    assert 1e-5 < cut < (ref - logits(load(tiny_hf_model_dir), tokenizer)).abs().max()


@pytest.mark.parametrize(("flags", "message"), [
    (["--combine", "cat"], "merge_adapter.weights: combine cat needs one weight per adapter (2), got 0"),
    (["--combine", "svd", "--weights", "1"], "needs one weight per adapter (2), got 1"),
    (["--weights", "1,1"], "merge_adapter.weights: weights are for combine cat or svd"),
    (["--combine", "cat", "--weights", "1,1", "--svd-rank", "4"], "merge_adapter.svd_rank: only combine svd"),
])
def test_combination_settings_are_checked(tiny_hf_model_dir: Path, ranked: dict[str, Path], tmp_path: Path, capsys,
                                          flags: list[str], message: str) -> None:
    assert main(["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(ranked["r4"]), "--adapter", str(ranked["r2"]),
                 *flags, "-o", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err


def test_dora_adapters_are_not_combined(tiny_hf_model_dir: Path, ranked: dict[str, Path], tmp_path: Path, capsys) -> None:
    dora = make_adapter(tiny_hf_model_dir, tmp_path / "dora", 13, ["q_proj"], use_dora=True)
    assert main(["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(ranked["r4"]), "--adapter", str(dora),
                 "--combine", "cat", "--weights", "1,1", "-o", str(tmp_path / "x")]) == 2
    assert "DoRA adapter" in capsys.readouterr().err


def test_a_merged_model_whose_weights_changed_is_a_base_of_its_own(tiny_hf_model_dir: Path, adapters: dict[str, Path],
                                                                    tmp_path: Path, caplog) -> None:
    from safetensors.torch import load_file, save_file

    from llama_pipe.models.lineage import model_lineage
    from llama_pipe.weights.fingerprint import weights_fingerprint

    out = tmp_path / "merged"
    assert main(["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(adapters["a"]), "-o", str(out)]) == 0
    fp, lineage = model_lineage(out)
    assert lineage.root == weights_fingerprint(tiny_hf_model_dir) and len(lineage.steps) == 1
    shard = out / "model.safetensors"
    tensors = load_file(str(shard))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.5
    save_file(tensors, str(shard), metadata={"format": "pt"})
    fp2, lineage2 = model_lineage(out)
    assert fp2 != fp and lineage2.root == fp2 and lineage2.steps == ()
    assert any("not the ones merge-adapter wrote" in r.getMessage() for r in caplog.records)
