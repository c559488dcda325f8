"""Helpers for the workflow tests: copy the workflow, run snakemake, read its job table.

The DAG tests run the real Snakefile, rule files, profiles and config.yaml, in a copy of the
repository's workflow files under a temporary directory (never in the checkout, whose
``results/`` belong to the user). Jobs that really run use ``fake_llama_pipe.py`` as the
``llama-pipe`` executable: it writes each stage's outputs without loading a model, so the
re-run tests see real Snakemake metadata (params, code, input checksums) from a completed run in
seconds. The real stages run under Snakemake in ``tests/slurm/run_slurm_test.sh``.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
#: What a copy of the workflow needs (besides the package, found through PYTHONPATH or installed): the
#: Snakefile and config.yaml at the top, the rules, schemas and report pages, the conda environments, the
#: profiles, the shipped sample data and accelerate configs. tests/slurm/run_slurm_test.sh copies the same.
WORKFLOW_FILES = ("Snakefile", "config.yaml", "workflow", "envs", "profiles", "data", "configs")
FAKE = Path(__file__).with_name("fake_llama_pipe.py")


def copy_workflow(dest: Path) -> Path:
    """Copy the files Snakemake reads (not results/, logs/, .snakemake/) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    # These tests run the DAG on the embedded tiny model; the shipped default (SmolLM2 from its wheel)
    # would add a download: base.source tiny, as .test/config/config.yaml does.
    cfg = dest / "config.yaml"
    text = re.sub(r'(?m)^  source: .*$', '  source: "tiny"', cfg.read_text(), count=1)
    cfg.write_text(re.sub(r'(?m)^  sha256: .*$', '  sha256: null', text, count=1))
    # eval.questions may not be bundled yet on a partial checkout; the DAG only needs the file.
    name = yaml.safe_load((dest / "config.yaml").read_text())["eval"]["questions"]
    questions = dest / name if name else None  # null: the package's bundled held-out set
    if questions is not None and not questions.exists():
        questions.parent.mkdir(parents=True, exist_ok=True)
        questions.write_text('{"question_id": 1, "category": "x", "turns": ["hi"]}\n')
    return dest


def fake_bin(directory: Path) -> Path:
    """A directory holding an executable ``llama-pipe`` that runs fake_llama_pipe.py."""
    directory.mkdir(parents=True, exist_ok=True)
    exe = directory / "llama-pipe"
    exe.write_text(f"#!{sys.executable}\nimport runpy, sys\nsys.argv[0] = {str(FAKE)!r}\n"
                   f"runpy.run_path({str(FAKE)!r}, run_name='__main__')\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return directory


def snakemake(workdir: Path, *args: str, bin_dir: Path | None = None, check: bool = True,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``snakemake ARGS`` in ``workdir`` with this interpreter (the project's venv)."""
    path = [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    if bin_dir is not None:
        path.insert(0, str(bin_dir))
    full_env = {**os.environ, "PATH": os.pathsep.join(path), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=workdir, env=full_env, capture_output=True, text=True, timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a (dry-)run as {rule: count}; {} when nothing is to be done."""
    match = re.search(r"Job stats:\n.*?\n-+\s+-+\n(.*?)\ntotal\s+\d+", output, re.S)
    if not match:
        assert "Nothing to be done" in output, output
        return {}
    rows = (line.split() for line in match.group(1).splitlines() if line.strip())
    return {rule: int(count) for rule, count in rows}


@contextmanager
def edited_config(workdir: Path, section: str, key: str, value: object) -> Iterator[None]:
    """Change one key of ``workdir/config.yaml`` (as a user would), restore it afterwards."""
    path = workdir / "config.yaml"
    original = path.read_text(encoding="utf-8")
    data = yaml.safe_load(original)
    node = data[section]
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    try:
        yield
    finally:
        path.write_text(original, encoding="utf-8")


def rerun_plan(changed: str, full_plan: dict[str, int]) -> dict[str, int]:
    """The jobs a changed setting of stage ``changed`` should re-run, from the registry: that stage
    and every stage reading its outputs (:func:`llama_pipe.stages.downstream`), each with its job
    count in ``full_plan`` (a ``--forceall`` dry-run's :func:`job_counts`), plus the target rule."""
    from llama_pipe.stages import downstream

    rules = {s.rule for s in downstream(changed)} | {"all"}
    return {rule: n for rule, n in full_plan.items() if rule in rules}
