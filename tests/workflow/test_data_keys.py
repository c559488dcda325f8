"""Runs keep each other's data: the data products live in results/data/<stage>/<key>/, keyed by what
they were made from, so a second run on other data does not rebuild (or retrain) the first one.

Before, every run shared results/data/: after a run on other ``data.inputs``, ``snakemake -n`` for
the default run planned its whole data chain and its training again (14 jobs).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from workflow_helpers import copy_workflow, fake_bin, job_counts, rerun_plan, snakemake

from llama_pipe.stages import KEYED_STAGES

PROFILE = ("--profile", "profiles/default")
#: The rules whose products live in results/data/<rule>/<key>/ (the registry's keyed stages).
KEYED = [s.rule for s in KEYED_STAGES]


def calls_of(path: Path) -> dict[str, list[str]]:
    return {c["argv"][0]: c["argv"] for c in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Run 'default' on the shipped inputs, then run 'mydata' on another input file."""
    root = tmp_path_factory.mktemp("data-keys")
    workdir = copy_workflow(root / "repo")
    bin_dir = fake_bin(root / "bin")
    shutil.copy(workdir / "data/sample/sharegpt_sample.json", workdir / "mydata.json")
    (workdir / "mydata.yaml").write_text('train: {run: mydata}\ndata: {inputs: ["mydata.json"]}\n')
    snakemake(workdir, *PROFILE, "--cores", "2", bin_dir=bin_dir)
    calls = root / "calls.jsonl"
    snakemake(workdir, *PROFILE, "--cores", "2", "--configfile", "mydata.yaml", bin_dir=bin_dir,
              env={"FAKE_LLAMA_PIPE_CALLS": str(calls)})
    return workdir, bin_dir, calls


def test_a_run_on_other_data_leaves_the_first_run_with_nothing_to_do(two_runs: tuple[Path, Path, Path]) -> None:
    workdir, _, _ = two_runs
    assert job_counts(snakemake(workdir, "-n", *PROFILE).stdout) == {}
    assert job_counts(snakemake(workdir, "-n", *PROFILE, "--configfile", "mydata.yaml").stdout) == {}


def test_each_data_setting_has_its_own_directories(two_runs: tuple[Path, Path, Path]) -> None:
    workdir, _, calls = two_runs
    data = workdir / "results/data"
    # merge made from other inputs: every stage after it has a second directory too
    for stage in KEYED:
        keys = sorted(p.name for p in (data / stage).iterdir())
        assert len(keys) == 2 and all(len(k) == 10 for k in keys), (stage, keys)
    trained = {}
    for run in ("default", "mydata"):
        train = json.loads((workdir / f"results/{run}/train/metrics.jsonl").read_text())
        trained[run] = next(a.split("=", 1)[1] for a in train if a.startswith("--train-data="))
    assert trained["default"] != trained["mydata"]
    # gather's training split through distill, keyed the same way (docs/distill.md)
    assert all(Path(p).parent.parent == Path("results/data/distill") for p in trained.values()), trained
    # the second run's data stages read its own input and wrote under their own keys
    argv = calls_of(calls)
    assert argv["merge"][argv["merge"].index("--") + 1:] == ["mydata.json"]
    assert (workdir / trained["mydata"]).is_file() and (workdir / trained["default"]).is_file()
    logs = sorted(p.relative_to(workdir).parts[:3] for p in (workdir / "logs/data").rglob("*.log"))
    assert {part[2] for part in logs} == set(KEYED)


def test_a_changed_clean_setting_keeps_merge_and_shard(two_runs: tuple[Path, Path, Path]) -> None:
    """The key of a stage chains the keys before it: a clean setting gives clean and the stages
    after it new directories (they run), while merge and shard keep theirs (they do not)."""
    workdir, _, _ = two_runs
    plan = job_counts(snakemake(workdir, "-n", *PROFILE, "--config", 'clean={"min_turns": 3}').stdout)
    full = job_counts(snakemake(workdir, "-n", "--forceall", *PROFILE).stdout)
    assert plan == rerun_plan("clean", full)  # clean and every stage reading it (llama_pipe.stages.downstream)
    assert plan["clean"] == 2 and plan["train"] == 1 and not {"merge", "shard", "convert"} & set(plan)


def test_data_target_builds_the_data_of_the_given_settings(two_runs: tuple[Path, Path, Path]) -> None:
    workdir, _, _ = two_runs
    assert job_counts(snakemake(workdir, "-n", *PROFILE, "--", "data").stdout) == {}
    other = snakemake(workdir, "-n", *PROFILE, "--config", 'data={"val_fraction": 0.3}', "--", "data").stdout
    assert job_counts(other) == {"gather": 1, "data": 1}


def test_data_weights_rerun_gather_and_after_only(two_runs: tuple[Path, Path, Path]) -> None:
    """data.weights is gather's setting: merge ... split keep their products; a weight per input."""
    workdir, _, _ = two_runs
    plan = job_counts(snakemake(workdir, "-n", *PROFILE, "--config", 'data={"weights": [3]}').stdout)
    full = job_counts(snakemake(workdir, "-n", "--forceall", *PROFILE).stdout)
    assert plan == rerun_plan("gather", full) and plan["gather"] == 1 and plan["train"] == 1
    proc = snakemake(workdir, "-n", *PROFILE, "--config", 'data={"weights": [1, 2]}', check=False)
    assert proc.returncode != 0
    assert "data.weights: one weight per entry of data.inputs (1), got 2" in proc.stdout + proc.stderr
