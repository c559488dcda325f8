"""Nothing from outside runs code: pickles are refused, remote code is opt-in, shell values are
quoted, the server stays on localhost and bounds its requests, ids never become paths.

Each malicious pickle here is live: a sanity check first loads a twin of it the unsafe way
(``weights_only=False``) and sees the side effect happen, so the refusal tests can fail.
"""

from __future__ import annotations

import ast
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.reliability import harness as h


class _Payload:
    """Unpickling this runs ``touch MARKER`` (what a hostile checkpoint would do, less harmfully)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def plant_pickle(path: Path, marker: Path, key: str) -> None:
    """A torch checkpoint whose one 'tensor' is the payload."""
    import torch

    torch.save({key: _Payload(marker)}, path)


@pytest.fixture()
def live_payload_check(tmp_path: Path) -> None:
    """Prove the payload works: an unsafe ``torch.load`` of a twin file does touch its marker."""
    import torch

    twin, marker = tmp_path / "twin.pth", tmp_path / "twin-marker"
    plant_pickle(twin, marker, "x")
    torch.load(twin, weights_only=False)  # noqa: S614 - deliberately unsafe, on our own payload
    assert marker.exists(), "the payload did not run when loaded unsafely; the refusal tests would prove nothing"


def _md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()  # noqa: S324 - Meta's checklist.chk format


def test_malicious_pickle_in_meta_shard_is_refused(
    live_payload_check: None, meta_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A hostile mirror: the shard AND its checklist.chk line are replaced, so only the loader
    (``torch.load(weights_only=True)``) stands between the file and code execution."""
    h.require_stage("convert")
    marker = tmp_path / "pwned-by-shard"
    shard = meta_base / "consolidated.00.pth"
    plant_pickle(shard, marker, "tok_embeddings.weight")
    chk = meta_base / "checklist.chk"
    chk.write_text(
        "".join(f"{_md5(shard)}  {shard.name}\n" if line.endswith(shard.name) else line + "\n"
                for line in chk.read_text(encoding="utf-8").splitlines()),
        encoding="utf-8",
    )
    before = h.files_under(tmp_path)
    argv = ["convert", str(meta_base), "-o", str(tmp_path / "hf")]
    rc, err = h.run_cli(argv, capsys)
    assert not marker.exists(), "the pickled payload in consolidated.00.pth RAN"
    h.check_clean_failure(h.Run("convert", argv, rc, err), h.case("malicious_pickle_shard")["message"], before, tmp_path)


def _adapter_config(base: Path) -> dict[str, object]:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
        "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
    }


