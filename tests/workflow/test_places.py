"""The workflow run from another working directory, and sweeps that keep every run.

Shipped defaults (sample data, questions, tokenizer corpus) are read from the workflow's own
checkout, user paths from the working directory; every run's products live in results/<run>/,
and the report of a run compares it with the earlier ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from workflow_helpers import copy_workflow, fake_bin, job_counts, snakemake


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("places") / "repo")


def test_snakefile_from_elsewhere_reads_shipped_defaults_from_the_workflow(checkout: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    snakefile = str(checkout / "Snakefile")
    out = snakemake(elsewhere, "-n", "-p", "-s", snakefile).stdout
    assert job_counts(out)["train"] == 1
    assert f"-- {checkout / 'data/sample/identity_sample.json'}" in out  # merge's input, from the checkout
    # the same with --directory, from yet another place
    out = snakemake(tmp_path, "-n", "-s", snakefile, "--directory", str(elsewhere)).stdout
    assert job_counts(out)["merge"] == 1


def test_user_paths_are_read_against_the_working_directory(checkout: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.json").write_text((checkout / "data/sample/sharegpt_sample.json").read_text())
    (elsewhere / "config.yaml").write_text(yaml.safe_dump({"data": {"inputs": ["mine.json"]}}))
    out = snakemake(elsewhere, "-n", "-p", "-s", str(checkout / "Snakefile")).stdout
    assert "-- mine.json >" in out


def test_a_working_directory_with_the_old_config_path_is_still_read(checkout: Path, tmp_path: Path) -> None:
    """config/config.yaml (where the file was before it moved to the top) is read when there is no
    config.yaml, with a note saying where it goes now."""
    elsewhere = tmp_path / "old-layout"
    (elsewhere / "config").mkdir(parents=True)
    (elsewhere / "mine.json").write_text((checkout / "data/sample/sharegpt_sample.json").read_text())
    (elsewhere / "config/config.yaml").write_text(yaml.safe_dump({"data": {"inputs": ["mine.json"]}}))
    proc = snakemake(elsewhere, "-n", "-p", "-s", str(checkout / "Snakefile"))
    assert "-- mine.json >" in proc.stdout
    assert "config.yaml in the working directory now" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_second_run_keeps_the_first_and_its_report_compares_them(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "repo")
    bin_dir = fake_bin(tmp_path / "bin")
    snakemake(workdir, "--profile", "profiles/default", "--cores", "2", bin_dir=bin_dir)
    first = {p.relative_to(workdir): p.read_bytes() for p in (workdir / "results/default").rglob("*") if p.is_file()}
    assert {"train", "merged", "eval", "report"} <= {p.parts[2] for p in first}

    calls = tmp_path / "calls.jsonl"
    sweep = ["--config", 'train={"run": "r16", "lora": {"r": 16}}']
    # only the run's own stages: the base and the data are shared
    plan = job_counts(snakemake(workdir, "-n", "--profile", "profiles/default", *sweep).stdout)
    assert plan == {"train": 1, "select": 1, "merge_adapter": 1, "eval": 1, "report": 1, "all": 1}
    snakemake(workdir, "--profile", "profiles/default", "--cores", "2", *sweep, bin_dir=bin_dir,
              env={"FAKE_LLAMA_PIPE_CALLS": str(calls)})
    for path, data in first.items():  # the first run is untouched
        assert (workdir / path).read_bytes() == data, path
    assert (workdir / "results/r16/merged").is_dir() and (workdir / "results/r16/report").is_dir()
    report = [c["argv"] for c in map(json.loads, calls.read_text().splitlines()) if c["argv"][0] == "report"]
    # the runs to compare with are found by the stage when it runs (report --compare-under results)
    assert len(report) == 1 and "--compare-under=results" in report[0]
    assert "--name=r16" in report[0]
    # every job got its threads: train declares 2, the single-threaded stages 1
    env = {c["argv"][0]: c["env"] for c in map(json.loads, calls.read_text().splitlines())}
    assert env["train"]["OMP_NUM_THREADS"] == "2" and env["report"]["OMP_NUM_THREADS"] == "1"
