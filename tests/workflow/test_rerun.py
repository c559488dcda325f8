"""A finished run re-runs nothing, and a changed setting re-runs its stage and what follows only.

Each test edits one key of config.yaml in a workflow copy where the whole DAG has already run,
and reads the dry-run's job table (``snakemake -n``) to see which rules Snakemake would re-run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from workflow_helpers import edited_config, job_counts, snakemake

from llama_pipe.core.atomic import MARKER
from llama_pipe.stages import DATA_STAGES

AFTER_TRAIN = {"train", "select", "merge_adapter", "eval", "report", "all"}
AFTER_DISTILL = {"distill"} | AFTER_TRAIN
AFTER_GATHER = {"gather"} | AFTER_DISTILL


def shard_stages_from(rule: str) -> dict[str, int]:
    """``rule`` and the per-shard data stages after it, one job per shard (2 shards)."""
    chain = [s.rule for s in DATA_STAGES if s.per_shard]
    return dict.fromkeys(chain[chain.index(rule):], 2)


def planned(workdir: Path) -> dict[str, int]:
    return job_counts(snakemake(workdir, "-n", "--profile", "profiles/default").stdout)


def test_second_run_does_nothing(completed_run: Path) -> None:
    assert planned(completed_run) == {}


def test_merged_jsonl_is_temp_and_its_absence_rebuilds_nothing(completed_run: Path) -> None:
    # The product and the per-stage outputs stay; the merged copy of the inputs is gone.
    (merge,) = (completed_run / "results/data/merge").iterdir()  # results/data/<stage>/<key>
    assert not (merge / "merged.jsonl").exists()
    assert (merge / "merged.stats.json").is_file()
    assert (completed_run / "results/default/merged").is_dir()
    (shard,) = (completed_run / "results/data/shard").iterdir()
    assert sorted(p.name for p in shard.iterdir() if p.name != MARKER) == [
        "shard-000.jsonl",
        "shard-001.jsonl",
        "shard.rejects.jsonl",
        "shard.stats.json",
    ]
    assert planned(completed_run) == {}


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        pytest.param("train", "lora.r", 4, AFTER_TRAIN, id="train.lora.r"),
        pytest.param(
            "clean",
            "blocked_words",
            ["openai", "chatgpt", "as an ai"],
            shard_stages_from("clean") | dict.fromkeys(AFTER_GATHER, 1),
            id="clean.blocked_words",
        ),
        pytest.param(
            "filter_lang",
            "keep",
            ["en"],
            shard_stages_from("filter_lang") | dict.fromkeys(AFTER_GATHER, 1),
            id="filter_lang.keep",
        ),
        pytest.param("split", "max_length", 256, {"split": 2} | dict.fromkeys(AFTER_GATHER, 1), id="split.max_length"),
        pytest.param("data", "val_fraction", 0.2, AFTER_GATHER, id="data.val_fraction"),
        pytest.param("distill", "max_rewrites", 8, AFTER_DISTILL, id="distill.max_rewrites"),
        pytest.param("distill", "mode", "off", AFTER_TRAIN, id="distill.mode off (train reads gather's output)"),
        pytest.param("chat", "max_seq_len", 256, {"split": 2} | dict.fromkeys(AFTER_GATHER, 1),
                     id="chat.max_seq_len (split.max_length null follows it)"),
        pytest.param("filter_lang", "workers", 1, {}, id="filter_lang.workers (performance only)"),
        pytest.param("clean", "workers", 1, {}, id="clean.workers (performance only)"),
        pytest.param("split", "batch_size", 16, {}, id="split.batch_size (performance only)"),
        pytest.param("eval", "max_new_tokens", 16, {"eval", "report", "all"}, id="eval.max_new_tokens"),
        pytest.param(
            "chat",
            "template",
            "chatml",
            {"convert": 1, "split": 2} | dict.fromkeys(AFTER_GATHER, 1),
            id="chat.template (convert, split, train, merge-adapter and eval read it)",
        ),
    ],
)
def test_changed_setting_reruns_its_stage_and_descendants_only(
    completed_run: Path, section: str, key: str, value: object, expected: object
) -> None:
    want = dict.fromkeys(expected, 1) if isinstance(expected, set) else expected
    with edited_config(completed_run, section, key, value):
        assert planned(completed_run) == want
    # Restoring the value restores the recorded state: nothing to do again.
    assert planned(completed_run) == {}


def test_setting_of_another_stage_in_the_same_section_does_not_rerun(completed_run: Path) -> None:
    # data.seed and data.val_fraction reach gather only; base.retries reaches download only.
    with edited_config(completed_run, "base", "retries", 9):
        assert planned(completed_run) == {}
