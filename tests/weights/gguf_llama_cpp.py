"""An exported GGUF in llama.cpp (llama-cpp-python) against the HF directory it came from in transformers.

Shared by ``tests/weights/test_gguf_export_smollm2.py`` and ``tests/acceptance/check_export.py``:

* :func:`greedy_answers`: each question rendered through the model's chat template
  (``apply_chat_template(..., tokenize=False)``, the text llama.cpp's chat mode renders from the
  GGUF's copy of the template), tokenised by both sides (the ids must be equal), then answered
  greedily by both; transformers runs with its matrices rounded to float16 (what an f16 GGUF
  holds) and, for the record, in float32;
* :func:`compare_files`: llama.cpp's perplexity of two files (q8_0 against f16) on the same token
  rows (every token after a row's first scored), with the mean KL divergence of their next-token
  distributions and how often they pick the same top token.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

N_CTX = 2048


def import_llama_cpp() -> tuple[Any, str]:
    """(the llama_cpp module, "") or (None, why it cannot be imported)."""
    try:
        import llama_cpp
    except Exception as exc:  # ImportError, or a broken shared library (OSError)
        return None, f"llama_cpp cannot be imported ({type(exc).__name__}: {exc}); .ci/run builds llama-cpp-python 0.3.36 from source"
    return llama_cpp, ""


def load_cpp(path: Path, logits_all: bool = False, n_ctx: int = N_CTX) -> Any:
    llama_cpp, why = import_llama_cpp()
    if llama_cpp is None:
        raise RuntimeError(why)
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, n_batch=512, logits_all=logits_all, verbose=False, seed=0)


def questions(path: Path | None = None, limit: int = 0, all_turns: bool = False) -> list[str]:
    """First turns (or all turns) of held-out questions (the bundled set for None)."""
    from llama_pipe.evaluation.eval import read_questions

    return [t for q in read_questions(path, limit) for t in (q["turns"] if all_turns else q["turns"][:1])]


def stop_ids(model_dir: Path, tok: Any) -> set[int]:
    """End-of-turn ids: generation_config.json's eos_token_id (what eval and chat stop on), and the tokenizer's EOS."""
    try:
        eos = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError):
        eos = None
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids | ({tok.eos_token_id} if tok.eos_token_id is not None else set())


def hf_model(model_dir: Path, f16_weights: bool) -> Any:
    """transformers' model in float32; with ``f16_weights`` its matrices rounded to float16 first
    (llama.cpp computes in f32 from the f16 weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if f16_weights:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.copy_(p.half().float())
    return model


def hf_greedy(model: Any, ids: list[int], n: int, stops: set[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens and, per step, the gap between the best and the second-best logit."""
    import torch

    out, gaps = [], []
    with torch.inference_mode():
        res = model(input_ids=torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            logits = res.logits[0, -1].float()
            top = torch.topk(logits, 2)
            nxt = int(top.indices[0])
            out.append(nxt)
            gaps.append(float(top.values[0] - top.values[1]))
            if nxt in stops:
                break
            res = model(input_ids=torch.tensor([[nxt]]), past_key_values=res.past_key_values, use_cache=True)
    return out, gaps


def cpp_greedy(llm: Any, ids: list[int], n: int, stops: set[int]) -> list[int]:
    got: list[int] = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        got.append(int(t))
        if t in stops or len(got) == n:
            break
    return got


@dataclass
class Answer:
    question: str
    prompt_ids_equal: bool
    cpp: str
    hf_f16: str
    equal_f16: bool
    hf_f32: str | None = None  # with also_f32
    equal_f32: bool | None = None
    parted_at: int | None = None  # first differing token (vs f16-rounded transformers)
    gap_there: float | None = None  # transformers' top-1 minus top-2 logit at that token


@dataclass
class Answers:
    rows: list[Answer] = field(default_factory=list)

    @property
    def equal_f16(self) -> int:
        return sum(a.equal_f16 for a in self.rows)

    @property
    def equal_f32(self) -> int:
        return sum(bool(a.equal_f32) for a in self.rows)

    @property
    def prompts_equal(self) -> int:
        return sum(a.prompt_ids_equal for a in self.rows)


def render(tok: Any, question: str) -> str:
    return str(tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False))


def greedy_answers(model_dir: Path, gguf: Path, qs: list[str], n: int, also_f32: bool = False) -> Answers:
    """llama.cpp's greedy answers from ``gguf`` against transformers' from ``model_dir`` (f16-rounded
    weights; with ``also_f32`` in float32 too)."""
    from llama_pipe.weights.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    stops = stop_ids(model_dir, tok)
    llm = load_cpp(gguf)
    adds_bos = tok.bos_token_id is not None and tok("a").input_ids[:1] == [tok.bos_token_id]
    f16, f32 = hf_model(model_dir, True), hf_model(model_dir, False) if also_f32 else None
    out = Answers()
    for q in qs:
        text = render(tok, q)
        ids = list(tok(text, add_special_tokens=True).input_ids)
        cpp_ids = llm.tokenize(text.encode(), add_bos=adds_bos, special=True)
        got = cpp_greedy(llm, cpp_ids, n, stops)
        ref, gaps = hf_greedy(f16, ids, n, stops)
        parted = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
        if parted is None and len(got) != len(ref):
            parted = min(len(got), len(ref))
        row = Answer(q, cpp_ids == ids, tok.decode(got, skip_special_tokens=True), tok.decode(ref, skip_special_tokens=True), got == ref,
                     parted_at=parted, gap_there=gaps[parted] if parted is not None and parted < len(gaps) else None)
        if f32 is not None:
            plain, _ = hf_greedy(f32, ids, n, stops)
            row.hf_f32, row.equal_f32 = tok.decode(plain, skip_special_tokens=True), got == plain
        out.rows.append(row)
    return out


def token_rows(tok: Any, texts: list[str], max_tokens: int = 384, budget: int = 0) -> list[list[int]]:
    """Token ids of each text (the tokenizer's BOS if it adds one), cut at ``max_tokens``; rows
    of fewer than 2 tokens are left out; with ``budget``, texts are taken in order until the rows
    hold that many tokens."""
    rows: list[list[int]] = []
    for t in texts:
        if budget and sum(len(r) for r in rows) >= budget:
            break
        row = list(tok(t, add_special_tokens=True).input_ids)[:max_tokens]
        if len(row) >= 2:
            rows.append(row)
    return rows


#: tokens of held-out text a perplexity is taken on: the per-token log-probability of q8_0 minus
#: f16 has a standard deviation of about 0.1-0.13 nats on SmolLM2-135M, so over 2,500 tokens
#: the ratio of the two perplexities is known to about +-0.5 % (95 %), well inside the 1 % asked.
PPL_TOKENS = 2500


def chat_texts(tok: Any, records: list[dict[str, Any]]) -> list[str]:
    """Conversations (llama-pipe records) rendered through the model's chat template."""
    from llama_pipe.chat_template.builtin import to_messages

    return [str(tok.apply_chat_template(to_messages(r), tokenize=False)) for r in records]


def sample_conversations(path: Path) -> list[dict[str, Any]]:
    """The conversations of a sample file as the clean stage leaves them (HTML -> Markdown; dropped ones left out)."""
    from llama_pipe.config import CleanSettings
    from llama_pipe.data.clean import clean_record

    records = json.loads(path.read_text(encoding="utf-8"))
    kept = [clean_record(r, CleanSettings()).record for r in records if isinstance(r, dict)]
    return [r for r in kept if r is not None]


def _log_probs(logits: Any) -> Any:
    """Log-softmax over the vocabulary, row by row (float32 after a float64 normaliser)."""
    import numpy as np

    z = np.asarray(logits, dtype=np.float32)
    m = z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return z - m - lse


def _ctx_for(rows: list[list[int]]) -> int:
    """A context just large enough (llama-cpp-python keeps n_ctx x vocab floats of logits)."""
    return max(64, -(-max(len(r) for r in rows) // 64) * 64)


def cpp_logits(llm: Any, row: list[int]) -> Any:
    """llama.cpp's logits after each token of ``row`` (len(row) x vocab)."""
    import numpy as np

    llm.reset()
    llm.eval(row)
    return np.array(llm.scores[: len(row)], dtype=np.float32)


@dataclass
class Quantised:
    """Two GGUF files of one model (``a``, the reference, and ``b``) on the same token rows."""

    ppl_a: float
    ppl_b: float
    tokens: int
    kld: float  # mean KL(a || b) of the next-token distributions, nats
    same_top: float  # share of positions where both pick the same next token

    @property
    def ratio(self) -> float:
        return self.ppl_b / self.ppl_a


def compare_files(a: Path, b: Path, rows: list[list[int]]) -> Quantised:
    """llama.cpp's perplexity of ``a`` and ``b`` on ``rows`` (every token after a row's first
    scored), their mean KL divergence and top-token agreement: one pass over each file."""
    import numpy as np

    la, lb = load_cpp(a, logits_all=True, n_ctx=_ctx_for(rows)), load_cpp(b, logits_all=True, n_ctx=_ctx_for(rows))
    nll_a = nll_b = kld = 0.0
    same = n = 0
    for row in rows:
        pa, pb = _log_probs(cpp_logits(la, row)[:-1]), _log_probs(cpp_logits(lb, row)[:-1])
        pos, nxt = np.arange(len(row) - 1), np.asarray(row[1:])
        nll_a -= float(pa[pos, nxt].sum())
        nll_b -= float(pb[pos, nxt].sum())
        kld += float((np.exp(pa) * (pa - pb)).sum(dtype=np.float64))
        same += int((pa.argmax(-1) == pb.argmax(-1)).sum())
        n += len(row) - 1
    return Quantised(math.exp(nll_a / n), math.exp(nll_b / n), n, kld / n, same / n)
