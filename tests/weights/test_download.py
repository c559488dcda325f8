"""download: a real HTTP server on 127.0.0.1 serving a tiny Meta release; HF repo rules."""

from __future__ import annotations

import hashlib
import shutil
import socket
from pathlib import Path

import pytest

from llama_pipe.cli import main
from llama_pipe.config import BaseSettings
from llama_pipe.core.atomic import MARKER
from llama_pipe.core.errors import ConfigError, InputError
from llama_pipe.weights import meta
from llama_pipe.weights.download import download, source_kind
from llama_pipe.weights.fetch import file_url, redact

from .httpserver import serve

SHARD0 = "/7B/consolidated.00.pth"


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection to a non-loopback address fails the test; proxies are bypassed."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> object:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]  # type: ignore[index]
            assert host in ("127.0.0.1", "::1"), f"test tried to reach {host}"
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def release(make_meta, tmp_path: Path) -> Path:
    """Meta's download layout: tokenizer at the root, the model's shards in 7B/."""
    root = tmp_path / "server"
    model = root / "7B"
    model.mkdir(parents=True)
    src = make_meta(n_shards=2)
    for f in src.iterdir():
        shutil.copy(f, (root if f.name == meta.TOKENIZER else model) / f.name)
    (model / meta.CHECKLIST).write_text(meta.checklist_text(model, [f.name for f in model.iterdir()]))
    (root / "tokenizer_checklist.chk").write_text(meta.checklist_text(root, [meta.TOKENIZER]))
    return root


