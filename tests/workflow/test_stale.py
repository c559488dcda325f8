"""A killed train job never leaves the previous run's products standing as if they were current.

A real run of the workflow (with the fake stages) is changed (train.lr) and started again; its
train job is killed with SIGKILL (the process a cluster's scancel or the OOM killer ends), or the
whole snakemake process is. The same snakemake command then plans train and everything after it
again, and runs them: the merged model, eval and report are rebuilt, not kept from the old run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from workflow_helpers import copy_workflow, fake_bin, job_counts, snakemake

CHANGE = ["--config", 'train={"lr": 0.02}']
AFTER_TRAIN = {"train": 1, "select": 1, "merge_adapter": 1, "eval": 1, "report": 1, "all": 1}


def _wait_for(path: Path, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.2)
    raise AssertionError(f"train did not start within {timeout} s ({path} not written)")


def _start(workdir: Path, bin_dir: Path, pidfile: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
           "FAKE_TRAIN_PIDFILE": str(pidfile)}
    return subprocess.Popen([sys.executable, "-m", "snakemake", "--profile", "profiles/default", "--cores", "2", *CHANGE],
                            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["train job", "snakemake"])
def test_killed_train_replans_train_and_everything_after_it(tmp_path: Path, victim: str) -> None:
    workdir = copy_workflow(tmp_path / "repo")
    bin_dir = fake_bin(tmp_path / "bin")
    snakemake(workdir, "--profile", "profiles/default", "--cores", "2", bin_dir=bin_dir)
    report = workdir / "results/default/report/loss_curve.png"
    old_report = report.stat().st_mtime_ns

    pidfile = tmp_path / "train.pid"
    proc = _start(workdir, bin_dir, pidfile)
    try:
        if victim == "train job":
            # train has retries: 1, so kill both attempts; snakemake then gives up on it
            for _ in range(2):
                os.kill(_wait_for(pidfile), signal.SIGKILL)
                pidfile.unlink()
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode != 0, out
        else:
            _wait_for(pidfile)
            os.killpg(proc.pid, signal.SIGKILL)  # snakemake and its jobs, as a power cut would
            proc.communicate(timeout=60)
            snakemake(workdir, "--unlock")  # what snakemake asks for after a kill of itself
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    # the same command: train and all that follows it are planned again ...
    plan = job_counts(snakemake(workdir, "-n", "--profile", "profiles/default", *CHANGE, bin_dir=bin_dir).stdout)
    assert plan == AFTER_TRAIN
    # ... and run, rebuilding the products from the new training
    snakemake(workdir, "--profile", "profiles/default", "--cores", "2", *CHANGE, bin_dir=bin_dir)
    assert "0.02" in (workdir / "results/default/train/metrics.jsonl").read_text()
    assert report.stat().st_mtime_ns > old_report
    assert job_counts(snakemake(workdir, "-n", "--profile", "profiles/default", *CHANGE).stdout) == {}
