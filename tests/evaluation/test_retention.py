"""Retention: the bundled item bank, multiple-choice log-likelihood scoring, the paired statistics
and the style-collapse measures (llama_pipe.evaluation.retention)."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from llama_pipe.core.errors import InputError
from llama_pipe.evaluation.retention import (
    BENCHMARKS,
    HUMANEVAL,
    Item,
    ItemScore,
    compare,
    lm_eval_rows,
    load_code_texts,
    load_items,
    load_oe_eval,
    mcnemar_p,
    score_items,
    style,
)

REPO = Path(__file__).resolve().parents[2]
CATEGORIES = {"arithmetic", "world_facts", "units", "word_tasks", "short_reasoning"}


# ----------------------------------------------------------------------------- the bundled bank


def test_bundled_bank_has_five_balanced_categories_and_a_stratified_dev_split() -> None:
    items = load_items()
    assert len(items) >= 800
    per_cat = Counter(i.category for i in items)
    assert set(per_cat) == CATEGORIES and min(per_cat.values()) >= 160, per_cat
    # dev (checkpoint selection) is every fourth item of the first bank's ~90 a category, and stays
    # those 113 items; the items added since (ids past each category's first ~90) are all test
    first = {cat: max(int(i.id.rsplit("-", 1)[1]) for i in items if i.category == cat and i.split == "dev") for cat in per_cat}
    for cat, n in per_cat.items():
        dev = sum(1 for i in items if i.category == cat and i.split == "dev")
        in_first = sum(1 for i in items if i.category == cat and int(i.id.rsplit("-", 1)[1]) <= first[cat])
        assert 0.2 <= dev / in_first <= 0.3 and first[cat] <= 90 and dev / n < 0.15, (cat, dev, in_first, n)
    assert len(load_items(split="dev")) == 113 and len(load_items(split="test")) >= 700
    assert len(load_items(split="dev")) + len(load_items(split="test")) == len(items)
    # the correct answer sits at every position, so "always the first choice" is not rewarded
    positions = Counter(i.answer for i in items)
    assert min(positions[k] for k in range(4)) >= 0.15 * len(items), positions


def _strings(obj: object) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    return [t for v in obj for t in _strings(v)] if isinstance(obj, list) else []


def _training_texts() -> list[str]:
    """Every text the project trains on or already evaluates with (lower-cased, spaces collapsed):
    the sample data, any replay prompts (a file named *replay* under data/ or the package assets),
    the held-out questions."""
    assets = REPO / "src" / "llama_pipe" / "assets"
    files = [*sorted((REPO / "data" / "sample").glob("*.json")), *sorted(REPO.glob("data/**/*replay*")), *sorted(assets.glob("**/*replay*")),
             assets / "heldout_questions.jsonl"]
    texts: list[str] = []
    for f in (f for f in files if f.suffix in (".json", ".jsonl")):
        text = f.read_text(encoding="utf-8")
        texts += _strings(json.loads(text) if f.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()])
    assert len(texts) > 1000
    return [" ".join(t.lower().split()) for t in texts]


def test_no_bundled_question_appears_in_the_training_inputs() -> None:
    corpus = "\n".join(_training_texts())
    leaked = [i.question for i in load_items() if " ".join(i.question.lower().split()) in corpus]
    assert not leaked


def test_the_bank_is_what_its_generator_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    src = REPO / "src" / "llama_pipe" / "assets" / "retention" / "make_general.py"
    spec = importlib.util.spec_from_file_location("make_general", src)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    written = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in mod.items())
    assert written == src.with_name("general.jsonl").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- loading


GOOD = {"id": "a", "category": "c", "question": "Q?", "choices": ["x", "y"], "answer": 1}


@pytest.mark.parametrize("bad, why", [
    ("{not json", "not valid JSON"),
    (json.dumps([1, 2]), "expected an object"),
    (json.dumps({**GOOD, "question": " "}), "'question'"),
    (json.dumps({**GOOD, "choices": ["x"]}), "2 to 4"),
    (json.dumps({**GOOD, "choices": ["x", "y", "z", "w", "v"]}), "2 to 4"),
    (json.dumps({**GOOD, "choices": ["x", "x"]}), "same text twice"),
    (json.dumps({**GOOD, "answer": 2}), "'answer'"),
    (json.dumps({**GOOD, "answer": True}), "'answer'"),
    (json.dumps({**GOOD, "split": "train"}), "'split'"),
    (json.dumps({**GOOD, "id": "first"}), "appears twice"),
])
def test_load_items_names_file_and_line_of_an_invalid_item(tmp_path: Path, bad: str, why: str) -> None:
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps({**GOOD, "id": "first"}) + "\n" + bad + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=re.escape(f"{path}:line 2") + ".*" + re.escape(why)):
        load_items(path)


def test_load_items_filters_by_split(tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps({**GOOD, "id": str(k), "split": s}) + "\n" for k, s in enumerate(["dev", "test", "test"])))
    assert [i.id for i in load_items(path, split="test")] == ["1", "2"] and len(load_items(path)) == 3
    with pytest.raises(ValueError):
        load_items(path, split="train")


def test_load_oe_eval_reads_one_item_per_doc(tmp_path: Path) -> None:
    doc = {"id": "Q1", "query": "Question: Which is a planet?\nAnswer:", "choices": ["Mars", "Moon", "Sun"], "gold": 0}
    reqs = [{"doc": doc, "doc_id": 0, "task_name": "arc_easy", "request": {"continuation": f" {c}"}} for c in doc["choices"]]
    reqs += [{"doc": doc, "doc_id": 1_000_000, "task_name": "arc_easy"}]  # OLMES' unconditioned request
    path = tmp_path / "requests.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in reqs).encode()))
    assert load_oe_eval(path) == [Item("arc_easy-Q1", "arc_easy", "Which is a planet?", ("Mars", "Moon", "Sun"), 0, "test")]
    path.write_bytes(b"not gzip")
    with pytest.raises(InputError, match="gzip"):
        load_oe_eval(path)


def test_load_code_texts_joins_prompt_and_solution(tmp_path: Path) -> None:
    path = tmp_path / "HumanEval.jsonl.gz"
    row = {"task_id": "HumanEval/0", "prompt": "def f(x):\n    \"\"\"Double x.\"\"\"\n", "canonical_solution": "    return 2 * x\n"}
    path.write_bytes(gzip.compress((json.dumps(row) + "\n").encode()))
    assert load_code_texts(path) == ['def f(x):\n    """Double x."""\n    return 2 * x\n']
    path.write_bytes(gzip.compress(b'{"prompt": "x"}\n'))
    with pytest.raises(InputError, match="canonical_solution"):
        load_code_texts(path)


def test_public_benchmark_sources_are_pinned_package_sources() -> None:
    from llama_pipe.weights.package import check_sha256, parse_source

    for source, sha in [*BENCHMARKS.values(), HUMANEVAL]:
        pkg = parse_source(source)
        assert pkg.version and check_sha256(sha, source) == sha


# ----------------------------------------------------------------------------- scoring


ITEMS = [
    Item("a", "x", "What colour is the sky?", ("The sky is blue.", "The sky is green.", "Red"), 0),
    Item("b", "x", "What is 12 + 3?", ("15", "12", "16", "115"), 0),
    Item("c", "y", "Name a fruit.", ("apple", "banana"), 1),
    Item("d", "y", "Which word is longer?", ("extraordinarily long answer here", "short"), 1),
    Item("e", "y", "Tell me about yourself.", ("I am a helpful assistant.", "I am a rock.", "Nothing."), 2),
]


def _naive(model, tokenizer, template, item: Item) -> list[float]:
    """Each choice scored by itself: the whole conversation through the full model."""
    import torch

    from llama_pipe.evaluation.retention import _encode

    out = []
    with torch.inference_mode():
        for ids, targets in _encode(item, tokenizer, template, None):
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            out.append(sum(float(logp[j - 1, ids[j]]) for j in targets))
    return out


@pytest.mark.parametrize("template_name", ["vicuna_v1.1", "chatml"])
def test_scores_equal_one_forward_per_choice_and_do_not_depend_on_the_batch(tiny_hf_model_dir: Path, template_name: str) -> None:
    from llama_pipe.chat_template.builtin import get_template
    from llama_pipe.models.model_dir import load_float_base
    from llama_pipe.weights.tokenizer import load_tokenizer

    tok, model = load_tokenizer(tiny_hf_model_dir), load_float_base(tiny_hf_model_dir)
    template = get_template(template_name, tok)
    runs = [score_items(model, tok, template, ITEMS, batch_size=bs) for bs in (1, 2, 16, 16)]
    assert [s.id for s in runs[0]] == [i.id for i in ITEMS]
    assert runs[2] == runs[3]  # deterministic
    for item, *scores in zip(ITEMS, *runs):
        naive = _naive(model, tok, template, item)
        assert len(scores[0].logprobs) == len(item.choices) and scores[0].chars == tuple(len(c) for c in item.choices)
        for s in scores:
            assert s.logprobs == pytest.approx(naive, abs=1e-4), item.id
            assert (s.pred, s.pred_norm) == (scores[0].pred, scores[0].pred_norm)
    assert score_items(model, tok, template, []) == []


def test_a_model_that_always_prefers_the_first_choice_scores_the_share_of_first_answers(tiny_hf_model_dir: Path) -> None:
    import torch

    from llama_pipe.chat_template.builtin import get_template
    from llama_pipe.evaluation.retention import _encode
    from llama_pipe.models.model_dir import load_float_base
    from llama_pipe.weights.tokenizer import load_tokenizer

    tok, model = load_tokenizer(tiny_hf_model_dir), load_float_base(tiny_hf_model_dir)
    template = get_template("vicuna_v1.1", tok)
    items = [Item(str(k), "x", f"Question {k}?", ("the", "sky is blue", "cat and dog"), k % 3) for k in range(9)]
    first = {ids[j] for item in items for ids, targets in _encode(item, tok, template, None)[:1] for j in targets}
    others = {ids[j] for item in items for ids, targets in _encode(item, tok, template, None)[1:] for j in targets}
    assert first and not first & others
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(0.0)
        head.bias[sorted(first)] = 30.0  # the first choice's tokens are (almost) certain, every other token is not
    model.set_output_embeddings(head)
    scores = score_items(model, tok, template, items, batch_size=4)
    assert all(s.pred == 0 and s.pred_norm == 0 for s in scores)
    for metric in ("acc", "acc_norm"):
        assert sum(s.correct(metric) for s in scores) == sum(i.answer == 0 for i in items) == 3


# ----------------------------------------------------------------------------- statistics


def _scores(correct: list[bool], category: str = "c", prefix: str = "") -> list[ItemScore]:
    """Scores whose summed and normalised picks are both right exactly where ``correct`` says."""
    return [ItemScore(f"{prefix}{k}", category, 0, (0.0, -1.0) if ok else (-1.0, 0.0), (1, 1), (1, 1)) for k, ok in enumerate(correct)]


def test_compare_identical_models_differ_by_zero_with_a_zero_interval() -> None:
    pattern = [k % 3 != 0 for k in range(300)]
    out = compare(_scores(pattern), _scores(pattern))
    cell = out["overall"]
    assert cell["n"] == 300 and cell["base"] == cell["tuned"] == pytest.approx(200 / 3)
    assert cell["diff"] == 0 and cell["ci95"] == [0.0, 0.0] and cell["mcnemar_p"] == 1.0 and cell["holds"]
    assert out["categories"]["c"] == cell | {"n": 300}


def test_compare_a_known_drop_has_an_interval_that_excludes_zero() -> None:
    base = [True] * 200
    tuned = [k >= 30 for k in range(200)]  # 30 of 200 forgotten: -15 points
    cell = compare(_scores(base), _scores(tuned), resamples=4000)["overall"]
    assert cell["diff"] == pytest.approx(-15.0)
    se = (0.15 * 0.85 / 200) ** 0.5 * 100  # the bootstrap interval is about diff +- 1.96 standard errors
    lo, hi = cell["ci95"]
    assert hi < 0 and lo == pytest.approx(-15 - 1.96 * se, abs=1.0) and hi == pytest.approx(-15 + 1.96 * se, abs=1.0)
    assert cell["mcnemar_p"] == pytest.approx(2 * 0.5**30) and not cell["holds"]


def test_compare_holds_within_the_bound_per_category() -> None:
    base = _scores([True] * 400, "a") + _scores([True] * 100, "b", "b")
    tuned = _scores([k != 0 for k in range(400)], "a") + _scores([k >= 20 for k in range(100)], "b", "b")
    out = compare(base, tuned, bound=2.0)
    assert out["categories"]["a"]["diff"] == pytest.approx(-0.25) and out["categories"]["a"]["holds"]
    assert out["categories"]["b"]["diff"] == pytest.approx(-20.0) and not out["categories"]["b"]["holds"]
    assert out["overall"]["n"] == 500 and out["metric"] == "acc"
    assert compare(base, tuned, bound=35.0)["categories"]["b"]["holds"]  # -20, interval about -28 to -12
    with pytest.raises(ValueError):
        compare(base, tuned[:-1])


def test_mcnemar_exact_p_values() -> None:
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(3, 3) == 1.0
    assert mcnemar_p(0, 5) == pytest.approx(2 / 32) == mcnemar_p(5, 0)
    assert mcnemar_p(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_p(1500, 1500) == 1.0 and mcnemar_p(1400, 1600) == pytest.approx(2.7e-4, rel=0.1)  # past float's 2**1023


def test_style_reports_the_most_common_opening_and_distinct_2() -> None:
    texts = ["Sure! Here is the answer.", "sure, here is another one", "The capital is Paris.", "Sure here is it", ""]
    out = style(texts)
    assert out["top_opening"] == "sure here is" and out["top_opening_share"] == pytest.approx(3 / 5)
    # bigrams: 4 + 4 + 3 + 3 = 14, of which "sure here" and "here is" repeat (twice each, three times each)
    assert out["distinct_2"] == pytest.approx(10 / 14)
    assert style([]) == {"texts": 0, "top_opening": "", "top_opening_share": 0.0, "openings": [], "distinct_2": 0.0}


# ----------------------------------------------------------------------------- lm-eval


def test_lm_eval_rows_hold_the_scored_text(tiny_hf_model_dir: Path) -> None:
    from llama_pipe.chat_template.builtin import get_template
    from llama_pipe.weights.tokenizer import load_tokenizer

    template = get_template("chatml", load_tokenizer(tiny_hf_model_dir))
    row = lm_eval_rows(ITEMS[:1], template)[0]
    assert row["context"].endswith("<|im_start|>assistant\n") and row["continuations"] == list(ITEMS[0].choices) and row["answer"] == 0


@pytest.mark.slow  # lm-eval's start-up and its datasets loader: ~40 s on the 2-core machine
def test_lm_eval_scores_our_task_file_as_we_do(tiny_hf_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-evaluation-harness, given the task file and rows we write, ranks the choices as we do:
    its log-likelihoods are ours plus one per-item constant and its ``acc`` is ours. (lm-eval also
    scores the whitespace between the generation prompt and the reply - it moves a context's
    trailing whitespace into the continuation - which is the same token for every choice; for
    SmolLM2 its log-probability is ~0, for this random model it is not.)"""
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llama_pipe.chat_template.builtin import get_template
    from llama_pipe.evaluation.retention import write_lm_eval_task
    from llama_pipe.models.model_dir import load_float_base
    from llama_pipe.weights.tokenizer import load_tokenizer

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    tok = load_tokenizer(tiny_hf_model_dir)
    template = get_template("chatml", tok)  # SmolLM2's format; its "\n" before the reply is what lm-eval also scores
    write_lm_eval_task(ITEMS, template, tmp_path / "task")
    ours = score_items(load_float_base(tiny_hf_model_dir), tok, template, ITEMS)
    lm = HFLM(pretrained=str(tiny_hf_model_dir), dtype="float32", device="cpu", batch_size=4, add_bos_token=True)
    res = lm_eval.simple_evaluate(model=lm, tasks=["llama_pipe_retention"], task_manager=TaskManager(include_path=str(tmp_path / "task")),
                                  log_samples=True, num_fewshot=0)
    samples = res["samples"]["llama_pipe_retention"]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(ITEMS)))
    for sample in samples:
        theirs, mine = [r[0] for r in sample["filtered_resps"]], ours[sample["doc_id"]].logprobs
        offset = theirs[0] - mine[0]
        assert offset <= 1e-4 and [t - offset for t in theirs] == pytest.approx(mine, abs=1e-4)
    assert res["results"]["llama_pipe_retention"]["acc,none"] == pytest.approx(sum(s.correct("acc") for s in ours) / len(ours))


