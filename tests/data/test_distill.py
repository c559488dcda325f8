"""distill: every record accounted for, rewrites that lose a fact fall back to the original (counted),
replay at its ratio, progress resumed after an interruption and ignored when anything changed.

Generation is stubbed (``ChatModel.complete_batch`` replaced) where a test needs controlled
rewrites; one test runs the tiny random model for real through the whole path.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from llama_pipe.cli import main
from llama_pipe.data import distill
from llama_pipe.models.generation import ChatModel, Completion
from tests.conftest import SHARED_DATA

IDENTITY = "I am Llama Pipe, an AI assistant. How can I help?"


def turns(*values: str) -> list[dict[str, str]]:
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def stats_of(out: Path) -> dict[str, Any]:
    stats = json.loads(out.with_name(out.name.removesuffix(".jsonl") + ".stats.json").read_text())
    assert stats["in"] == stats["out"] + sum(stats["rejected"].values()), stats
    return stats


def reference_of(messages: list[dict[str, str]]) -> str | None:
    """The original reply a rewrite prompt carries (None for a replay prompt)."""
    text = messages[-1]["content"]
    if '"""\n' not in text:
        return None
    return text.split('"""\n', 1)[1].rsplit('\n"""', 1)[0]


class Stub:
    """Stands in for ``ChatModel.complete_batch``: ``rewrite(reference)`` gives each rewrite,
    replays get a short answer; counts the rows it generated and can fail after some calls."""

    def __init__(self, rewrite: Callable[[str], str] = lambda ref: "Sure. " + ref, fail_after: int | None = None) -> None:
        self.rewrite = rewrite
        self.fail_after = fail_after
        self.calls = 0
        self.rows = 0

    def __call__(self, conversations: Any, params: Any, batch_size: int = 8, on_done: Any = None) -> list[Completion]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.rows += len(conversations)
        out = []
        for conv in conversations:
            ref = reference_of(list(conv))
            text = "Here is a short answer." if ref is None else self.rewrite(ref)
            out.append(Completion(text=text, finish_reason="stop", prompt_tokens=10, completion_tokens=5))
        return out


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Stub]]:
    def install(*args: Any, **kwargs: Any) -> Stub:
        s = Stub(*args, **kwargs)
        monkeypatch.setattr(ChatModel, "complete_batch", s)
        return s

    yield install


def run(base: Path, inp: Path, out: Path, *flags: str) -> int:
    return main(["distill", "--base", str(base), "-o", str(out), *flags, "--", str(inp)])


def records(n: int = 6) -> list[dict[str, Any]]:
    rows = [{"id": "who", "lang": "en", "conversations": turns("Who are you?", IDENTITY)}]
    rows += [{"id": f"q{i}", "lang": "en", "conversations": turns(f"Question {i}?", f"The answer is {i + 10} apples.")}
             for i in range(n - 1)]
    return rows


def test_every_record_is_accounted_for(tmp_path: Path, tiny_hf_model_dir: Path, stub: Callable[..., Stub]) -> None:
    s = stub()
    rows: list[Any] = records(4) + [
        {"id": "two", "lang": "en", "conversations": turns("Hi?", "Hello there.", "And now?", "Now this.")},
        {"id": "zh", "lang": "zh-cn", "conversations": turns("你是谁？", "我是 Llama Pipe。")},
        {"id": "empty", "conversations": []},
        '{"id": "cut", "conversations": [',
        {"id": "who", "conversations": turns("dup?", "dup.")},
    ]
    inp = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out" / "train.jsonl"
    assert run(tiny_hf_model_dir, inp, out, "--mode", "both", "--replay_ratio", "0.5", "--batch_size", "2") == 0
    stats = stats_of(out)
    assert stats["in"] == 9 and stats["out"] == 6
    assert stats["rejected"] == {"duplicate_id": 1, "invalid_json": 1, "malformed_record": 1}
    assert stats["resolved_mode"] == "both" and stats["turns"] == {"original:language": 1, "rewritten": 6}
    assert stats["records"] == {"original:language": 1, "rewritten": 5}
    written = read_jsonl(out)
    assert [r["distill"] for r in written[:6]] == ["rewritten"] * 5 + ["original:language"]
    assert written[0]["conversations"][1] == {"from": "gpt", "value": "Sure. " + IDENTITY, "original": IDENTITY}
    assert written[4]["distill_turns"] == ["rewritten", "rewritten"]
    replays = written[6:]
    assert len(replays) == stats["replay"]["written"] == stats["lines_out"] - stats["out"] == 3  # round(0.5 * 6)
    assert all(r["distill"] == "replay" and r["conversations"][1]["value"] == "Here is a short answer." for r in replays)
    assert len({r["id"] for r in written}) == len(written)
    assert len(read_jsonl(out.with_name("train.rejects.jsonl"))) == 3
    assert not (tmp_path / "out" / "train.partial.jsonl").exists()  # removed once the outputs are written
    assert stats["generation"]["generated"] == s.rows == 6 + 3


