"""Hostile and unlucky input to the data stages (issue 15): every record costs bounded time and
memory and ends as a kept record or a reject with a reason; a file the stage cannot use, or an
output it cannot write, is exit 2 with one line and nothing partial left behind.

The corpus cases of the same issue that fit the generic harness (UTF-16, FIFO, symlink loop,
NaN/Infinity, ``"system": 5``, 987-level values, list ``start``, placeholder look-alikes, zero-width
turn starts, ids reused across files) run in test_corpus.py; this module holds the ones that need
timing, monkeypatching or the real third-party files.
"""

from __future__ import annotations

import errno
import json
import os
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llama_pipe import stages
from tests.reliability import harness as h

DATA_STAGES = tuple(s.name for s in stages.DATA_STAGES)


def _conv(q: str, a: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def _small(rid: str = "small-1") -> dict[str, Any]:
    return {"id": rid, "conversations": _conv("What is the capital city of France, please?",
                                              "The capital of France is Paris, on the river Seine.")}


def _write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _best_time(fn: Callable[[], Any], reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# ----------------------------------------------------------------------------- linear cost

_TICK_RUNS = " ".join("`" * n for n in range(1, 351))  # backtick runs 1..350 (~61 KB)

# name -> text of one turn at scale k (k=1: the size from the issue; the test also runs 4x)
HOSTILE: dict[str, Callable[[int], str]] = {
    "copy_code": lambda k: "```" + "Copy code" * (400 * k),
    "p_open": lambda k: "<p " * (20000 * k),
    "script_open": lambda k: "<div>" + "<script " * (5000 * k),
    "backtick_runs": lambda k: _TICK_RUNS * k,
    "backtick_runs_html": lambda k: "<p>" + _TICK_RUNS * k,
    "pre_unclosed": lambda k: "<div>" + "<pre>x" * (5000 * k),
    "code_unclosed": lambda k: "<div><pre>" + "<code " * (5000 * k) + "</pre>",
    "comment_unclosed": lambda k: "<div>" + "<!--" * (5000 * k),
    "empty_copy_code": lambda k: "```a Copy code x " * (5000 * k),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_patterns_cost_linear_time(name: str) -> None:
    """clean's conversion and filter-lang's text extraction of each pattern: 4x the input takes
    well under 16x the time (a quadratic cost; the old regexes were quadratic to cubic), and
    seconds, not minutes, in absolute terms (loose bounds for a loaded 2-core machine)."""
    from llama_pipe.data.filter_lang import prose
    from llama_pipe.data.markdown import ConversionError, to_markdown

    def clean_it(text: str) -> None:
        try:
            to_markdown(text, max_chars=4 * len(text) + 10_000)
        except ConversionError:
            pass  # a reject is fine; the cost is what is measured

    def scaling(fn: Callable[[str], Any], one: str, four: str, slack: float) -> tuple[float, float]:
        """(t1, t4), measured again once if a load spike on a shared machine made 4x look nonlinear."""
        for _ in range(2):
            t1, t4 = _best_time(lambda: fn(one)), _best_time(lambda: fn(four))
            if t4 < 10 * t1 + slack:
                break
        return t1, t4

    one, four = HOSTILE[name](1), HOSTILE[name](4)
    t1, t4 = scaling(clean_it, one, four, 1.0)
    assert t4 < 10 * t1 + 1.0, f"clean {name}: {len(one)} chars {t1:.3f} s, 4x {t4:.3f} s: not linear"
    assert t4 < 20, f"clean {name}: {t4:.1f} s for {len(four)} characters"
    p1, p4 = scaling(lambda text: prose({"conversations": _conv("hello there", text)}, 1000), one, four, 0.3)
    assert p4 < 10 * p1 + 0.3, f"filter-lang {name}: {p1:.3f} s, 4x {p4:.3f} s"


def test_filter_lang_reads_max_chars_before_scanning_code() -> None:
    """A 4 MB turn of backtick runs costs filter-lang what its first few max_chars cost."""
    from llama_pipe.data.filter_lang import prose

    big = {"conversations": _conv("A question in plain English about code.", "Answer: " + _TICK_RUNS * 64)}
    assert _best_time(lambda: prose(big, 1000)) < 0.5
    assert prose(big, 1000).startswith("A question in plain English about code.\nAnswer:")


def test_hostile_records_through_clean_and_filter_lang(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's records as a file: both stages finish (exit 0), every record accounted for."""
    h.require_stage("clean", "filter-lang")
    recs = [_small()] + [{"id": f"hostile-{n}", "conversations": _conv("Please answer the question below.", f(1))}
                         for n, f in sorted(HOSTILE.items())]
    inp = _write_jsonl(tmp_path / "in" / "hostile.jsonl", recs)
    t = time.perf_counter()
    for stage in ("clean", "filter-lang"):
        run = h.run_stage(stage, [inp], tmp_path / stage, capsys)
        h.check_success(run, strict=True)
        stats = h.check_stats(run.stats[0])
        assert stats["in"] == len(recs), stats
    assert time.perf_counter() - t < 120


# ----------------------------------------------------------------------------- time budget


def test_time_budget_rejects_too_slow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A record slower than clean.time_budget is rejected as too_slow, in the worker pool too;
    the records around it are kept."""
    h.require_stage("clean")
    slow_html = "<div>" + "<p>some words in a paragraph</p>" * 200_000  # ~6.6 MB: seconds to convert
    recs = [_small(f"ok-{i}") for i in range(70)]
    for i, r in enumerate(recs):
        r["conversations"][0]["value"] += f" (variant {i})"
    recs.insert(35, {"id": "slow-1", "conversations": _conv("Please write a very long answer for me.", slow_html)})
    inp = _write_jsonl(tmp_path / "in" / "slow.jsonl", recs)
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}" / "clean.jsonl"
        rc, err = h.run_cli(["clean", str(inp), "-o", str(out), "--workers", workers, "--time_budget", "0.5"], capsys)
        assert rc == 0, err
        stats = h.check_stats(out.with_name("clean.stats.json"))
        assert stats["rejected"] == {"too_slow": 1}, stats
        assert stats["out"] == 70, stats
        (row,) = h.rejects_of(out)
        assert row["id"] == "slow-1" and row["reason"] == "too_slow" and "time_budget" in row["detail"], row


def test_filter_lang_time_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """filter-lang gives each record time_budget seconds too (a stalled detection is simulated)."""
    h.require_stage("filter-lang")
    from llama_pipe.data import filter_lang

    real = filter_lang.screen_text  # a record's own work (its text, counts, n-grams), under its budget

    def stall(text: str, *args: Any) -> Any:
        if "STALL" in text:
            time.sleep(30)
        return real(text, *args)

    monkeypatch.setattr(filter_lang, "screen_text", stall)
    stalled = {"id": "stall-1", "conversations": _conv("STALL this detection for a while, please.", "Certainly, I will wait.")}
    inp = _write_jsonl(tmp_path / "in" / "x.jsonl", [_small(), stalled])
    out = tmp_path / "out" / "f.jsonl"
    t = time.perf_counter()
    rc, err = h.run_cli(["filter-lang", str(inp), "-o", str(out), "--workers", "1", "--time_budget", "0.5"], capsys)
    assert rc == 0, err
    assert time.perf_counter() - t < 20
    stats = h.check_stats(out.with_name("f.stats.json"))
    assert stats["rejected"] == {"too_slow": 1} and stats["out"] == 1, stats


def test_time_budget_keeps_an_outer_timer() -> None:
    """The per-record alarm puts back a timer that was running before (e.g. a test timeout)."""
    import signal

    from llama_pipe.core.budget import within_budget

    fired: list[int] = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 5.0)
        assert within_budget(1.0, sum, [1, 2]) == 3
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 3.0 < remaining <= 5.0, remaining
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not fired


# ----------------------------------------------------------------------------- output size


def test_table_padding_is_too_large(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One 5,000-cell row and 5,000 one-cell rows (~100 KB) would pad to 25 million cells: the
    record is rejected as too_large before the table is built (memory stays small)."""
    from llama_pipe.data.markdown import ConversionError, to_markdown

    table = ("<div><table><tr>" + "<td>x</td>" * 5000 + "</tr>" + "<tr><td>y</td></tr>" * 5000 + "</table></div>")
    tracemalloc.start()
    try:
        with pytest.raises(ConversionError) as exc:
            to_markdown(table, max_chars=4 * len(table) + 10_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert exc.value.reason == "too_large"
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    h.require_stage("clean")
    inp = _write_jsonl(tmp_path / "in" / "t.jsonl", [_small(), {"id": "table-1", "conversations": _conv("Make me a table.", table)}])
    out = tmp_path / "out" / "c.jsonl"
    rc, err = h.run_cli(["clean", str(inp), "-o", str(out), "--workers", "1"], capsys)
    assert rc == 0, err
    assert h.check_stats(out.with_name("c.stats.json"))["rejected"] == {"too_large": 1}
    # an ordinary table is not affected
    ok = "<div><table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>2</td></tr></table></div>"
    assert to_markdown(ok, max_chars=4 * len(ok) + 10_000) == "| a | b |\n| --- | --- |\n| 1 | 2 |"


# ----------------------------------------------------------------------------- input files


@pytest.mark.parametrize("stage", DATA_STAGES)
def test_unreadable_input_is_refused(stage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file the user may not read: exit 2 naming it, "permission denied", nothing written.
    (Root may read any file: then the permission check is made to answer no.)"""
    h.require_stage(stage)
    inp = tmp_path / "in" / "unreadable.json"
    inp.parent.mkdir()
    inp.write_text(json.dumps([_small()]), encoding="utf-8")
    inp.chmod(0)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == inp else real(p, mode, *a, **k))
    before = h.files_under(tmp_path)
    try:
        run = h.run_stage(stage, [inp], tmp_path / "out", capsys, tokenizer_dir)
    finally:
        inp.chmod(0o644)
    h.check_clean_failure(run, ["unreadable.json", "permission denied"], before, tmp_path)
    assert len(run.err.strip().splitlines()) == 1, run.err


# ----------------------------------------------------------------------------- all-or-nothing commits


def _argv(stage: str, inp: Path, out_dir: Path, tokenizer_dir: Path) -> tuple[list[str], list[Path]]:
    argv, outs, _ = h.stage_argv(stage, [inp], out_dir, tokenizer_dir)
    return argv, outs


def _good_input(tmp_path: Path) -> Path:
    recs = [{"id": f"r{i}", "conversations": _conv(f"What is {i} plus {i}, please tell me?", f"{i} plus {i} is {2 * i}.")}
            for i in range(12)]
    return _write_jsonl(tmp_path / "in" / "good.jsonl", recs)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stage", [s for s in DATA_STAGES if s != "shard"])  # shard writes a directory
def test_output_is_a_directory(stage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path) -> None:
    """-o (for gather: --val) naming an existing directory: exit 2 with one line, no stats or
    rejects describing a missing output, no temporaries."""
    h.require_stage(stage)
    inp = _good_input(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv, outs = _argv(stage, inp, out_dir, tokenizer_dir)
    outs[-1].mkdir()
    before = h.files_under(tmp_path)
    rc, err = h.run_cli(argv, capsys)
    assert rc == 2, err
    assert "is a directory" in err and str(outs[-1]) in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert h.files_under(tmp_path) == before
    assert not h.stray_temp_files(tmp_path)


def _fail_nth(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, n: int, err: int) -> None:
    """Make the ``n``-th call of ``module.name`` (1-based) raise OSError(err)."""
    real = getattr(module, name)
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError(err, os.strerror(err))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize("stage", ["merge", "clean", "gather", "shard"])
@pytest.mark.parametrize("nth", [1, 2])
def test_disk_full_leaves_nothing(stage: str, nth: int, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while syncing an output (the first or the second file): exit 2 with one line, the
    outputs of an earlier run exactly as they were, no temporaries."""
    h.require_stage(stage)
    inp = _good_input(tmp_path)
    out_dir = tmp_path / "out"
    argv, _ = _argv(stage, inp, out_dir, tokenizer_dir)
    rc, err = h.run_cli(argv, capsys)
    assert rc == 0, err
    old = _snapshot(out_dir)
    _write_jsonl(inp, [_small(f"new-{i}") for i in range(3)])  # the rerun would change every output
    _fail_nth(monkeypatch, os, "fsync", nth, errno.ENOSPC)
    rc, err = h.run_cli(argv, capsys)
    monkeypatch.undo()
    assert rc == 2, err
    assert "No space left on device" in err and "nothing was written" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert _snapshot(out_dir) == old
    assert not h.stray_temp_files(tmp_path), h.stray_temp_files(tmp_path)


def test_abort_survives_a_failing_close(tmp_path: Path) -> None:
    """A full disk makes the buffered rest fail again on close: abort still removes the
    temporaries and does not raise, and the stage's error is one OutputError."""
    from llama_pipe.core.errors import OutputError
    from llama_pipe.core.stage_writer import StageWriter

    class FullDisk:
        closed = False

        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "x.jsonl"
    with pytest.raises(OutputError, match="No space left on device"):
        with StageWriter("test", out) as w:
            assert w._out is not None
            real = w._out.fh
            w._out.fh = FullDisk()  # type: ignore[assignment]
            real.close()
            w.count_in()
            w.keep({"id": "a"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stage", ["merge", "gather", "shard"])
@pytest.mark.parametrize("nth", [2, 3])
def test_failed_commit_keeps_the_older_outputs(stage: str, nth: int, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second or third rename of the commit fails: the files renamed before it get their old
    versions back (gather never mixes a new train with an old val), exit 2, no temporaries."""
    h.require_stage(stage)
    inp = _good_input(tmp_path)
    out_dir = tmp_path / "out"
    argv, _ = _argv(stage, inp, out_dir, tokenizer_dir)
    rc, err = h.run_cli(argv, capsys)
    assert rc == 0, err
    old = _snapshot(out_dir)
    _write_jsonl(inp, [_small(f"new-{i}") for i in range(20)])
    _fail_nth(monkeypatch, os, "replace", nth, errno.EIO)
    rc, err = h.run_cli(argv, capsys)
    monkeypatch.undo()
    assert rc == 2, err
    assert "nothing was written" in err and "Traceback" not in err, err
    assert _snapshot(out_dir) == old
    assert not h.stray_temp_files(tmp_path), h.stray_temp_files(tmp_path)


# ----------------------------------------------------------------------------- real sources


def test_merge_real_sources_keeps_distinct_conversations(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         shared_data: Path) -> None:
    """FastChat's dummy_conversation.json and git-cloner's dummy_en/dummy_cn number their records
    from identity_0: the 500 colliding ids hold different conversations and are all kept (as
    gitcloner_dummy_en:identity_N); merging a file with itself drops every copy as duplicate_id."""
    h.require_stage("merge")
    files = [shared_data / n for n in ("fastchat_dummy_conversation.json", "gitcloner_dummy_en.json", "gitcloner_dummy_cn.json")]
    total = sum(len(json.loads(f.read_text(encoding="utf-8"))) for f in files)
    out = tmp_path / "m.jsonl"
    rc, err = h.run_cli(["merge", *map(str, files), "-o", str(out)], capsys)
    assert rc == 0, err
    stats = h.check_stats(out.with_name("m.stats.json"))
    assert stats["out"] == total and stats["rejected"] == {}, stats
    ids = [r["id"] for r in h.read_jsonl(out)]
    assert len(set(ids)) == len(ids) == total
    renamed = [i for i in ids if ":" in i]
    assert len(renamed) == stats["renamed"] == 500
    assert all(i.startswith("gitcloner_dummy_en:identity_") for i in renamed), renamed[:3]
    out2 = tmp_path / "twice.jsonl"
    rc, err = h.run_cli(["merge", str(files[0]), str(files[0]), "-o", str(out2)], capsys)
    assert rc == 0, err
    stats2 = h.check_stats(out2.with_name("twice.stats.json"))
    assert stats2["out"] == 500 and stats2["rejected"] == {"duplicate_id": 500}, stats2


# ----------------------------------------------------------------------------- filter-lang --skip

LANG_TEXTS = {
    "en": ("Could you tell me how to cook rice properly at home?", "Rinse the rice, then simmer it with twice as much water until it is soft."),
    "es": (
        "¿Puedes decirme cómo cocinar arroz correctamente en casa?",
        "Lava el arroz y luego cocínalo a fuego lento con el doble de agua hasta que esté tierno.",
    ),
    "fr": (
        "Pouvez-vous me dire comment bien cuire le riz à la maison ?",
        "Rincez le riz, puis faites-le mijoter avec deux fois plus d'eau jusqu'à ce qu'il soit tendre.",
    ),
    "de": (
        "Kannst du mir sagen, wie man zu Hause richtig Reis kocht?",
        "Wasche den Reis und lass ihn dann mit der doppelten Menge Wasser köcheln, bis er weich ist.",
    ),
    "ko": ("집에서 밥을 제대로 짓는 방법을 알려주실 수 있나요?", "쌀을 씻은 다음 두 배의 물을 붓고 부드러워질 때까지 약한 불에서 끓이세요."),
    "zh": ("你能告诉我在家里怎么正确地煮米饭吗？", "先把米洗干净，然后加两倍的水，用小火慢慢煮到米饭变软为止。"),
}


def test_filter_lang_skip_alone_keeps_other_languages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--skip ko`` by hand keeps every other language; with the pipeline's settings (keep
    en, zh from config.yaml, or passed as flags the way the workflow does) only en and zh stay."""
    h.require_stage("filter-lang")
    from tests.conftest import REPO

    inp = _write_jsonl(tmp_path / "in" / "langs.jsonl",
                       [{"id": code, "conversations": _conv(*pair)} for code, pair in LANG_TEXTS.items()])

    def kept(*flags: str) -> set[str]:
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}" / "f.jsonl"
        rc, err = h.run_cli(["filter-lang", str(inp), "-o", str(out), "--workers", "1", *flags], capsys)
        assert rc == 0, err
        h.check_stats(out.with_name("f.stats.json"))
        return {r["id"] for r in h.read_jsonl(out)}

    assert kept("--skip", "ko") == {"en", "es", "fr", "de", "zh"}
    assert kept() == {"en", "zh"}  # no flags at all: the documented default keep list
    assert kept("--keep", '["en","zh"]', "--skip", "[]") == {"en", "zh"}  # the workflow passes whole sections
    config = REPO / "config.yaml"
    assert kept("--config", str(config), "--skip", "ko") == {"en", "zh"}  # config.yaml lists keep
    only_skip = tmp_path / "skip-only.yaml"
    only_skip.write_text("filter_lang:\n  skip: [ko]\n", encoding="utf-8")
    assert kept("--config", str(only_skip)) == {"en", "es", "fr", "de", "zh"}
