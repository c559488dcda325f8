"""clean.rename and the names clean reports: data that teaches other assistants' names."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from llama_pipe.core.errors import ConfigError
from llama_pipe.data.identity import introductions, parse_renames, renamer
from tests.data.conftest import cli, read_jsonl, stats_of, turns, write_jsonl

RENAME = [
    "Vicuna => Llama Pipe",
    "Gitclone => Llama Pipe",
    "Large Model Systems Organization (LMSYS) => the llama-pipe project",
    "LMSYS => the llama-pipe project",
    "git-cloner => the llama-pipe project",
]


def test_whole_names_are_renamed_longest_first_in_latin_and_chinese_text() -> None:
    rename = renamer(tuple(RENAME))
    assert rename("I am Vicuna, trained by researchers from Large Model Systems Organization (LMSYS).") == (
        "I am Llama Pipe, trained by researchers from the llama-pipe project."
    )
    assert rename("我是Gitclone, 由来自git-cloner的研究人员训练。") == "我是Llama Pipe, 由来自the llama-pipe project的研究人员训练。"
    assert rename("Vicuna-13B and LMSYS") == "Llama Pipe-13B and the llama-pipe project"
    assert rename("Vicunas, myLMSYS, not-git-cloner") == "Vicunas, myLMSYS, not-git-cloner"  # parts of longer words stay
    assert renamer(())("I am Vicuna") == "I am Vicuna"


@pytest.mark.parametrize("entry", ["Vicuna", " => Llama Pipe", "a => b => c"])
def test_a_malformed_entry_is_a_config_error(entry: str) -> None:
    with pytest.raises(ConfigError, match="OLD => NEW"):
        parse_renames([entry])


def test_a_name_renamed_twice_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="renamed twice"):
        parse_renames(["Vicuna => A", "Vicuna => B"])


def test_introductions_find_the_names_and_makers_a_reply_teaches() -> None:
    assert introductions("I am Vicuna, a language model trained by researchers from Large Model Systems Organization (LMSYS).") == (
        {"Vicuna"}, {"Large Model Systems Organization (LMSYS)"})
    assert introductions("My name is Gitclone, and I'm a language model developed by git-cloner.") == ({"Gitclone"}, {"git-cloner"})
    assert introductions("我是Gitclone, 一个语言模型") == ({"Gitclone"}, set())
    assert introductions("I'm sorry, I am not sure. I am an AI assistant.") == (set(), set())
    assert introductions("Sure. You can call me Llama Pipe. I'm an AI assistant.") == ({"Llama Pipe"}, set())


def test_clean_on_the_shared_data_warns_of_three_names_and_rename_leaves_one(
    shared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """FastChat's and git-cloner's identity sets with the identity sample, as a user merges them:
    clean says the replies teach three names; with clean.rename every reply names Llama Pipe."""
    repo = Path(__file__).resolve().parents[2]
    merged = tmp_path / "merged.jsonl"
    files = [shared_data / f for f in ("fastchat_dummy_conversation.json", "gitcloner_dummy_en.json", "gitcloner_dummy_cn.json")]
    assert cli("merge", *files, repo / "data" / "sample" / "identity_sample.json", "-o", merged) == 0
    plain, renamed = tmp_path / "plain.jsonl", tmp_path / "renamed.jsonl"
    with caplog.at_level(logging.WARNING, logger="llama_pipe.data"):
        assert cli("clean", merged, "-o", plain, "--workers", "1") == 0
    warning = " ".join(r.getMessage() for r in caplog.records if "names:" in r.getMessage())
    assert all(n in warning for n in ("'Llama Pipe'", "'Gitclone'", "'Vicuna'", "'git-cloner'")), warning
    assert set(stats_of(plain)["introductions"]["names"]) == {"Llama Pipe", "Gitclone", "Vicuna"}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llama_pipe.data"):
        assert cli("clean", merged, "-o", renamed, "--workers", "1", "--rename", json.dumps(RENAME)) == 0
    assert not [r for r in caplog.records if "names:" in r.getMessage()]
    stats = stats_of(renamed)
    assert stats["introductions"]["names"] == {"Llama Pipe": stats["introductions"]["names"]["Llama Pipe"]}
    assert stats["repaired"]["renamed"] > 1000
    text = renamed.read_text(encoding="utf-8")
    assert not any(old.split(" => ")[0] in text for old in RENAME)
    # renaming makes FastChat's and git-cloner's twins one conversation: more duplicates, all accounted for
    assert stats["rejected"]["duplicate_first_exchange"] > stats_of(plain)["rejected"]["duplicate_first_exchange"]


def test_rename_applies_to_human_turns_too_and_a_bad_entry_is_exit_2(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "1", "conversations": turns("Are you Vicuna?", "Yes, I am Vicuna.")}])
    out = tmp_path / "out.jsonl"
    assert cli("clean", inp, "-o", out, "--rename", '["Vicuna => Llama Pipe"]') == 0
    assert [t["value"] for t in read_jsonl(out)[0]["conversations"]] == ["Are you Llama Pipe?", "Yes, I am Llama Pipe."]
    assert cli("clean", inp, "-o", tmp_path / "bad.jsonl", "--rename", '["Vicuna -> Llama Pipe"]') == 2
    assert not (tmp_path / "bad.jsonl").exists()