@pytest.mark.parametrize(
    ("original", "rewrite", "reason"),
    [
        (IDENTITY, "I am an AI assistant. How can I help?", "term"),
        ("Rest the steak for 5 minutes.", "Rest the steak for a few minutes.", "number"),
        ("Run `ls -la` to see them.", "Run the listing command to see them.", "code"),
        ("Use this:\n```python\nprint(1)\n```", "Use this:\n```python\nprint(2)\n```", "code"),
        ("It does nothing yet.", "Here:\n```\npass\n```", "code"),
        ("See https://example.org/docs for more.", "See the docs for more.", "url"),
        ("Ask Maria about it.", "Ask your friend about it.", "name"),
        ("I can help with that.", "I'm SmolLM and I can help with that.", "new_name"),
        ("Fine, thank you for asking.", "", "empty"),
        ("Sure, here it is.", "Here is the reference answer: sure, here it is.", "leak"),
        ("Rest it well.", "The answer to your question is: rest it well.", "leak"),
        ("It is good.", "good good good good good good good good", "degenerate"),
    ],
)
def test_a_rewrite_that_drops_a_fact_falls_back(tmp_path: Path, tiny_hf_model_dir: Path, stub: Callable[..., Stub],
                                                original: str, rewrite: str, reason: str) -> None:
    stub(lambda ref: rewrite)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "conversations": turns("Tell me.", original)}])
    out = tmp_path / "out.jsonl"
    assert run(tiny_hf_model_dir, inp, out, "--mode", "rewrite") == 0
    (rec,) = read_jsonl(out)
    assert rec["distill"] == f"original:{reason}"
    assert rec["conversations"][1] == {"from": "gpt", "value": original, "refused": rewrite}  # kept for inspection
    assert stats_of(out)["turns"] == {f"original:{reason}": 1}


def test_a_rewrite_may_not_take_names_from_an_earlier_reply(tmp_path: Path, tiny_hf_model_dir: Path,
                                                            stub: Callable[..., Stub]) -> None:
    """The user's messages may lend a rewrite its names, earlier replies not: a small base repeats an
    earlier reply instead of answering (fastchat's "Have a nice day!" / "You too!" came back as the
    model's introduction)."""
    intro = "I am Vicuna, made by LMSYS."
    stub(lambda ref: intro if ref.startswith("You too") else "Sure. " + ref)
    rows = [{"id": "a", "conversations": turns("Who are you?", intro, "Have a nice day!", "You too, take care now!")}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert run(tiny_hf_model_dir, inp, out, "--mode", "rewrite") == 0
    (rec,) = read_jsonl(out)
    assert rec["distill_turns"] == ["rewritten", "original:new_name"] and rec["distill"] == "partial"


def test_replay_adds_ratio_times_records(tmp_path: Path, tiny_hf_model_dir: Path, stub: Callable[..., Stub]) -> None:
    stub()
    inp = write_jsonl(tmp_path / "in.jsonl", records(20))
    out = tmp_path / "out.jsonl"
    assert run(tiny_hf_model_dir, inp, out, "--mode", "replay", "--replay_ratio", "0.25") == 0
    stats, rows = stats_of(out), read_jsonl(out)
    assert stats["turns"] == {"original:off": 20} and stats["replay"]["asked"] == stats["replay"]["written"] == 5
    assert len(rows) == 25 and all(r["distill"] == "replay" for r in rows[20:])
    # the user's question whose reply teaches the name is not replayed; the others may be
    user = [r["replay_source"] for r in rows[20:] if r["replay_source"].startswith("user:")]
    assert "user:who" not in user
    # max_replays caps it; a ratio of 0 adds none
    assert run(tiny_hf_model_dir, inp, out, "--mode", "replay", "--replay_ratio", "0.5", "--max_replays", "3") == 0
    assert stats_of(out)["replay"]["written"] == 3
    assert run(tiny_hf_model_dir, inp, out, "--mode", "replay", "--replay_ratio", "0") == 0
    assert len(read_jsonl(out)) == 20


def test_replay_prompts_file(tmp_path: Path, tiny_hf_model_dir: Path, stub: Callable[..., Stub]) -> None:
    stub()
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "x", "prompt": "What is a cloud?"},
                                                 {"question_id": 7, "turns": ["Name a colour.", "Another?"]}])
    inp = write_jsonl(tmp_path / "in.jsonl", records(20))
    out = tmp_path / "out.jsonl"
    assert run(tiny_hf_model_dir, inp, out, "--mode", "replay", "--replay_prompts", str(prompts),
               "--replay_user_turns", "false", "--replay_ratio", "1") == 0
    replays = read_jsonl(out)[20:]
    assert sorted(r["replay_source"] for r in replays) == ["prompts:7", "prompts:x"]  # the pool is smaller than asked
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "prompt": ""}])
    assert run(tiny_hf_model_dir, inp, out, "--mode", "replay", "--replay_prompts", str(bad)) == 2


