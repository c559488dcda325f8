"""The conda environments (``--sdm conda``) install what pyproject.toml declares, nothing else.

Each ``envs/<group>.yaml`` pins pip requirements that are pyproject.toml's
dependencies: ``name==version``, a version pyproject's specifier allows. Together the
environments cover every runtime dependency except the ones only the Snakemake driver needs.
Each rule's ``conda:`` names one of these files, and the data group's environment holds what the
data stages import.
"""

from __future__ import annotations

import ast
import re

import pytest
import yaml
from packaging.requirements import Requirement
from workflow_helpers import REPO

from llama_pipe.stages import STAGES

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ENVS = ("data", "train")
# Needed by the process that runs snakemake, not inside a job's environment.
DRIVER_ONLY = {"snakemake", "snakemake-executor-plugin-slurm"}
# Third-party modules the data stages (merge, shard, clean, filter-lang, split, gather) import: the
# data package but the stages of another environment (distill runs in envs/train.yaml).
DATA_STAGE_MODULES = ("llama_pipe/data", "llama_pipe/core/records.py", "llama_pipe/chat_template/builtin.py",
                      "llama_pipe/weights/tokenizer.py")
OTHER_ENV_STAGES = {s.module.replace(".", "/") + ".py" for s in STAGES if s.unit is None}
IMPORT_TO_DIST = {"yaml": "pyyaml", "google": "protobuf", "jsonschema": "jsonschema"}


def name(req: Requirement) -> str:
    return re.sub(r"[-_.]+", "-", req.name).lower()


def pyproject_requirements() -> dict[str, Requirement]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return {name(r): r for r in map(Requirement, data["project"]["dependencies"])}


def env_requirements(group: str) -> dict[str, Requirement]:
    env = yaml.safe_load((REPO / "envs" / f"{group}.yaml").read_text(encoding="utf-8"))
    pip = [dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict) and "pip" in dep]
    assert len(pip) == 1, f"envs/{group}.yaml: expected one pip: section"
    conda = [dep for dep in env["dependencies"] if isinstance(dep, str)]
    assert any(dep.startswith("python") for dep in conda) and "pip" in conda
    reqs = [Requirement(line) for line in pip[0]]
    assert len({name(r) for r in reqs}) == len(reqs), f"envs/{group}.yaml lists a package twice"
    return {name(r): r for r in reqs}


@pytest.mark.parametrize("group", ENVS)
def test_env_requirements_are_pyprojects(group: str) -> None:
    declared = pyproject_requirements()
    for key, req in env_requirements(group).items():
        assert key in declared, f"envs/{group}.yaml: {req} is not a dependency in pyproject.toml"
        pins = [s for s in req.specifier if s.operator == "=="]
        assert len(pins) == 1 and len(req.specifier) == 1, f"envs/{group}.yaml: {req} is not pinned (name==version)"
        assert declared[key].specifier.contains(pins[0].version), (
            f"envs/{group}.yaml: {req} but pyproject.toml says {declared[key]}"
        )


def test_envs_cover_every_runtime_dependency() -> None:
    covered = set().union(*(env_requirements(g) for g in ENVS))
    missing = set(pyproject_requirements()) - covered - DRIVER_ONLY
    assert not missing, f"in pyproject.toml but in no envs/*.yaml: {sorted(missing)}"


def test_data_env_has_what_the_data_stages_import() -> None:
    import sys

    declared = pyproject_requirements()
    imported: set[str] = set()
    src = REPO / "src"
    for rel in DATA_STAGE_MODULES:
        path = src / rel
        for py in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            if py.relative_to(src).as_posix() in OTHER_ENV_STAGES:
                continue
            for node in ast.walk(ast.parse(py.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    imported.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in ("llama_pipe", "__future__")}
    dists = {IMPORT_TO_DIST.get(m, m.replace("_", "-")) for m in third_party}
    in_data_env = set(env_requirements("data"))
    missing = {d for d in dists if d in declared and d not in in_data_env}
    assert not missing, f"the data stages import {sorted(missing)}, which envs/data.yaml lacks"
    assert dists <= set(declared), f"imports not declared in pyproject.toml: {sorted(dists - set(declared))}"


def test_every_rule_names_an_existing_env() -> None:
    """Each rule's ``conda:`` path, read as Snakemake reads it (relative to the rule file), is one
    of envs/<group>.yaml at the top of the repository."""
    named = set()
    for smk in sorted((REPO / "workflow/rules").glob("*.smk")):
        rules = smk.read_text(encoding="utf-8")
        paths = re.findall(r'conda:\s*\n\s*"([^"]+)"', rules)
        assert rules.count("conda:") == rules.count("shell:") == len(paths), smk
        for path in paths:
            env = (smk.parent / path).resolve()
            assert env.parent == REPO / "envs" and env.is_file(), (smk.name, path)
            named.add(env.stem)
    assert named == set(ENVS)
    for group in ENVS:
        assert (REPO / "envs" / f"{group}.post-deploy.sh").is_file()


def test_post_deploy_installs_the_workflow_checkout_from_snakemakes_copy(tmp_path) -> None:
    """Snakemake runs a copy of the script under .snakemake/conda/, from the working directory:
    it must install the checkout the Snakefile exported (LLAMA_PIPE_SOURCE), not the copy's
    parent directory."""
    import os
    import shutil
    import subprocess

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    log = tmp_path / "pip-args"
    (fake_bin / "python").write_text(f'#!/bin/sh\necho "$@" > {log}\n')
    (fake_bin / "python").chmod(0o755)
    copy = tmp_path / "work" / ".snakemake" / "conda" / "0123abcd.post-deploy.sh"
    copy.parent.mkdir(parents=True)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "LLAMA_PIPE_SOURCE": str(REPO)}
    for group in ENVS:
        shutil.copy(REPO / "envs" / f"{group}.post-deploy.sh", copy)
        proc = subprocess.run(["bash", str(copy)], cwd=tmp_path / "work", env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert log.read_text().split() == ["-m", "pip", "install", "--no-deps", str(REPO)]
    # without the variable (not run by this workflow's Snakefile) it says so instead of guessing
    del env["LLAMA_PIPE_SOURCE"]
    proc = subprocess.run(["bash", str(copy)], cwd=tmp_path / "work", env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "LLAMA_PIPE_SOURCE" in proc.stderr


def test_snakefile_loads_without_llama_pipe_installed(tmp_path) -> None:
    """The Snakefile reads the settings code from its own checkout (src/), so Snakemake's
    environment needs snakemake only: a dry-run where llama_pipe is not importable from
    site-packages still plans the whole DAG."""
    import os
    import shutil
    import subprocess
    import sys

    from workflow_helpers import copy_workflow

    workdir = copy_workflow(tmp_path / "repo")
    shutil.copytree(REPO / "src" / "llama_pipe", workdir / "src" / "llama_pipe",
                    ignore=shutil.ignore_patterns("__pycache__"))
    hide = (
        "import sys, importlib.machinery as m\n"
        f"src = {str(REPO / 'src')!r}\n"
        "sys.path[:] = [p for p in sys.path if p != src]\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()\n"
        "                    and 'editable' not in getattr(f, '__name__', '').lower()]\n"
        "import runpy; sys.argv = ['snakemake', '-n', '--cores', '1']\n"
        "runpy.run_module('snakemake', run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", hide], cwd=workdir, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rule train:" in proc.stdout