def test_malicious_pickle_in_adapter_is_refused(
    live_payload_check: None, tiny_hf_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h.require_stage("merge-adapter")
    marker = tmp_path / "pwned-by-adapter"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(_adapter_config(tiny_hf_model_dir)), encoding="utf-8")
    plant_pickle(adapter / "adapter_model.bin", marker, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    before = h.files_under(tmp_path)
    argv = ["merge-adapter", "--base", str(tiny_hf_model_dir), "--adapter", str(adapter), "-o", str(tmp_path / "merged")]
    rc, err = h.run_cli(argv, capsys)
    assert not marker.exists(), "the pickled payload in adapter_model.bin RAN"
    h.check_clean_failure(h.Run("merge-adapter", argv, rc, err), h.case("malicious_pickle_adapter")["message"], before, tmp_path)

    # The same adapter handed to chat/serve (merged in memory) is refused the same way.
    from llama_pipe.core.errors import InputError
    from llama_pipe.models.generation import load_chat_model

    with pytest.raises(InputError, match="adapter_model.bin"):
        load_chat_model(tiny_hf_model_dir, [adapter], device="cpu")
    assert not marker.exists()


def test_malicious_pickle_as_hf_weights_is_refused(
    live_payload_check: None, tiny_hf_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An HF-layout base whose only weights are a pytorch_model.bin pickle: convert's
    pass-through refuses it instead of handing it to transformers."""
    import shutil

    h.require_stage("convert")
    marker = tmp_path / "pwned-by-hf-bin"
    base = tmp_path / "hf_in"
    shutil.copytree(tiny_hf_model_dir, base)
    for f in base.glob("*.safetensors*"):
        f.unlink()
    plant_pickle(base / "pytorch_model.bin", marker, "model.embed_tokens.weight")
    before = h.files_under(tmp_path)
    argv = ["convert", str(base), "-o", str(tmp_path / "hf_out")]
    rc, err = h.run_cli(argv, capsys)
    assert not marker.exists(), "the pickled payload in pytorch_model.bin RAN"
    h.check_clean_failure(h.Run("convert", argv, rc, err), ["pytorch_model.bin"], before, tmp_path)


MODEL_STAGES = ["train", "merge-adapter", "eval", "serve"]
_HOSTILE_BASE_RUNS: dict[str, tuple[int, str, bool]] = {}


def _run_on_hostile_base(stage: str, tiny_hf_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, bool]:
    """Give ``stage`` a base directory whose only weights are a hostile ``pytorch_model.bin``;
    return (exit code, stderr, whether the payload ran). Cached: two tests read each result."""
    import shutil

    if stage in _HOSTILE_BASE_RUNS:
        return _HOSTILE_BASE_RUNS[stage]
    h.require_stage(stage)
    marker = tmp_path / "pwned-by-base-bin"
    base = tmp_path / "hf_in"
    shutil.copytree(tiny_hf_model_dir, base)
    for f in base.glob("*.safetensors*"):
        f.unlink()
    plant_pickle(base / "pytorch_model.bin", marker, "model.embed_tokens.weight")
    data = tmp_path / "d.jsonl"
    data.write_text((h.CORPUS / "crlf.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    adapter = tmp_path / "adapter"
    argv = {
        "train": ["train", "--base", str(base), "--train-data", str(data), "--val-data", str(data), "-o", str(tmp_path / "run"),
                  "--max-steps", "1", "--device", "cpu"],
        "merge-adapter": ["merge-adapter", "--base", str(base), "--adapter", str(adapter), "-o", str(tmp_path / "merged")],
        "eval": ["eval", "--base", str(base), "--tuned", str(base), "--val", str(data), "-o", str(tmp_path / "eval"),
                 "--device", "cpu"],
        "serve": ["serve", str(base), "--port", "0", "--device", "cpu"],
    }[stage]
    if stage == "merge-adapter":  # a valid adapter, so that the base is what gets loaded
        from tests.reliability.test_interrupt import make_adapter

        make_adapter(tiny_hf_model_dir, adapter)
    try:
        rc, err = h.run_cli(argv, capsys)
    except Exception as exc:  # noqa: BLE001 - an uncaught error is a result here, not a test error
        import traceback

        rc, err = 1, "Traceback (uncaught in main)\n" + "".join(traceback.format_exception(exc))
    finally:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    _HOSTILE_BASE_RUNS[stage] = (rc, err, marker.exists())
    return _HOSTILE_BASE_RUNS[stage]


@pytest.mark.parametrize("stage", MODEL_STAGES)
def test_malicious_pickle_as_base_never_runs(
    stage: str, live_payload_check: None, tiny_hf_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every stage that loads a model, given a base whose weights are a hostile
    ``pytorch_model.bin``: the payload never runs and the stage fails."""
    rc, err, ran = _run_on_hostile_base(stage, tiny_hf_model_dir, tmp_path, capsys)
    assert not ran, f"the pickled payload in the base's pytorch_model.bin RAN ({stage})"
    assert rc != 0, f"{stage} accepted a pickled base"


@pytest.mark.parametrize("stage", MODEL_STAGES)
def test_malicious_pickle_as_base_is_a_clear_error(
    stage: str, live_payload_check: None, tiny_hf_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """... and says so: exit 2 naming the refused file, not an UnpicklingError traceback."""
    rc, err, _ = _run_on_hostile_base(stage, tiny_hf_model_dir, tmp_path, capsys)
    assert rc == 2 and "Traceback" not in err, f"{stage}: exit {rc}: {err.strip().splitlines()[-1][:300] if err.strip() else ''}"
    assert "pytorch_model.bin" in err, f"{stage}: the message does not name the refused file: {err[-800:]}"


def test_every_torch_load_is_weights_only() -> None:
    """Static guard: every ``torch.load(`` call in the package passes ``weights_only=True``."""
    offenders = []
    for path in sorted((REPO / "src" / "llama_pipe").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                base = node.func.value
                if isinstance(base, ast.Name) and base.id == "torch":
                    kw = {k.arg: k.value for k in node.keywords}
                    ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                    if not ok:
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr in ("loads", "load") and isinstance(node.value, ast.Name) \
                    and node.value.id in ("pickle", "cPickle", "dill", "joblib"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} ({node.value.id}.{node.attr})")
    assert not offenders, f"unsafe deserialisation: {offenders}"


# ----------------------------------------------------------------------------- trust_remote_code


def test_trust_remote_code_is_off_by_default_and_never_hard_coded() -> None:
    import dataclasses

    from llama_pipe.config import SECTIONS

    with_field = {name: cls for name, cls in SECTIONS.items() if any(f.name == "trust_remote_code" for f in dataclasses.fields(cls))}
    assert with_field, "no config section has trust_remote_code"
    for name, cls in with_field.items():
        assert cls().trust_remote_code is False, name
    offenders = []
    for path in sorted((REPO / "src" / "llama_pipe").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                if isinstance(node.value, ast.Constant) and node.value.value is True:
                    offenders.append(f"{path.relative_to(REPO)}:{node.value.lineno}")
    assert not offenders, f"trust_remote_code=True hard-coded at {offenders}"


@pytest.mark.slow
def test_trust_remote_code_enabled_is_warned(
    tiny_hf_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A one-step training run with ``trust_remote_code: true`` logs a WARNING that names the
    setting; the same run without it does not."""
    h.require_stage("train")
    import logging

    from llama_pipe.config import ChatSettings, LoraSettings, TrainSettings
    from llama_pipe.train.train import train

    data = tmp_path / "d.jsonl"
    data.write_text((h.CORPUS / "crlf.jsonl").read_text(encoding="utf-8"), encoding="utf-8")

    def run(flag: bool) -> list[str]:
        from accelerate.state import AcceleratorState, GradientState

        caplog.clear()
        settings = TrainSettings(trust_remote_code=flag, max_steps=1, micro_batch_size=1,
                                 eval_every=1, save_every=1, warmup_steps=0, lora=LoraSettings(r=2, alpha=4), device="cpu")
        try:
            with caplog.at_level(logging.WARNING):
                train(tiny_hf_model_dir, data, data, tmp_path / f"run-{flag}", settings, ChatSettings(max_seq_len=256))
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "trust_remote_code" in r.getMessage()]

    assert not run(False)
    assert run(True), "training with trust_remote_code=true logged no warning naming the setting"


# ----------------------------------------------------------------------------- shell quoting


EVIL = "; touch pwned-by-config #"  # relative: a job would run it in the workspace


def _workspace(tmp_path: Path) -> Path:
    """A copy of the workflow with a config whose values try to inject shell commands."""
    import shutil

    ws = tmp_path / "ws"
    ws.mkdir()
    for name in ("workflow", "envs"):
        shutil.copytree(REPO / name, ws / name)
    for name in ("Snakefile", "config.yaml"):
        shutil.copy2(REPO / name, ws / name)
    evil = EVIL
    data = ws / f"in{evil}.json"
    data.write_text((h.CORPUS / "bom.json").read_text(encoding="utf-8-sig"), encoding="utf-8")
    (ws / "evil.yaml").write_text(json.dumps({
        "data": {"inputs": [data.name]},
        "base": {"tokenizer_corpus": [data.name]},
        "clean": {"blocked_words": [evil, "openai"]},
        "eval": {"questions": f"q{evil}.jsonl"},
        "serve": {"model_id": evil},
    }), encoding="utf-8")
    return ws


def test_config_values_reach_shell_quoted(tmp_path: Path) -> None:
    """``snakemake -n -p`` with ``; touch /tmp/...`` in paths and values: every printed
    command splits (shlex) into tokens that keep the value whole, and nothing is executed."""
    ws = _workspace(tmp_path)
    marker = ws / "pwned-by-config"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "data", "-n", "-p", "--cores", "1",
         "--configfile", "evil.yaml"],
        cwd=ws, capture_output=True, text=True, timeout=120,
        env=h.set_env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    commands = [line.strip().removeprefix("Shell command:").strip() for line in proc.stdout.splitlines()]
    commands = [c for c in commands if c.startswith("llama-pipe ")]
    assert commands, proc.stdout[-2000:]
    evil = EVIL
    seen = 0
    for cmd in commands:
        tokens = shlex.split(cmd)
        assert "touch" not in tokens, f"an injected command would run: {cmd}"
        seen += sum(evil in t for t in tokens)
    assert seen >= 2, f"the evil values did not reach the commands at all: {commands}"
    assert not marker.exists()

    # And for real: merge, shard and clean run with the hostile input path and blocked word.
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "data", "--until", "clean", "--cores", "1",
         "--configfile", "evil.yaml"],
        cwd=ws, capture_output=True, text=True, timeout=300,
        env=h.set_env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [p.name for p in ws.glob("results/data/clean/*/shard-000.jsonl")] == ["shard-000.jsonl"]
    assert not marker.exists(), "a config value was executed by the shell"


@pytest.mark.parametrize("name", [".", "..", "../x", "a/b", "/tmp/x", ""])
def test_run_name_cannot_escape_results(name: str) -> None:
    """``train.run`` names the directory ``results/<run>``: a name that is not one plain path
    component (``..`` would make the train output ``results/`` itself) is a config error."""
    from llama_pipe.config import TrainSettings
    from llama_pipe.core.errors import ConfigError
    from llama_pipe.core.settings import from_dict

    with pytest.raises(ConfigError, match="run"):
        from_dict(TrainSettings, {"run": name}, root="train")