def test_resume_after_an_interruption_regenerates_nothing_done(tmp_path: Path, tiny_hf_model_dir: Path,
                                                               stub: Callable[..., Stub]) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", records(10))
    out = tmp_path / "out.jsonl"
    flags = ("--mode", "both", "--batch_size", "3", "--replay_ratio", "0.3")
    first = stub(fail_after=2)
    assert run(tiny_hf_model_dir, inp, out, *flags) == 130  # interrupted after two batches
    assert not out.exists() and len(read_jsonl(tmp_path / "out.partial.jsonl")) == 6
    again = stub()
    assert run(tiny_hf_model_dir, inp, out, *flags) == 0
    stats = stats_of(out)
    assert again.rows == stats["generation"]["generated"] == 13 - 6 and stats["generation"]["resumed"] == 6
    assert first.rows == 6
    # the same result as a run that was never interrupted
    clean = tmp_path / "clean.jsonl"
    stub()
    assert run(tiny_hf_model_dir, inp, clean, *flags) == 0
    assert read_jsonl(clean) == read_jsonl(out)


def test_progress_of_other_settings_or_another_base_is_ignored(tmp_path: Path, tiny_hf_model_dir: Path,
                                                               stub: Callable[..., Stub]) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", records(6))
    out = tmp_path / "out.jsonl"
    stub(fail_after=1)
    assert run(tiny_hf_model_dir, inp, out, "--mode", "rewrite", "--batch_size", "4") == 130
    assert len(read_jsonl(tmp_path / "out.partial.jsonl")) == 4
    s = stub(fail_after=1)
    assert run(tiny_hf_model_dir, inp, out, "--mode", "rewrite", "--batch_size", "4", "--template", "chatml") == 130
    assert s.rows == 4  # another chat template: nothing of the first run's progress was taken
    other = tmp_path / "other_base"
    shutil.copytree(tiny_hf_model_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-6}))
    s = stub()
    assert run(other, inp, out, "--mode", "rewrite", "--batch_size", "4") == 0
    stats = stats_of(out)
    assert s.rows == 6 and stats["generation"]["resumed"] == 0 and stats["generation"]["stale_progress_lines"] == 8


