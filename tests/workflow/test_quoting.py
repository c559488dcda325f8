"""Config values reach ``llama-pipe`` as single, unmangled arguments; nothing is run by the shell.

Rules build their command lines from config values (``params.args = args(section)``, quoted with
shlex) and from paths (``{input:q}``). Values with spaces, quotes, ``;``, ``$()``, backticks and
non-ASCII text go through the real Snakefile and shell into the argv of a recording stand-in for
``llama-pipe``; the real stage parsers then read them back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from workflow_helpers import copy_workflow, fake_bin, snakemake

from llama_pipe.stages import DATA_STAGES

SENTINEL = "pwned-by-config"
HOSTILE = [
    "two words",
    f"; touch {SENTINEL}",
    f"$(touch {SENTINEL})",
    f"`touch {SENTINEL}`",
    "it's \"quoted\"",
    "& echo {input} > x",
    "语言 \\n tab\there",
]
HOSTILE_INPUT = f"data/chats; touch {SENTINEL} 'x'.json"
# inputs whose names look like options: without `--` before the paths, merge would read the first
# as an unknown option and the second as a redirection of its stats file
DASH_INPUTS = ["-notes.json", "--stats=x.json"]
SYSTEM_PROMPT = f"You are helpful; $(touch {SENTINEL}) don't 'break'"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[list[str]]]]:
    root = tmp_path_factory.mktemp("quoting")
    workdir = copy_workflow(root / "repo")
    for name in [HOSTILE_INPUT, *DASH_INPUTS]:
        shutil.copy(workdir / "data/sample/sharegpt_sample.json", workdir / name)
    config = yaml.safe_load((workdir / "config.yaml").read_text(encoding="utf-8"))
    config["data"]["inputs"] = [HOSTILE_INPUT, *DASH_INPUTS]
    config["clean"]["blocked_words"] = HOSTILE
    config["chat"]["system_prompt"] = SYSTEM_PROMPT
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    calls = root / "calls.jsonl"
    snakemake(workdir, "--cores", "2", "results/default/train", bin_dir=fake_bin(root / "bin"),
              env={"FAKE_LLAMA_PIPE_CALLS": str(calls)})
    by_stage: dict[str, list[list[str]]] = {}
    for line in calls.read_text(encoding="utf-8").splitlines():
        argv = json.loads(line)["argv"]
        by_stage.setdefault(argv[0], []).append(argv[1:])
    return workdir, by_stage


def value_after(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, argv
    return argv[argv.index(flag) + 1]


def test_no_config_value_is_executed_by_the_shell(recorded: tuple[Path, dict[str, list[list[str]]]]) -> None:
    workdir, calls = recorded
    assert {*(s.name for s in DATA_STAGES), "train"} <= set(calls)
    assert list(workdir.rglob(SENTINEL)) == []  # `touch pwned-by-config` would have made this file


def test_list_values_arrive_as_one_argument_each(recorded: tuple[Path, dict[str, list[list[str]]]]) -> None:
    _, calls = recorded
    assert len(calls["clean"]) == 2
    for argv in calls["clean"]:
        assert json.loads(value_after(argv, "--blocked_words")) == HOSTILE


def test_paths_and_strings_arrive_unchanged(recorded: tuple[Path, dict[str, list[list[str]]]]) -> None:
    _, calls = recorded
    (merge,) = calls["merge"]
    assert merge[merge.index("--") + 1 :] == [HOSTILE_INPUT, "./-notes.json", "./--stats=x.json"]
    (train,) = calls["train"]
    assert value_after(train, "--system_prompt") == SYSTEM_PROMPT


def test_real_stage_parsers_read_the_values_back(recorded: tuple[Path, dict[str, list[list[str]]]]) -> None:
    from llama_pipe.cli import build_parser
    from llama_pipe.config import ChatSettings, CleanSettings, settings_from_args

    _, calls = recorded
    clean_args = build_parser("clean").parse_args(["clean", *calls["clean"][0]])
    assert settings_from_args(clean_args, CleanSettings, "clean").blocked_words == HOSTILE
    train_args = build_parser("train").parse_args(["train", *calls["train"][0]])
    assert settings_from_args(train_args, ChatSettings, "chat").system_prompt == SYSTEM_PROMPT


def test_paths_that_look_like_options_stay_paths(recorded: tuple[Path, dict[str, list[list[str]]]]) -> None:
    from llama_pipe.cli import build_parser

    _, calls = recorded
    args = build_parser("merge").parse_args(["merge", *calls["merge"][0]])
    assert args.inputs == [HOSTILE_INPUT, "./-notes.json", "./--stats=x.json"]
    assert args.stats is None  # not redirected by an input's name
    # every data stage gets its positional paths after `--` (the fake stage refuses them before)
    for stage in DATA_STAGES:
        for argv in calls[stage.name]:
            assert "--" in argv and not argv[-1].startswith("-"), (stage.name, argv)


def test_every_rule_command_parses_with_its_stage(recorded: tuple[Path, dict[str, list[list[str]]]]) -> None:
    """Each rule's flags (its section's, plus the chat keys it passes) are ones its stage accepts."""
    from llama_pipe.cli import build_parser

    _, calls = recorded
    assert {"convert", "split", "train"} <= set(calls)
    for stage, argvs in calls.items():
        for argv in argvs:
            build_parser(stage).parse_args([stage, *argv])  # an unknown flag exits 2
