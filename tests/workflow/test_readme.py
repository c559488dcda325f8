"""The commands of README.md's ```bash blocks work as written (where that is cheap).

* ``snakemake ...``: run as a dry-run (``-n`` added) in a copy of the workflow (``-s
  ~/llama-pipe/...`` pointed at the copy, from another directory): the plan must build.
* ``llama-pipe ... --help``: run; ``llama-pipe <stage> --help`` for every stage too (the README
  says so in a comment).
* any other ``llama-pipe <stage> ...`` (it needs a run's products): parsed by the stage's own
  parser, so a renamed flag or stage fails here.

A README command that stops working fails the suite.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from workflow_helpers import REPO, copy_workflow, snakemake

from llama_pipe.cli import build_parser
from llama_pipe.stages import STAGES

README = REPO / "README.md"


def readme_commands() -> list[list[str]]:
    """Every command line of README.md's ```bash blocks, as argv (comments removed)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    commands = [shlex.split(line, comments=True) for block in blocks for line in block.splitlines()]
    return [argv for argv in commands if argv]


COMMANDS = readme_commands()


def test_the_readme_has_commands_of_both_kinds() -> None:
    assert {argv[0] for argv in COMMANDS} == {"snakemake", "llama-pipe"}, COMMANDS
    assert sum(argv[0] == "snakemake" for argv in COMMANDS) >= 5


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = copy_workflow(tmp_path_factory.mktemp("readme") / "llama-pipe")
    shutil.copytree(REPO / ".test", work / ".test")  # the README's --configfile example reads it
    return work


@pytest.mark.parametrize("argv", [c for c in COMMANDS if c[0] == "snakemake"], ids=shlex.join)
def test_snakemake_command_plans(argv: list[str], workdir: Path, tmp_path: Path) -> None:
    args = argv[1:]
    cwd = workdir
    if "-s" in args:  # from another directory: the checkout is wherever the user cloned it
        i = args.index("-s") + 1
        args[i] = args[i].replace("~/llama-pipe", str(workdir))
        cwd = tmp_path
    proc = snakemake(cwd, "-n", *args, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{shlex.join(argv)}:\n{out[-3000:]}"
    assert "Job stats:" in out or "Nothing to be done" in out, out[-2000:]


@pytest.mark.parametrize("argv", [c for c in COMMANDS if c[0] == "llama-pipe"], ids=shlex.join)
def test_llama_pipe_command_parses_or_runs(argv: list[str]) -> None:
    if "--help" in argv:
        proc = subprocess.run([sys.executable, "-m", "llama_pipe.cli", *argv[1:]], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
        return
    stage = argv[1]
    build_parser(stage).parse_args(argv[1:])  # exits 2 on an unknown stage or flag


@pytest.mark.parametrize("stage", [s.name for s in STAGES])
def test_every_stage_has_help(stage: str, capsys: pytest.CaptureFixture[str]) -> None:
    from llama_pipe.cli import main

    with pytest.raises(SystemExit) as exc:
        main([stage, "--help"])
    assert exc.value.code == 0 and f"usage: llama-pipe {stage}" in capsys.readouterr().out


def test_a_target_after_configfile_is_named_in_one_line(workdir: Path) -> None:
    """``snakemake --configfile F TARGET`` reads TARGET as a second config file. A results/ file
    that loads (a stats file) reaches the Snakefile's start-up check, which says what to write
    instead; ``--configfile F -- TARGET`` is the way (README, docs/workflow.md)."""
    stats = workdir / "results" / "data" / "merge" / "0123456789" / "merged.stats.json"
    stats.parent.mkdir(parents=True, exist_ok=True)
    stats.write_text('{"stage": "merge", "unit": "records", "in": 1, "out": 1, "rejected": {}}')
    target = str(stats.relative_to(workdir))
    proc = snakemake(workdir, "-n", "--configfile", ".test/config/config.yaml", target, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert (f"--configfile {target}: a product of the workflow, not a config file: --configfile takes every word after "
            "it, so a target must follow `--`: snakemake --configfile FILE -- TARGET") in out, out[-2000:]
    assert "unknown key" not in out
    shutil.rmtree(workdir / "results")