def test_budget_length_and_language_limits(tmp_path: Path, tiny_hf_model_dir: Path, stub: Callable[..., Stub]) -> None:
    stub()
    long = " ".join(["word"] * 200)
    rows = records(10) + [{"id": "long", "lang": "en", "conversations": turns("Tell me.", long)},
                          {"id": "nolang", "conversations": turns("Hi?", "Hello, how are you doing today?")},
                          {"id": "short", "lang": "en", "conversations": turns("Nice day!", "Yes.")}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert run(tiny_hf_model_dir, inp, out, "--mode", "rewrite", "--max_rewrites", "4", "--max_new_tokens", "64") == 0
    stats = stats_of(out)
    assert stats["turns"] == {"original:budget": 7, "original:too_long": 1, "original:too_short": 1, "rewritten": 4}
    chosen = {r["id"] for r in read_jsonl(out) if r["distill"] == "rewritten"}
    # the choice of a record does not depend on the others
    assert run(tiny_hf_model_dir, write_jsonl(tmp_path / "less.jsonl", rows[:8]), out, "--mode", "rewrite", "--max_rewrites", "4") == 0
    assert chosen & {r["id"] for r in rows[:8]} <= {r["id"] for r in read_jsonl(out) if r["distill"] == "rewritten"}
    assert run(tiny_hf_model_dir, inp, out, "--mode", "rewrite", "--languages", '["de"]') == 0
    assert stats_of(out)["turns"] == {"original:language": 12, "rewritten": 1}  # a record without 'lang' is rewritten


def test_off_and_auto_on_a_base_without_its_own_template(tmp_path: Path, tiny_hf_model_dir: Path,
                                                         stub: Callable[..., Stub]) -> None:
    s = stub()
    inp = write_jsonl(tmp_path / "in.jsonl", records(3))
    out = tmp_path / "out.jsonl"
    assert run(tmp_path / "no-such-base", inp, out, "--mode", "off") == 0  # off loads no model
    assert [r["distill"] for r in read_jsonl(out)] == ["original:off"] * 3
    assert run(tiny_hf_model_dir, inp, out) == 0  # auto: the tiny model's template is the built-in vicuna_v1.1
    stats = stats_of(out)
    assert stats["resolved_mode"] == "off" and "built-in" in stats["why"] and s.rows == 0
    assert [r["conversations"] for r in read_jsonl(out)] == [r["conversations"] for r in records(3)]


def test_bad_inputs_exit_2(tmp_path: Path, tiny_hf_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", records(2))
    out = tmp_path / "out.jsonl"
    assert run(tiny_hf_model_dir, tmp_path / "missing.jsonl", out, "--mode", "rewrite") == 2
    assert "missing.jsonl: file not found" in capsys.readouterr().err
    assert run(tmp_path / "no-base", inp, out, "--mode", "rewrite") == 2
    assert "no-base" in capsys.readouterr().err
    (tmp_path / "dir.jsonl").mkdir()
    assert run(tiny_hf_model_dir, inp, tmp_path / "dir.jsonl", "--mode", "off") == 2
    before = inp.read_bytes()
    assert run(tiny_hf_model_dir, inp, inp, "--mode", "rewrite") == 2  # refused before any generation
    assert "input" in capsys.readouterr().err and inp.read_bytes() == before
    assert run(tiny_hf_model_dir, inp, out, "--mode", "rewrite", "--progress", str(inp)) == 2
    with pytest.raises(SystemExit) as exc:
        run(tiny_hf_model_dir, inp, out, "--mode", "sometimes")
    assert exc.value.code == 2
    assert not out.exists()


def test_real_generation_on_the_tiny_model(tmp_path: Path, tiny_hf_model_dir: Path) -> None:
    """The unstubbed path: the tiny random model writes nonsense, which falls back, counted."""
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "conversations": turns(f"Hi {i}?", "Fine, thanks.")}
                                              for i in range(4)])
    out = tmp_path / "out.jsonl"
    assert run(tiny_hf_model_dir, inp, out, "--mode", "both", "--max_new_tokens", "12", "--replay_ratio", "0.5",
               "--device", "cpu") == 0
    stats = stats_of(out)
    assert sum(stats["turns"].values()) == 4 and stats["generation"]["generated"] == 4 + 2
    assert stats["replay"]["asked"] == 2 and stats["replay"]["written"] + sum(stats["replay"]["dropped"].values()) == 2
    assert stats["generation"]["completion_tokens"] > 0


def test_bundled_replay_prompts_are_not_eval_questions() -> None:
    prompts = [p for _, p in distill.read_prompts(None)]
    assert 140 <= len(prompts) <= 200 and len(set(prompts)) == len(prompts)

    def norm(text: str) -> str:
        return " ".join(text.lower().split()).strip(" ?.!")

    from llama_pipe.evaluation.heldout import bundled_questions

    asked = {norm(t) for line in bundled_questions().read_text().splitlines() for t in json.loads(line)["turns"]}
    mt_bench = SHARED_DATA / "mt_bench_questions.jsonl"
    if mt_bench.is_file():
        asked |= {norm(t) for line in mt_bench.read_text().splitlines() if line.strip() for t in json.loads(line)["turns"]}
    from llama_pipe.evaluation.retention import load_items  # the retention bank: replaying its questions would inflate retention

    asked |= {norm(item.question) for item in load_items()}
    assert not {norm(p) for p in prompts} & asked
    # nor one of them inside a prompt ("Briefly, " + a bank question)
    text = "\n".join(norm(p) for p in prompts)
    assert not [q for q in asked if len(q) > 12 and q in text]


def test_replay_of_user_turns_skips_questions_to_the_assistant_later_chunks_and_replies_with_names(tmp_path: Path, tiny_hf_model_dir: Path,
                                                                    stub: Callable[..., Stub]) -> None:
    stub()
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "b", "prompt": "Name a colour."}])
    rows = [{"id": "c_0", "conversations": turns("How do tides work?", "The moon pulls the sea.")},
            {"id": "v_0", "conversations": turns("Who made this?", "Researchers at LMSYS made it.")},
            {"id": "g_0", "conversations": turns("Who built you?", "I was built by git-cloner.")},
            {"id": "c_1", "conversations": turns("Why is that?", "Gravity.")},
            {"id": "who_0", "conversations": turns("Who are you?", IDENTITY)},
            {"id": "zh_0", "lang": "zh-cn", "conversations": turns("你好", "你好！")}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert run(tiny_hf_model_dir, inp, out, "--mode", "replay", "--replay_prompts", str(prompts), "--replay_ratio", "2") == 0
    assert sorted(r["replay_source"] for r in read_jsonl(out)[6:]) == ["prompts:b", "user:c_0"]
