"""Damaged weights and tokenizers are detected and reported by name; nothing partial is written.

A Meta-layout base from ``llama-pipe make-base`` (two model-parallel shards plus
``checklist.chk``) is damaged one way per test and given to ``llama-pipe convert``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.reliability import harness as h


def _convert(meta_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[h.Run, set[Path]]:
    h.require_stage("convert")
    before = h.files_under(tmp_path)
    out = tmp_path / "hf"
    argv = ["convert", str(meta_dir), "-o", str(out)]
    rc, err = h.run_cli(argv, capsys)
    return h.Run("convert", argv, rc, err, [out]), before


def _expect_refused(case_name: str, meta_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    run, before = _convert(meta_dir, tmp_path, capsys)
    h.check_clean_failure(run, h.case(case_name)["message"], before, tmp_path)
    assert not (tmp_path / "hf").exists()
    return run.err


def test_convert_missing_shard(meta_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The last shard is gone: the file list in checklist.chk (or the shard count) must catch it."""
    (meta_base / "consolidated.01.pth").unlink()
    _expect_refused("base_missing_shard", meta_base, tmp_path, capsys)


def test_convert_missing_first_shard(meta_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (meta_base / "consolidated.00.pth").unlink()
    run, before = _convert(meta_base, tmp_path, capsys)
    h.check_clean_failure(run, ["consolidated.00.pth"], before, tmp_path)


def test_convert_truncated_shard(meta_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shard = meta_base / "consolidated.00.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    _expect_refused("base_truncated_shard", meta_base, tmp_path, capsys)


def test_convert_corrupted_shard_same_size(meta_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Bytes flipped inside the tensor data, size unchanged: only the checksum in
    checklist.chk can tell, and it must (a silently corrupted base would train garbage)."""
    shard = meta_base / "consolidated.01.pth"
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 64):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    run, before = _convert(meta_base, tmp_path, capsys)
    h.check_clean_failure(run, ["consolidated.01.pth"], before, tmp_path)


def test_convert_params_mismatch(meta_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = json.loads((meta_base / "params.json").read_text(encoding="utf-8"))
    params["dim"] = params["dim"] * 2
    (meta_base / "params.json").write_text(json.dumps(params), encoding="utf-8")
    _expect_refused("params_disagree_with_shapes", meta_base, tmp_path, capsys)


def test_convert_params_wrong_layers(meta_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = json.loads((meta_base / "params.json").read_text(encoding="utf-8"))
    params["n_layers"] += 1
    (meta_base / "params.json").write_text(json.dumps(params), encoding="utf-8")
    run, before = _convert(meta_base, tmp_path, capsys)
    h.check_clean_failure(run, ["layers"], before, tmp_path)


def test_convert_params_garbage(meta_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (meta_base / "params.json").write_text('{"dim": 64, "n_layers": ', encoding="utf-8")
    _expect_refused("params_not_json", meta_base, tmp_path, capsys)


def test_convert_tokenizer_missing(meta_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (meta_base / "tokenizer.model").unlink()
    run, before = _convert(meta_base, tmp_path, capsys)
    h.check_clean_failure(run, ["tokenizer.model"], before, tmp_path)


def test_tokenizer_dir_without_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``split --tokenizer EMPTY_DIR``: exit 2 naming the directory, before reading data."""
    h.require_stage("split")
    tok = tmp_path / "empty_tokenizer"
    tok.mkdir()
    data = tmp_path / "in.jsonl"
    data.write_text((h.CORPUS / "crlf.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    before = h.files_under(tmp_path)
    run = h.run_stage("split", [data], tmp_path / "out", capsys, tok)
    h.check_clean_failure(run, [*h.case("tokenizer_dir_empty")["message"], str(tok)], before, tmp_path)


def test_tokenizer_dir_with_garbage_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    h.require_stage("split")
    tok = tmp_path / "bad_tokenizer"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{not json", encoding="utf-8")
    (tok / "tokenizer.model").write_bytes(b"\x00garbage")
    data = tmp_path / "in.jsonl"
    data.write_text((h.CORPUS / "crlf.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    before = h.files_under(tmp_path)
    run = h.run_stage("split", [data], tmp_path / "out", capsys, tok)
    h.check_clean_failure(run, [str(tok)], before, tmp_path)


# ----------------------------------------------------------------------------- HF weights that lie
# A Hugging Face model directory (the tiny model) or a peft adapter damaged one way, given to each
# stage that loads one: exit 2, one line naming the file, before any model is built (nothing
# written). ``serve`` must fail before it starts serving: its serve_forever fails the test.

STAGES_LOADING_A_MODEL = ("train", "merge-adapter", "eval", "chat", "serve")


def _rewrite_header(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """Rewrite a safetensors file's JSON header through ``edit(header)``, keeping the data bytes."""
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _tensors(header: dict) -> list[str]:  # type: ignore[type-arg]
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _length_beyond_file(p: Path) -> None:
    import struct

    data = p.read_bytes()
    p.write_bytes(struct.pack("<Q", len(data) + 4096) + data[8:])


def _garbage_header(p: Path) -> None:
    import struct

    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    p.write_bytes(data[:8] + b"{not json" + b" " * (n - 9) + data[8 + n :])


def _offsets_beyond_data(p: Path) -> None:
    def edit(h: dict) -> None:  # type: ignore[type-arg]
        last = _tensors(h)[-1]
        b, e = h[last]["data_offsets"]
        h[last]["data_offsets"] = [b + 10**9, e + 10**9]

    _rewrite_header(p, edit)


def _overlapping(p: Path) -> None:
    def edit(h: dict) -> None:  # type: ignore[type-arg]
        q = [k for k in _tensors(h) if k.endswith("q_proj.weight")]
        h[q[1]]["data_offsets"] = list(h[q[0]]["data_offsets"])

    _rewrite_header(p, edit)


def _shape_lies(p: Path) -> None:
    def edit(h: dict) -> None:  # type: ignore[type-arg]
        name = next(k for k in _tensors(h) if k.endswith("embed_tokens.weight"))
        h[name]["shape"] = [h[name]["shape"][0] * 1000, h[name]["shape"][1]]

    _rewrite_header(p, edit)


def _truncated(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 1000])


def _config(**changes: object):  # type: ignore[no-untyped-def]
    def damage(model: Path) -> None:
        cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
        cfg.update(changes)
        (model / "config.json").write_text(json.dumps(cfg), encoding="utf-8")

    return damage


def _config_garbage(model: Path) -> None:
    (model / "config.json").write_text('{"model_type": "llama", "hidden_size": ', encoding="utf-8")


def _weights(fn):  # type: ignore[no-untyped-def]
    return lambda model: fn(model / "model.safetensors")


# name -> (damage(model_dir), words the one-line error must contain besides the file)
MODEL_DAMAGE = {
    "header_length_beyond_file": (_weights(_length_beyond_file), "model.safetensors", "header length"),
    "header_garbage_json": (_weights(_garbage_header), "model.safetensors", "not valid JSON"),
    "offsets_beyond_data": (_weights(_offsets_beyond_data), "model.safetensors", "outside"),
    "overlapping_tensors": (_weights(_overlapping), "model.safetensors", "overlaps"),
    "shape_disagrees_with_bytes": (_weights(_shape_lies), "model.safetensors", "bytes"),
    "truncated_file": (_weights(_truncated), "model.safetensors", "data"),
    "vocab_size_1e12": (_config(vocab_size=10**12), "config.json", "vocab_size"),
    "hidden_size_terabytes": (_config(hidden_size=2**17), "config.json", "hidden_size"),
    "layers_beyond_weights": (_config(num_hidden_layers=4000), "config.json", "parameters"),
    "negative_dim": (_config(intermediate_size=-192), "config.json", "intermediate_size"),
    "zero_heads": (_config(num_attention_heads=0), "config.json", "num_attention_heads"),
    "dim_wrong_type": (_config(hidden_size="64"), "config.json", "hidden_size"),
    "config_not_json": (_config_garbage, "config.json", "not valid JSON"),
}


@pytest.fixture(scope="module")
def good_adapter(tiny_hf_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.adapters.test_merge_adapter import make_adapter

    return make_adapter(tiny_hf_model_dir, tmp_path_factory.mktemp("adapter") / "a", 1, ["q_proj", "v_proj"])


def _stage_argv(stage: str, model: Path, adapter: Path, data: Path, out: Path) -> list[str]:
    if stage == "train":
        return ["train", "--base", str(model), "--train-data", str(data), "--val-data", str(data), "-o", str(out),
                "--max-steps", "1", "--device", "cpu", "--max-seq-len", "128"]
    if stage == "merge-adapter":
        return ["merge-adapter", "--base", str(model), "--adapter", str(adapter), "-o", str(out)]
    if stage == "eval":
        return ["eval", "--base", str(model), "--tuned", str(model), "--val", str(data), "-o", str(out),
                "--device", "cpu", "--max-questions", "1", "--max-new-tokens", "2"]
    if stage == "chat":
        return ["chat", str(model), "--adapter", str(adapter), "--prompt", "hi", "--device", "cpu", "--max-tokens", "2"]
    return ["serve", str(model), "--adapter", str(adapter), "--port", "0", "--device", "cpu"]


def _run_damaged(stage: str, model: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                 monkeypatch: pytest.MonkeyPatch) -> tuple[h.Run, set[Path]]:
    from llama_pipe.serve.serve import ChatServer

    def never(self: ChatServer, *a: object, **k: object) -> None:
        raise AssertionError("serve started serving a damaged model")

    monkeypatch.setattr(ChatServer, "serve_forever", never)
    data = tmp_path / "train.jsonl"
    data.write_text((h.CORPUS / "crlf.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    before = h.files_under(tmp_path)
    argv = _stage_argv(stage, model, adapter, data, tmp_path / "out")
    rc, err = h.run_cli(argv, capsys)
    return h.Run(stage, argv, rc, err, [tmp_path / "out"]), before


@pytest.mark.parametrize("stage", STAGES_LOADING_A_MODEL)
@pytest.mark.parametrize("damage", sorted(MODEL_DAMAGE))
def test_damaged_hf_model_is_refused_by_every_loading_stage(
    stage: str, damage: str, tiny_hf_model_dir: Path, good_adapter: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A safetensors header that lies, or a config.json with absurd sizes: exit 2, one line naming
    the file and the fault, no traceback, nothing written; checked from headers, before allocation."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_hf_model_dir, model)
    fn, file, words = MODEL_DAMAGE[damage]
    fn(model)
    run, before = _run_damaged(stage, model, good_adapter, tmp_path, capsys, monkeypatch)
    h.check_clean_failure(run, [str(model / file), words], before, tmp_path)
    assert len([ln for ln in run.err.splitlines() if "error:" in ln]) == 1, run.err


def _adapter_config(**changes: object):  # type: ignore[no-untyped-def]
    def damage(adapter: Path) -> None:
        cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        cfg.update(changes)
        (adapter / "adapter_config.json").write_text(json.dumps(cfg), encoding="utf-8")

    return damage


ADAPTER_DAMAGE = {
    "header_garbage_json": (lambda a: _garbage_header(a / "adapter_model.safetensors"), "adapter_model.safetensors", "not valid JSON"),
    "offsets_beyond_data": (lambda a: _offsets_beyond_data(a / "adapter_model.safetensors"), "adapter_model.safetensors", "outside"),
    "truncated_file": (lambda a: _truncated(a / "adapter_model.safetensors"), "adapter_model.safetensors", "data"),
    "rank_1e9": (_adapter_config(r=10**9), "adapter_config.json", "r must be"),
    "rank_disagrees_with_weights": (_adapter_config(r=64), "adapter_config.json", "rank 4"),
    "rank_wrong_type": (_adapter_config(r="4"), "adapter_config.json", "r must be"),
}


@pytest.mark.parametrize("stage", ("merge-adapter", "chat", "serve"))
@pytest.mark.parametrize("damage", sorted(ADAPTER_DAMAGE))
def test_damaged_adapter_is_refused_by_every_stage_that_applies_one(
    stage: str, damage: str, tiny_hf_model_dir: Path, good_adapter: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An adapter whose safetensors header lies, or whose ``r`` would make peft allocate far more
    than the file holds: exit 2 naming the file, before the base is loaded."""
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(good_adapter, adapter)
    fn, file, words = ADAPTER_DAMAGE[damage]
    fn(adapter)
    run, before = _run_damaged(stage, tiny_hf_model_dir, adapter, tmp_path, capsys, monkeypatch)
    h.check_clean_failure(run, [str(adapter / file), words], before, tmp_path)


def test_intact_weights_pass_the_checks(tiny_hf_model_dir: Path, good_adapter: Path) -> None:
    """The checks accept what transformers and peft write (no false alarms on real files)."""
    from llama_pipe.weights.hf import safetensors_files
    from llama_pipe.weights.validate import check_adapter_weights, check_model_weights

    tensors = check_model_weights(tiny_hf_model_dir, safetensors_files(tiny_hf_model_dir))
    assert any(k.endswith("embed_tokens.weight") for k in tensors)
    assert any("lora_A" in k for k in check_adapter_weights(good_adapter))
