"""Chained runs: train.base_run makes a run train on, merge into and evaluate against another
run's merged model (results/<base_run>/merged), which that run's own snakemake call built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from workflow_helpers import copy_workflow, fake_bin, job_counts, snakemake

RUN_ONLY = {"train": 1, "select": 1, "merge_adapter": 1, "eval": 1, "report": 1, "all": 1}
# a chained run also distills the training data into its own base's words (results/<run>/distill)
CHAINED_ONLY = {"distill": 1, **RUN_ONLY}
CHAINED = ["--config", 'train={"run": "cn", "base_run": "default"}']


def calls_of(path: Path) -> dict[str, list[str]]:
    return {c["argv"][0]: c["argv"] for c in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A workflow copy where run 'default' is complete (fake stages)."""
    root = tmp_path_factory.mktemp("chain")
    workdir = copy_workflow(root / "repo")
    bin_dir = fake_bin(root / "bin")
    snakemake(workdir, "--profile", "profiles/default", "--cores", "2", bin_dir=bin_dir)
    return workdir, bin_dir


@pytest.mark.slow
def test_a_chained_run_trains_and_merges_on_the_earlier_runs_merged_model(first_run: tuple[Path, Path], tmp_path: Path) -> None:
    workdir, bin_dir = first_run
    plan = snakemake(workdir, "-n", "--profile", "profiles/default", *CHAINED).stdout
    assert job_counts(plan) == CHAINED_ONLY  # the base, the data and run 'default' are there already
    calls = tmp_path / "calls.jsonl"
    snakemake(workdir, "--profile", "profiles/default", "--cores", "2", *CHAINED, bin_dir=bin_dir,
              env={"FAKE_LLAMA_PIPE_CALLS": str(calls)})
    argv = calls_of(calls)
    for stage in ("distill", "train", "merge-adapter", "eval"):
        assert "--base=results/default/merged" in argv[stage], (stage, argv[stage])
    assert any(a.startswith("--train-data=results/data/distill/") for a in argv["train"])
    # its own distilled data (other words than the base's), beside run 'default''s
    assert len(list((workdir / "results/data/distill").iterdir())) == 2
    assert "--adapter=results/cn/select" in argv["merge-adapter"] and "-o" in argv["merge-adapter"]
    assert argv["train"][argv["train"].index("--base_run") + 1] == "default"
    assert (workdir / "results/cn/merged").is_dir()
    assert job_counts(snakemake(workdir, "-n", "--profile", "profiles/default", *CHAINED).stdout) == {}
    # the same run on the base instead: its own stages again
    unchained = snakemake(workdir, "-n", "--profile", "profiles/default", "--config", 'train={"run": "cn"}').stdout
    assert job_counts(unchained) == RUN_ONLY

    # Run 'default' done again with other settings: its merged model changes, so the next call of
    # the chained run retrains it on the new one (the input is newer than its outputs).
    snakemake(workdir, "--profile", "profiles/default", "--cores", "2", "--config", 'train={"lora": {"r": 4}}', bin_dir=bin_dir)
    replan = snakemake(workdir, "-n", "--profile", "profiles/default", *CHAINED).stdout
    assert job_counts(replan) == CHAINED_ONLY
    assert "results/default/merged" in replan


def test_a_missing_base_run_says_to_build_it_first(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "repo")
    proc = snakemake(workdir, "-n", "--profile", "profiles/default", "--config", 'train={"run": "cn", "base_run": "mine"}',
                     check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "train.base_run 'mine': results/mine/merged not found; build that run first" in out
    # the data and the base alone do not need it
    data = snakemake(workdir, "-n", "--profile", "profiles/default", "--config", 'train={"run": "cn", "base_run": "mine"}',
                     "--", "data").stdout
    assert "train" not in job_counts(data)


@pytest.mark.parametrize(("train", "expected"), [
    ('{"base_run": "default"}', "train.base_run: 'default' is this run"),
    ('{"run": "cn", "base_run": "data"}', "train.base_run 'data' must name an earlier run"),
    ('{"run": "cn", "base_run": "../x"}', "train.base_run"),
])
def test_base_run_must_be_another_run(fresh_workflow: Path, train: str, expected: str) -> None:
    proc = snakemake(fresh_workflow, "-n", "--profile", "profiles/default", "--config", f"train={train}", check=False)
    assert proc.returncode != 0 and expected in proc.stdout + proc.stderr


def test_combine_needs_one_weight_per_adapter(fresh_workflow: Path) -> None:
    proc = snakemake(fresh_workflow, "-n", "--profile", "profiles/default", "--config", 'merge_adapter={"combine": "cat"}',
                     check=False)
    assert proc.returncode != 0
    assert "merge_adapter.weights: combine cat needs one weight per adapter (1), got 0" in proc.stdout + proc.stderr
