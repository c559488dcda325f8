"""The stage registry (llama_pipe.stages) agrees with what it describes: the CLI, the config
sections, the workflow's rules and the report's funnel order."""

from __future__ import annotations

import re

from llama_pipe.cli import build_parser
from llama_pipe.config import SECTIONS
from llama_pipe.stages import BY_NAME, DATA_STAGES, STAGES, Stage
from tests.conftest import REPO


def test_names_are_unique_and_the_cli_lists_them_in_order() -> None:
    assert len(BY_NAME) == len(STAGES)
    sub = next(a for a in build_parser("")._actions if a.dest == "command")
    assert list(sub.choices) == [s.name for s in STAGES]  # type: ignore[attr-defined]


def test_every_section_is_a_config_section() -> None:
    for s in STAGES:
        assert s.section is None or s.section in SECTIONS, s
        assert s.settings is (SECTIONS[s.section] if s.section else None)


def test_every_data_stage_has_a_rule_with_a_stats_output() -> None:
    """The workflow's stats list (``stats_files`` in common.smk) reads each data rule's ``stats``."""
    rules = "\n".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "workflow" / "rules").glob("*.smk")))
    blocks = dict(re.findall(r"(?ms)^rule (\w+):\n(.*?)(?=^rule |\Z)", rules))
    for s in DATA_STAGES:
        assert s.rule in blocks, f"no workflow rule {s.rule!r} for data stage {s.name!r}"
        body = blocks[s.rule]
        assert re.search(r"^\s+stats=", body, re.M) or f'stage_outputs("{s.rule}")' in body, s.rule
        assert f"llama-pipe {s.name} " in body, f"rule {s.rule} does not call llama-pipe {s.name}"


def test_data_stages_count_a_unit_and_only_they_run_per_shard() -> None:
    assert [s.name for s in DATA_STAGES][:2] == ["merge", "shard"] and DATA_STAGES[-1].name == "gather"
    assert all(s.unit in ("records", "pairs") for s in DATA_STAGES)
    assert all(s.unit is not None for s in STAGES if s.per_shard)


def test_each_stage_reads_only_earlier_stages_and_names_a_layout() -> None:
    from llama_pipe.stages import LAYOUTS, _check

    seen: set[str] = set()
    for s in STAGES:
        assert set(s.reads) <= seen and s.layout in LAYOUTS, s
        seen.add(s.name)
    assert all(s.records_from is not None for s in DATA_STAGES[1:]) and DATA_STAGES[0].records_from is None
    late = Stage("early", "llama_pipe.x", "reads a stage listed after it", reads=("gather",))
    try:
        _check((late, *STAGES))
    except ValueError as exc:
        assert "early" in str(exc) and "gather" in str(exc)
    else:
        raise AssertionError("a stage reading one listed after it was accepted")


def test_the_data_chain_and_the_rerun_set_follow_reads() -> None:
    """What the workflow derives: each data rule's input is the stage before it, and a changed
    setting of a stage re-runs it and what reads it, nothing before it."""
    from llama_pipe.stages import downstream

    chain = [s.name for s in DATA_STAGES]
    assert [s.records_from.name for s in DATA_STAGES[1:]] == chain[:-1]  # type: ignore[union-attr]
    after = [s.name for s in downstream("filter-lang")]
    assert after[:4] == ["filter-lang", "split", "gather", "distill"] and "train" in after and "eval" in after
    assert not {"merge", "shard", "clean", "convert"} & set(after)
    assert BY_NAME["split"].tokenizer and not BY_NAME["distill"].tokenizer and not BY_NAME["clean"].tokenizer


def test_performance_knobs_are_marked_in_their_settings() -> None:
    """workers and split.batch_size are marked performance-only; that the workflow then re-runs
    nothing when they change is tests/workflow/test_rerun.py's."""
    from llama_pipe.core.settings import performance_keys

    assert performance_keys(SECTIONS["clean"]) == ("workers",) and performance_keys(SECTIONS["split"]) == ("batch_size", "workers")
    assert performance_keys(SECTIONS["merge"]) == ("workers",)
    assert performance_keys(SECTIONS["distill"]) == ()  # a param: padding in a batch can change a greedy reply
