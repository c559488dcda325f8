"""Property test: random ShareGPT-shaped records through merge -> clean -> filter-lang -> split
(-> gather).

For every generated input, every stage exits 0 (a record-level problem is a reject, never a
crash), each stage's stats satisfy ``in == out + sum(rejected)``, each stage reads exactly what
the previous one kept, and every turn that survives clean is non-empty text without NUL bytes.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability import harness as h

ROLES = st.sampled_from(["human", "gpt", "user", "assistant", "system", "GPT", "bard", "robot", "", None, 3])
SNIPPETS = st.sampled_from([
    "How do I sort a list in Python?", "Use sorted(xs); it returns a new list.", "<p>Hello <b>world</b></p>",
    "<script>alert(1)</script>", "&lt;tag&gt; &amp; &nbsp;", "\x00", "   ", "\n\n", "```python\nprint(1)\n```",
    "你好，请问今天天气怎么样？", "안녕하세요, 반갑습니다.", "Bonjour, comment allez-vous aujourd'hui ?",
    "<div><div><span>nested</span></div>", "Too many requests in 1 hour. Try again later.", "OpenAI", "\ud83d\ude00",
    "line\u2028separator", "next\u0085line", "carriage\rreturn", "tab\there", "\ufeffbom inside",
])
TEXT = st.one_of(
    st.lists(SNIPPETS, min_size=0, max_size=4).map(" ".join),
    st.text(min_size=0, max_size=60),
)
TURN = st.one_of(
    st.fixed_dictionaries({"from": ROLES, "value": TEXT}),
    st.fixed_dictionaries({"from": ROLES, "value": st.one_of(st.none(), st.integers())}),
    st.fixed_dictionaries({"value": TEXT}),
)
SENTENCE = st.lists(SNIPPETS, min_size=1, max_size=4).map(" ".join)


@st.composite
def conversation(draw: st.DrawFn) -> dict[str, Any]:
    """A record that mostly passes merge: alternating human/gpt turns with random snippets."""
    n = draw(st.integers(min_value=1, max_value=3))
    turns = []
    for _ in range(n):
        turns.append({"from": draw(st.sampled_from(["human", "user"])), "value": draw(SENTENCE)})
        turns.append({"from": draw(st.sampled_from(["gpt", "assistant"])), "value": draw(SENTENCE)})
    return {"id": draw(st.text(min_size=1, max_size=8)), "conversations": turns}


RECORD = st.one_of(
    conversation(),
    conversation(),
    st.fixed_dictionaries(
        {"id": st.one_of(st.text(min_size=1, max_size=12), st.just("../x"), st.integers(), st.booleans(),
                         st.floats(), st.none(), st.lists(st.integers(), max_size=2))},
        optional={"conversations": st.lists(TURN, min_size=0, max_size=6), "system": TEXT},
    ),
    st.fixed_dictionaries({"conversations": st.lists(TURN, min_size=1, max_size=4)}),
    st.none(),
    st.text(max_size=5),
)


def _run(argv: list[str]) -> tuple[int, str]:
    from llama_pipe.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue()


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(records=st.lists(RECORD, min_size=1, max_size=12), as_jsonl=st.booleans(),
       garbage=st.lists(st.tuples(st.integers(min_value=0, max_value=12), st.text(min_size=1, max_size=20)), max_size=2))
def test_random_records_keep_the_invariants(
    records: list[Any], as_jsonl: bool, garbage: list[tuple[int, str]], tokenizer_dir: Path
) -> None:
    """``garbage``: lines of random text put between the JSON lines (JSONL input only)."""
    h.require_stage(*h.PIPELINE)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        n_garbage = 0
        if as_jsonl:
            lines = [json.dumps(r) for r in records]
            for pos, text in garbage:
                text = text.replace("\n", " ").replace("\r", " ")
                if text.strip():
                    lines.insert(min(pos, len(lines)), text)
                    n_garbage += 1
            inp = root / "in.jsonl"
            inp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        else:
            inp = root / "in.json"
            inp.write_text(json.dumps(records), encoding="utf-8")
        current, prev_stats, prev_out = inp, None, None
        for stage in h.PIPELINE:
            argv, outs, stats_files = h.stage_argv(stage, [current], root / stage, tokenizer_dir)
            (root / stage).mkdir()
            rc, err = _run(argv)
            assert rc == 0, f"{stage} exited {rc} on {records!r}: {err[-1500:]}"
            stats = h.check_stats(stats_files[0])
            out = h.read_jsonl(outs[0])
            for n, rec in enumerate(out):
                h.check_record(rec, f"{stage}#{n}", strict=stage != "merge")
            if stage == "merge":
                assert stats["in"] == len(records) + n_garbage, stats
            elif stage == "split":  # split counts pairs
                assert stats["in"] == sum(len(r["conversations"]) // 2 for r in prev_out), stats
            else:
                assert stats["in"] == prev_stats["out"] == len(prev_out), (prev_stats, stats)
            assert not h.stray_temp_files(root), h.stray_temp_files(root)
            current, prev_stats, prev_out = outs[0], stats, out
        # gather: the kept chunks go to train or val, none lost
        argv, outs, stats_files = h.stage_argv("gather", [current], root / "gather", tokenizer_dir)
        (root / "gather").mkdir()
        rc, err = _run(argv)
        assert rc == 0, f"gather exited {rc}: {err[-1500:]}"
        stats = h.check_stats(stats_files[0])
        assert stats["in"] == len(prev_out) and stats["train"] + stats["val"] == stats["lines_out"], stats
        assert len(h.read_jsonl(outs[0])) + len(h.read_jsonl(outs[1])) == stats["lines_out"], stats