def _settings(url: str, **kw: object) -> BaseSettings:
    return BaseSettings(source=url, backoff=0.0, timeout=10.0, **kw)  # type: ignore[arg-type]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_cut_transfer_resumes_with_range_and_ends_verified(release: Path, tmp_path: Path) -> None:
    out = tmp_path / "base"
    with serve(release) as server:
        server.cut_once.add(SHARD0)
        result = download(out, _settings(server.url, model_size="7B"))
    size = (release / "7B/consolidated.00.pth").stat().st_size
    first, resumed = server.ranges(SHARD0)
    assert first is None and resumed is not None  # resumed, not restarted
    assert 0 < int(resumed.removeprefix("bytes=").rstrip("-")) <= size // 2
    assert sorted(result["files"]) == ["consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]
    for name in result["files"]:
        src = release / (name if name == meta.TOKENIZER else f"7B/{name}")
        assert _md5(out / name) == _md5(src)
    assert not (tmp_path / "base.partial").exists()
    assert not list(out.glob("*.part"))


def test_interrupted_run_resumes_on_the_next_run(release: Path, tmp_path: Path) -> None:
    out = tmp_path / "base"
    with serve(release) as server:
        server.cut_once.add(SHARD0)
        with pytest.raises(InputError, match=r"consolidated\.00\.pth: download failed after 1 attempt.*run again to resume"):
            download(out, _settings(server.url, model_size="7B", retries=1))
        assert (tmp_path / "base.partial/consolidated.00.pth.part").is_file()
        download(out, _settings(server.url, model_size="7B", retries=1))
        assert server.ranges(SHARD0)[-1] is not None and server.ranges(SHARD0)[-1].startswith("bytes=")
    assert _md5(out / "consolidated.00.pth") == _md5(release / SHARD0.lstrip("/"))


def test_corrupted_file_fails_naming_it_and_keeps_verified_files(release: Path, tmp_path: Path, capsys) -> None:
    bad = release / "7B/consolidated.01.pth"
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[:100] + bytes([good_bytes[100] ^ 0xFF]) + good_bytes[101:])
    out = tmp_path / "base"
    with serve(release) as server:
        argv = ["download", "--source", server.url, str(out), "--model-size", "7B", "--backoff", "0"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "checksum mismatch: consolidated.01.pth" in err
        partial = tmp_path / "base.partial"
        assert not out.exists()
        assert (partial / "consolidated.00.pth").is_file() and (partial / "params.json").is_file()
        assert (partial / "consolidated.01.pth.corrupt").is_file()
        # The server's copy is repaired: the next run fetches only the bad file.
        bad.write_bytes(good_bytes)
        before = len(server.ranges(SHARD0))
        assert main(argv) == 0
        assert len(server.ranges(SHARD0)) == before  # the verified shard was not downloaded again
    assert _md5(out / "consolidated.01.pth") == _md5(bad)


def test_server_errors_are_retried_with_exponential_backoff(release: Path, tmp_path: Path) -> None:
    from llama_pipe.weights.fetch import fetch, new_session

    delays: list[float] = []
    with serve(release) as server:
        server.fail_with["/7B/params.json"] = [503, 502, 500]
        fetch(new_session(), f"{server.url}/7B/params.json", tmp_path / "p.json", retries=4, backoff=0.5, sleep=delays.append)
        assert delays == [0.5, 1.0, 2.0]
        server.fail_with["/7B/params.json"] = [503, 503]
        with pytest.raises(InputError, match=r"params\.json: download failed after 2 attempt\(s\): HTTP 503"):
            fetch(new_session(), f"{server.url}/7B/params.json", tmp_path / "q.json", retries=2, backoff=0, sleep=delays.append)
    assert (tmp_path / "p.json").read_bytes() == (release / "7B/params.json").read_bytes()


def test_complete_part_file_from_a_killed_run_is_finished_without_refetching(release: Path, tmp_path: Path) -> None:
    partial = tmp_path / "base.partial"
    partial.mkdir()
    (partial / "consolidated.00.pth.part").write_bytes((release / SHARD0.lstrip("/")).read_bytes())
    with serve(release) as server:
        download(tmp_path / "base", _settings(server.url, model_size="7B"))
    size = (release / SHARD0.lstrip("/")).stat().st_size
    assert server.ranges(SHARD0) == [f"bytes={size}-"]  # answered 416: nothing more to send
    assert _md5(tmp_path / "base/consolidated.00.pth") == _md5(release / SHARD0.lstrip("/"))


def test_404_fails_naming_the_url(release: Path, tmp_path: Path) -> None:
    with serve(release) as server:
        with pytest.raises(InputError, match=rf"{server.url}/13B/checklist\.chk: HTTP 404"):
            download(tmp_path / "base", _settings(server.url, model_size="13B"))
        (release / "7B/consolidated.01.pth").unlink()  # listed in checklist.chk, missing on the server
        with pytest.raises(InputError, match=rf"{server.url}/7B/consolidated\.01\.pth: HTTP 404"):
            download(tmp_path / "base", _settings(server.url, model_size="7B"))


def test_flat_release_with_sha256_list_and_a_server_without_range(make_meta, tmp_path: Path) -> None:
    root = make_meta(n_shards=1)
    names = [f.name for f in root.iterdir()]
    (root / "SHA256SUMS").write_text(meta.checklist_text(root, names, algo="sha256"))
    out = tmp_path / "base"
    with serve(root) as server:
        server.ignore_range = True  # a resumed request gets the whole file again: start over
        server.cut_once.add("/consolidated.00.pth")
        download(out, _settings(server.url, checksums="SHA256SUMS"))
    assert sorted(p.name for p in out.iterdir() if p.name != MARKER) == sorted(names + ["SHA256SUMS"])
    assert _md5(out / "consolidated.00.pth") == _md5(root / "consolidated.00.pth")


def test_presigned_url_template_and_redaction() -> None:
    url = "https://dl.example.com/*?Policy=abc&Signature=secret"
    assert file_url(url, "7B/params.json") == "https://dl.example.com/7B/params.json?Policy=abc&Signature=secret"
    assert "secret" not in redact(file_url(url, "7B/params.json"))
    assert file_url("http://127.0.0.1:8/llama/", "tokenizer.model") == "http://127.0.0.1:8/llama/tokenizer.model"


def test_source_kinds() -> None:
    assert source_kind("tiny") == "tiny"
    assert source_kind("meta-llama/Llama-2-7b-hf") == "hf"
    assert source_kind("https://example.com/llama") == "url"
    with pytest.raises(ConfigError, match="expected 'tiny', a Hugging Face repo id"):
        source_kind("ftp://example.com/x")
    with pytest.raises(ConfigError, match="make-base"):
        download("unused", BaseSettings(source="tiny"))


def test_hf_allow_patterns_fetch_only_safetensors_config_and_tokenizer() -> None:
    from huggingface_hub.utils import filter_repo_objects

    from llama_pipe.weights.hf import ALLOW_PATTERNS, IGNORE_PATTERNS

    listing = [  # meta-llama/Llama-2-7b-hf's files, plus a Llama-3 style original/ folder
        ".gitattributes", "LICENSE.txt", "README.md", "USE_POLICY.md", "config.json", "generation_config.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
        "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json",
        "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
        "original/consolidated.00.pth", "original/params.json", "original/tokenizer.model",
        "original/model.safetensors",
    ]
    picked = set(filter_repo_objects(listing, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS))
    assert picked == {
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "special_tokens_map.json",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    }


def test_hf_offline_without_cache_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(InputError, match=r"offline mode \(HF_HUB_OFFLINE=1\) and the files are not cached"):
        download(tmp_path / "base", BaseSettings(source="meta-llama/Llama-2-7b-hf"))
    assert not (tmp_path / "base").exists()


def test_hf_repo_from_a_local_hub_honours_endpoint_and_token(
    tiny_hf_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF_ENDPOINT on 127.0.0.1: only safetensors/config/tokenizer files are fetched, with the token."""
    from huggingface_hub import constants

    from llama_pipe.config import ConvertSettings
    from llama_pipe.weights.convert import convert

    from .fakehub import fake_hub

    repo = tmp_path / "repo"
    shutil.copytree(tiny_hf_model_dir, repo)
    (repo / "pytorch_model.bin").write_bytes(b"a pickle that must not be fetched")
    (repo / "README.md").write_text("model card")
    (repo / "original").mkdir()
    (repo / "original/consolidated.00.pth").write_bytes(b"Meta weights, not needed")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    out = tmp_path / "base"
    with fake_hub("org/tiny-llama", repo) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        download(out, BaseSettings(source="org/tiny-llama"))
        with pytest.raises(InputError, match="repository not found"):
            download(tmp_path / "other", BaseSettings(source="org/missing"))
        assert hub.downloaded() == {p.name for p in tiny_hf_model_dir.iterdir()}
        # What `hf download` does: fill the cache. Offline, download then copies from the cache.
        from huggingface_hub import snapshot_download

        snapshot_download("org/tiny-llama", endpoint=hub.url)
        n_requests = len(hub.requests)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        download(tmp_path / "offline", BaseSettings(source="org/tiny-llama"))
        assert len(hub.requests) == n_requests  # nothing asked of the server
    assert _md5(tmp_path / "offline/model.safetensors") == _md5(tiny_hf_model_dir / "model.safetensors")
    assert not (tmp_path / "offline/pytorch_model.bin").exists()
    assert {auth for _, _, auth in hub.requests} == {"Bearer hf_test_token"}
    assert sorted(p.name for p in out.iterdir() if p.name != MARKER) == sorted(p.name for p in tiny_hf_model_dir.iterdir())
    assert not (tmp_path / "base.partial").exists()
    convert(out, tmp_path / "hf_base", ConvertSettings())  # validated and passed through
    assert (tmp_path / "hf_base/model.safetensors").is_file()
