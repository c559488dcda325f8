"""One file over HTTP(S): resume with Range after an interruption, retry with backoff, progress.

The bytes go to ``DEST.part``; a new attempt asks for ``Range: bytes=<size of .part>-`` and
appends, so an interrupted multi-GB transfer (network drop, killed job, a second run of the
stage) continues where it stopped. ``DEST`` appears only once the server's length is reached.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from llama_pipe.errors import InputError

log = logging.getLogger(__name__)

FATAL_STATUS = {400, 401, 403, 404, 405, 410}
MAX_BACKOFF = 60.0


class RetryableError(Exception):
    """A transfer problem worth another attempt (connection drop, 5xx, short body)."""


def file_url(base: str, rel: str) -> str:
    """URL of ``rel`` under a release URL.

    ``base`` is either a plain base URL (``https://host/llama``) or a presigned URL with ``*``
    where the file path goes, as in Meta's download e-mails (``https://host/*?Policy=...``).
    """
    path = quote(rel)
    if "*" in base:
        return base.replace("*", path, 1)
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + path))


def redact(url: str) -> str:
    """The URL without its query string (presigned URLs carry credentials there)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query="...")) if parts.query else url


def new_session() -> Any:
    import requests

    session = requests.Session()
    session.headers["User-Agent"] = "llama-pipe"
    return session


def fetch(
    session: Any,
    url: str,
    dest: Path,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Download ``url`` to ``dest`` (resuming ``dest.part``); return the file's size in bytes.

    Missing or forbidden files (404, 403, ...) fail at once with an :class:`InputError` naming the
    URL; connection errors, 5xx and short bodies are retried ``retries`` times in all, waiting
    ``backoff``, ``2*backoff``, ... seconds (at most 60).
    """
    import requests

    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, retries + 1):
        try:
            return _attempt(session, url, dest, part, timeout)
        except (RetryableError, requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            have = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                raise InputError(
                    f"{redact(url)}: download failed after {retries} attempt(s): {_short(exc)}; "
                    f"{have} bytes kept in {part}, run again to resume"
                ) from None
            delay = min(MAX_BACKOFF, backoff * 2 ** (attempt - 1))
            log.warning(
                "%s: attempt %d/%d failed (%s) at byte %d; retrying in %.1f s",
                redact(url), attempt, retries, _short(exc), have, delay,
            )
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "..."


def _attempt(session: Any, url: str, dest: Path, part: Path, timeout: float) -> int:
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with session.get(url, headers=headers, stream=True, timeout=(timeout, timeout)) as r:
        if r.status_code == 416 and have:
            # Nothing left to send: the .part may already be complete.
            m = re.match(r"bytes \*/(\d+)", r.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == have:
                part.replace(dest)
                return have
            part.unlink()
            raise RetryableError(f"HTTP 416 for a {have}-byte partial file; starting over")
        if r.status_code in FATAL_STATUS:
            raise InputError(f"{redact(url)}: HTTP {r.status_code} {r.reason}; check the URL (and base.model_size)")
        if r.status_code == 429 or r.status_code >= 500:
            raise RetryableError(f"HTTP {r.status_code} {r.reason}")
        if r.status_code == 206:
            m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", r.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                part.unlink(missing_ok=True)
                raise RetryableError(f"server answered Range bytes={have}- with {r.headers.get('Content-Range')!r}")
            total: int | None = int(m.group(3)) if m.group(3) != "*" else None
            mode = "ab"
        elif r.status_code == 200:
            if have:
                log.info("%s: server ignored the Range request; downloading from the start", redact(url))
            have = 0
            length = r.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
        else:
            raise InputError(f"{redact(url)}: unexpected HTTP {r.status_code} {r.reason}")
        with open(part, mode) as fh, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, disable=None, leave=False
        ) as bar:
            # Small reads: bytes of a read cut short by a dropped connection are lost, so keep it short.
            for chunk in r.iter_content(chunk_size=1 << 16):
                fh.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        raise RetryableError(f"connection closed at byte {size} of {total}")
    part.replace(dest)
    return size
