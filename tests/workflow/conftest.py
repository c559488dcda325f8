"""Fixtures for the workflow tests (helpers in workflow_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from workflow_helpers import copy_workflow, fake_bin, snakemake


@pytest.fixture(scope="session")
def completed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workflow copy in which the whole DAG has run once (with the fake stages)."""
    root = tmp_path_factory.mktemp("workflow-run")
    workdir = copy_workflow(root / "repo")
    bin_dir = fake_bin(root / "bin")
    snakemake(workdir, "--profile", "profiles/default", "--cores", "2", bin_dir=bin_dir)
    return workdir


@pytest.fixture(scope="session")
def fresh_workflow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workflow copy in which nothing has run yet (for dry-runs of the whole DAG)."""
    return copy_workflow(tmp_path_factory.mktemp("workflow-fresh") / "repo")