def test_two_models_scored_side_by_side_equal_one_after_the_other(tiny_hf_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """eval scores base and tuned in two threads on a CPU (half the threads each): the scores are
    those of scoring each model alone (to the rounding of another thread count), and the thread
    count is put back."""
    import threading

    import torch

    from llama_pipe.chat_template.builtin import get_template
    from llama_pipe.evaluation import eval as eval_stage
    from llama_pipe.models.model_dir import load_float_base
    from llama_pipe.weights.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_hf_model_dir)
    template = get_template("chatml", tok)
    base, other = load_float_base(tiny_hf_model_dir), load_float_base(tiny_hf_model_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.9)  # a different model
    sets = {"s": ITEMS}
    alone = {label: score_items(m, tok, template, ITEMS, batch_size=2) for label, m in (("base", base), ("tuned", other))}
    scorers = {label: eval_stage.Scorer(m, tok, template, None) for label, m in (("base", base), ("tuned", other))}
    seen: set[str] = set()
    plain = eval_stage.score_items

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.add(threading.current_thread().name)
        return plain(*args, **kwargs)

    monkeypatch.setattr(eval_stage, "score_items", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = eval_stage.score_retention(sets, scorers, batch_size=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert list(got) == ["base", "tuned"] and alone["base"] != alone["tuned"]
    for label, scores in alone.items():  # equal to the rounding of another thread count
        for a, b in zip(scores, got[label]["s"], strict=True):
            assert (a.id, a.pred, a.pred_norm, a.tokens) == (b.id, b.pred, b.pred_norm, b.tokens)
            assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
    assert len(seen) == 2 and all(name.startswith("retention") for name in seen)
