"""One file over HTTP(S): resume with Range after an interruption, retry with backoff, progress.

The bytes go to ``DEST.part``; a new attempt asks for ``Range: bytes=<size of .part>-`` and
appends, so an interrupted multi-GB transfer (network drop, killed job, a second run of the
stage) continues where it stopped. ``DEST`` appears only once the server's length is reached.

What a server says is checked, not trusted (a hostile or broken server ends in verified bytes or
an :class:`~llama_pipe.core.errors.InputError` naming the URL, never a traceback or a hang):

* **URLs**: only ``http``/``https`` with a host and a port from 1 to 65535; redirects are followed
  here (at most :data:`MAX_REDIRECTS`), each target checked the same way, a loop or a step from
  https down to http refused. Messages never show credentials or query strings (:func:`redact`).
* **Lengths**: ``Content-Length`` must be one plain decimal number; a 206's ``Content-Range``
  must start where the partial file ends, agree with its ``Content-Length`` and with the total
  size the server announced before (else the partial file is dropped and the transfer starts
  over); a body is never read past its announced length or past ``max_bytes`` (the caller's
  bound: an endless body is cut off and refused), nor past the free disk space.
* **Stalls**: a read that gets nothing for ``timeout`` seconds fails the attempt, and so does a
  trickle: fewer than :data:`MIN_SPEED` bytes per second over any ``timeout`` seconds. A failed
  attempt is retried (resuming), then the fetch fails with the bytes kept for the next run.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

from llama_pipe.core.errors import InputError

log = logging.getLogger(__name__)

FATAL_STATUS = {400, 401, 403, 404, 405, 410}
REDIRECT_STATUS = {301, 302, 303, 307, 308}
MAX_BACKOFF = 60.0
MAX_REDIRECTS = 10
#: Bytes per second a transfer must average over any ``timeout`` seconds (curl's --speed-limit);
#: a server that sends one byte every few seconds fails the attempt instead of holding it forever.
MIN_SPEED = 1024
#: Free space left on the disk when a server sends a body of unknown length.
DISK_MARGIN = 64 << 20
CHUNK = 1 << 16
_DECIMAL = re.compile(r"[0-9]{1,19}")
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)")


class RetryableError(Exception):
    """A transfer problem worth another attempt (connection drop, 5xx, short body, stall)."""


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


_USERINFO = re.compile(r"(//)[^/?#@\s]*@")
_QUERY = re.compile(r"\?[^\s'\"()<>]+")


def redact(url: str) -> str:
    """The URL without credentials: no ``user:password@``, no query string (presigned URLs carry
    their signature there), no fragment. Never raises, also for a URL that does not parse."""
    text = _USERINFO.sub(r"\1", url.split("#", 1)[0])
    return _QUERY.sub("?...", text)


def scrub(text: str, limit: int = 200) -> str:
    """``text`` (an exception's message) with every URL in it redacted, on one line, at most ``limit`` characters."""
    text = " ".join(_QUERY.sub("?...", _USERINFO.sub(r"\1", text)).split())
    return text if len(text) <= limit else text[:limit] + "..."


def check_url(url: str, schemes: tuple[str, ...] = ("http", "https")) -> None:
    """An :class:`InputError` naming ``url`` (redacted) unless it is an absolute URL of one of
    ``schemes`` with a host and, if given, a port from 1 to 65535."""
    where = redact(url)
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise InputError(f"{where!r}: not a URL (it holds a space or a control character)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a bad IPv6 literal, a non-numeric or out-of-range port
        hint = "; the port must be a number from 1 to 65535" if "port" in str(exc).lower() else ""
        raise InputError(f"{where}: not a usable URL ({exc}){hint}") from None
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        raise InputError(f"{where}: the scheme {scheme + ':' if scheme else '(none)'} is not allowed here; use {' or '.join(s + '://' for s in schemes)}")
    if scheme == "file":
        return
    if not parts.hostname:
        raise InputError(f"{where}: no host in the URL")
    if port == 0:
        raise InputError(f"{where}: port 0 is not a port to connect to; the port must be from 1 to 65535")


def content_length(headers: Any) -> int | None:
    """The body length a response announces: None without one; a RetryableError unless it is one
    plain decimal number (``+66``, ``6_6``, ``0x42``, ``66, 66`` and duplicates are refused)."""
    values = headers.get("Content-Length")
    if values is None:
        return None
    if not _DECIMAL.fullmatch(values):
        raise RetryableError(f"the server sent Content-Length {values[:40]!r}, not one plain number")
    return int(values)


def new_session() -> Any:
    """A requests session whose connections give a response's status line and headers, as a
    whole, the read timeout: a server that trickles its headers cannot hold an attempt for ever."""
    import requests

    session = requests.Session()
    session.headers["User-Agent"] = "llama-pipe"
    adapter = _head_deadline_adapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _head_deadline_adapter() -> Any:
    import threading

    from requests.adapters import HTTPAdapter
    from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, PoolManager
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.exceptions import ProtocolError

    def abort(sock: Any, fired: threading.Event) -> None:
        fired.set()
        try:
            sock.shutdown(2)  # SHUT_RDWR: the blocked header read returns
        except OSError:
            pass

    class Deadline:
        def getresponse(self, *args: Any, **kwargs: Any) -> Any:
            limit, sock = getattr(self, "timeout", None), getattr(self, "sock", None)
            if not (isinstance(limit, (int, float)) and limit > 0 and sock is not None):
                return super().getresponse(*args, **kwargs)  # type: ignore[misc]
            fired = threading.Event()
            timer = threading.Timer(limit, abort, (sock, fired))
            timer.daemon = True
            timer.start()
            try:
                response = super().getresponse(*args, **kwargs)  # type: ignore[misc]
            finally:
                timer.cancel()
            if fired.is_set():  # headers cut short by the deadline are no answer: the attempt fails, and is retried
                response.close()
                raise ProtocolError(f"the response headers did not arrive within {limit:g} s")
            return response

    class Http(Deadline, HTTPConnection):
        pass

    class Https(Deadline, HTTPSConnection):
        pass

    class HttpPool(HTTPConnectionPool):
        ConnectionCls = Http

    class HttpsPool(HTTPSConnectionPool):
        ConnectionCls = Https

    def with_deadline(manager: Any) -> Any:
        if isinstance(manager, PoolManager):
            manager.pool_classes_by_scheme = {"http": HttpPool, "https": HttpsPool}
        return manager

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            with_deadline(self.poolmanager)

        def proxy_manager_for(self, proxy: Any, **kwargs: Any) -> Any:
            return with_deadline(super().proxy_manager_for(proxy, **kwargs))

    return Adapter()


def fetch(
    session: Any,
    url: str,
    dest: Path,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
    max_bytes: int | None = None,
    min_speed: float = MIN_SPEED,
) -> int:
    """Download ``url`` to ``dest`` (resuming ``dest.part``); return the file's size in bytes.

    Missing or forbidden files (404, 403, ...), a bad URL or redirect, and a body longer than it
    may be (its announced length, ``max_bytes``) fail at once with an :class:`InputError` naming
    the URL; connection errors, 5xx, short bodies and stalls (nothing for ``timeout`` seconds, or
    under ``min_speed`` bytes/s over ``timeout`` seconds) are retried ``retries`` times in all,
    waiting ``backoff``, ``2*backoff``, ... seconds (at most 60).
    """
    import requests
    import urllib3

    check_url(url)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    known: dict[str, int] = {}  # "total": the file's size as the server first announced it
    transient = (RetryableError, requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                 urllib3.exceptions.ProtocolError, urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.SSLError)
    for attempt in range(1, retries + 1):
        try:
            return _attempt(session, url, dest, part, timeout, max_bytes, min_speed, known)
        except InputError:
            raise
        except transient as exc:
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
        except (requests.RequestException, urllib3.exceptions.HTTPError, ValueError) as exc:
            raise InputError(f"{redact(url)}: download failed: {_short(exc)}") from None
        except OSError as exc:  # our side: a full disk, a permission
            raise InputError(f"{part}: {exc.strerror or exc} while downloading {redact(url)}") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _short(exc: BaseException) -> str:
    return scrub(str(exc) or type(exc).__name__)


def _open(session: Any, url: str, headers: dict[str, str], timeout: float) -> Any:
    """GET ``url``, following redirects here: each target must pass :func:`check_url`, none may
    come twice (a loop) or step down from https to http, and there are at most MAX_REDIRECTS."""
    seen = [url]
    while True:
        r = session.get(url, headers=headers, stream=True, timeout=(timeout, timeout), allow_redirects=False)
        if r.status_code not in REDIRECT_STATUS:
            return r
        location = r.headers.get("Location")
        r.close()
        if not location:
            raise InputError(f"{redact(seen[0])}: HTTP {r.status_code} redirect without a Location")
        target = urljoin(url, location.strip())
        try:
            check_url(target)
        except InputError as exc:
            raise InputError(f"{redact(seen[0])}: redirected to {exc}") from None
        if urlsplit(url).scheme.lower() == "https" and urlsplit(target).scheme.lower() == "http":
            raise InputError(f"{redact(seen[0])}: redirected from https to plain http ({redact(target)}); refused")
        if target in seen:
            raise InputError(f"{redact(seen[0])}: redirect loop (back to {redact(target)} after {len(seen)} step(s))")
        if len(seen) > MAX_REDIRECTS:
            raise InputError(f"{redact(seen[0])}: more than {MAX_REDIRECTS} redirects")
        seen.append(target)
        url = target


def _attempt(session: Any, url: str, dest: Path, part: Path, timeout: float, max_bytes: int | None,
             min_speed: float, known: dict[str, int]) -> int:
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    # identity: a Range counts bytes of the file itself; close: bytes past a lying Content-Length
    # never reach the next request's response on a kept-alive connection.
    headers = {"Accept-Encoding": "identity", "Connection": "close"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with _open(session, url, headers, timeout) as r:
        if r.status_code == 416 and have:
            # Nothing left to send: the .part may already be complete.
            m = re.fullmatch(r"bytes \*/([0-9]{1,19})", r.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == have and known.get("total", have) == have and (max_bytes is None or have <= max_bytes):
                part.replace(dest)
                return have
            part.unlink()
            raise RetryableError(f"HTTP 416 for a {have}-byte partial file; starting over")
        if r.status_code in FATAL_STATUS:
            raise InputError(f"{redact(url)}: HTTP {r.status_code} {r.reason}; check the URL (and base.model_size)")
        if r.status_code == 429 or r.status_code >= 500:
            raise RetryableError(f"HTTP {r.status_code} {r.reason}")
        encoding = r.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise InputError(f"{redact(url)}: the server sent the file encoded ({encoding}) though identity was asked for")
        length = content_length(r.headers)
        if r.status_code == 206:
            m = _CONTENT_RANGE.fullmatch(r.headers.get("Content-Range", ""))
            first, last = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
            total: int | None = int(m.group(3)) if m and m.group(3) != "*" else None
            if (not have or not m or first != have or last < first or (total is not None and last >= total)
                    or (length is not None and length != last - first + 1)):
                part.unlink(missing_ok=True)
                raise RetryableError(f"server answered Range bytes={have}- with 206 and Content-Range "
                                     f"{r.headers.get('Content-Range')!r:.80}, Content-Length {length}; starting over")
            limit: int | None = last + 1
            mode = "ab"
        elif r.status_code == 200:
            if have:
                log.info("%s: server ignored the Range request; downloading from the start", redact(url))
            have = 0
            total = limit = length
            mode = "wb"
        else:
            raise InputError(f"{redact(url)}: unexpected HTTP {r.status_code} {r.reason}")
        if total is not None and "total" in known and total != known["total"]:
            part.unlink(missing_ok=True)
            was = known.pop("total")
            raise RetryableError(f"the file is now {total} bytes on the server, {was} before; starting over")
        if total is not None:
            known["total"] = total
        if max_bytes is not None and (total or limit or 0) > max_bytes:
            part.unlink(missing_ok=True)
            raise InputError(f"{redact(url)}: the server announces {total or limit} bytes; at most {max_bytes} are expected here")
        if limit is None:
            limit = have + max(0, shutil.disk_usage(part.parent).free - DISK_MARGIN)
            why = "the free disk space"
            if max_bytes is not None and max_bytes <= limit:
                limit, why = max_bytes, "the most this file may have"
        else:
            why = "the length the server announced"
            free = shutil.disk_usage(part.parent).free
            if limit - have > free:
                raise InputError(f"{redact(url)}: {limit - have} more bytes to download and {free} free on {part.parent}")
        got = have
        window_start, window_bytes = time.monotonic(), 0
        with open(part, mode) as fh, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, disable=None, leave=False
        ) as bar:
            while True:
                # read1: whatever has arrived (at most CHUNK), so a trickle is measured as it comes
                chunk = r.raw.read1(CHUNK, decode_content=False)
                if not chunk:
                    break
                if got + len(chunk) > limit:
                    fh.close()
                    part.unlink(missing_ok=True)
                    raise InputError(f"{redact(url)}: the server sent more than {limit} bytes ({why}); refused")
                fh.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
                window_bytes += len(chunk)
                elapsed = time.monotonic() - window_start
                if elapsed >= timeout:
                    if window_bytes < min_speed * elapsed:
                        raise RetryableError(f"stalled: {window_bytes} bytes in {elapsed:.1f} s, under {min_speed:g} bytes/s")
                    window_start, window_bytes = time.monotonic(), 0
    size = part.stat().st_size
    if total is not None and size != total:
        raise RetryableError(f"connection closed at byte {size} of {total}")
    part.replace(dest)
    return size
