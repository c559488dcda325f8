"""The server's guard rails, as a cross-check of the serve tests: it binds 127.0.0.1 by default,
bounds request size and max_tokens, and answers bad JSON with 400 while it keeps serving."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.reliability import harness as h


@pytest.fixture(scope="module")
def tiny_chat(tiny_hf_model_dir: Path):  # type: ignore[no-untyped-def]
    h.require_stage("serve")
    from llama_pipe.models.generation import load_chat_model

    return load_chat_model(tiny_hf_model_dir, device="cpu", model_id="tiny")


@contextmanager
def running(model, **overrides: object) -> Iterator:  # type: ignore[no-untyped-def,type-arg]
    """A real ChatServer on 127.0.0.1 (port 0) in a thread, shut down on exit."""
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


@pytest.fixture(scope="module")
def small_server(tiny_chat):  # type: ignore[no-untyped-def]
    """The real ChatServer on the tiny model: default host, port 0, max_tokens 8, 8 KB bodies."""
    with running(tiny_chat) as server:
        yield server


def _post(server, body: bytes) -> tuple[int, dict[str, object]]:  # type: ignore[no-untyped-def]
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else {}


def test_server_defaults_and_limits(small_server) -> None:  # type: ignore[no-untyped-def]
    """Binds 127.0.0.1 by default; a body over max_request_bytes is 413; max_tokens above the
    limit is 400; malformed JSON is 400; and the server still answers a good request after."""
    from llama_pipe.config import ServeSettings

    assert ServeSettings().host == "127.0.0.1"
    assert small_server.server_address[0] == "127.0.0.1"
    msg = {"messages": [{"role": "user", "content": "hello"}]}
    status, body = _post(small_server, b'{"messages": [')
    assert status == 400 and "error" in body, body
    status, body = _post(small_server, b"\xff\xfe not json")
    assert status == 400, body
    status, body = _post(small_server, json.dumps({**msg, "pad": "x" * 9000}).encode())
    assert status == 413, body
    status, body = _post(small_server, json.dumps({**msg, "max_tokens": 9}).encode())
    assert status == 400 and "max_tokens" in json.dumps(body), body
    status, body = _post(small_server, json.dumps({**msg, "max_tokens": 4, "temperature": 0}).encode())
    assert status == 200, body
    assert body["usage"]["completion_tokens"] <= 4, body  # type: ignore[index]


def test_server_unparsable_json_is_400(small_server) -> None:  # type: ignore[no-untyped-def]
    """Valid-looking JSON that Python's parser gives up on (3,000-level nesting, a 5,000-digit
    number) is the client's error: 400, not a 500; and the server keeps serving."""
    msg = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    status, body = _post(small_server, b"[" * 3000 + b"]" * 3000)
    assert status == 400, (status, body)
    status, body = _post(small_server, b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}")
    assert status == 400, (status, body)
    status, body = _post(small_server, json.dumps(msg).encode())
    assert status == 200, body


# ----------------------------------------------------------------------------- bursts and limits

HELLO = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}


def _request(server, method: str = "POST", path: str = "/v1/chat/completions", body: object = HELLO,  # type: ignore[no-untyped-def]
             headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, dict[str, str], object]:
    """One request on its own connection: (status, headers, JSON body or raw text)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=timeout)
    try:
        raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json"} if raw is not None else {}
        hdrs.update(headers or {})
        conn.request(method, path, body=raw, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    heads = {k.lower(): v for k, v in resp.getheaders()}
    if heads.get("content-type", "").startswith("application/json"):
        return resp.status, heads, json.loads(data)
    return resp.status, heads, data.decode("utf-8", "replace")


def _assert_next_good(server) -> None:  # type: ignore[no-untyped-def]
    status, _, body = _request(server)
    assert status == 200, body


def _assert_busy(status: int, heads: dict[str, str], body: object) -> None:
    assert status == 503, (status, body)
    assert heads.get("retry-after", "").isdigit(), heads
    assert isinstance(body, dict) and body["error"]["code"] == "server_busy", body


@pytest.mark.parametrize("limits", [pytest.param({}, marks=pytest.mark.slow), {"max_connections": 8, "max_queue": 2}], ids=["defaults", "tight"])
def test_burst_of_50_clients_all_get_an_http_answer(tiny_chat, limits: dict[str, int]) -> None:  # type: ignore[no-untyped-def]
    """50 clients x 4 requests at once (Python's default backlog of 5 reset a third of them): each
    request gets a 200, or a JSON 503 with Retry-After when a limit is reached; no connection is
    reset or refused, and the server answers a good request afterwards."""
    with running(tiny_chat, **limits) as server:
        results: list[tuple[int, dict[str, str], object]] = []
        failures: list[BaseException] = []
        start = threading.Barrier(50)

        def client() -> None:
            try:
                start.wait(30)
                for _ in range(4):
                    results.append(_request(server))
            except BaseException as exc:  # noqa: BLE001 - collected and reported below
                failures.append(exc)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        assert not failures, f"{len(failures)} request(s) failed at the transport level, e.g. {failures[0]!r}"
        assert len(results) == 200
        for status, heads, body in results:
            if status != 200:
                _assert_busy(status, heads, body)
        assert any(r[0] == 200 for r in results)
        _assert_next_good(server)


def test_connections_over_the_limit_get_503_and_are_closed(tiny_chat) -> None:  # type: ignore[no-untyped-def]
    with running(tiny_chat, max_connections=2) as server:
        idle = [socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) for _ in range(2)]
        try:
            time.sleep(0.2)
            _assert_busy(*_request(server))
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 10
        while server.gate.open and time.monotonic() < deadline:  # closed idle connections free their slots
            time.sleep(0.05)
        _assert_next_good(server)


def _slow_model(tiny_chat):  # type: ignore[no-untyped-def]
    from tests.serve.conftest import SlowChatModel

    slow = SlowChatModel(tiny_chat.model, tiny_chat.tokenizer, tiny_chat.template, "tiny")
    slow.stop_ids = set()  # every reply runs to max_tokens: 60 x 15 ms holds the model ~1 s
    return slow


@pytest.mark.parametrize("stream", [False, True])
def test_full_generation_queue_is_503_before_any_stream_starts(tiny_chat, stream: bool) -> None:  # type: ignore[no-untyped-def]
    with running(_slow_model(tiny_chat), max_queue=0, max_tokens=64) as server:
        holder = threading.Thread(target=_request, args=(server,), kwargs={"body": {**HELLO, "max_tokens": 60}}, daemon=True)
        holder.start()
        deadline = time.monotonic() + 10
        while not server.queue.lock.locked() and time.monotonic() < deadline:
            time.sleep(0.01)
        _assert_busy(*_request(server, body={**HELLO, "stream": stream}))
        holder.join(60)
        _assert_next_good(server)


def test_request_waiting_longer_than_queue_timeout_is_503(tiny_chat) -> None:  # type: ignore[no-untyped-def]
    with running(_slow_model(tiny_chat), max_queue=4, queue_timeout=0.2, max_tokens=64) as server:
        holder = threading.Thread(target=_request, args=(server,), kwargs={"body": {**HELLO, "max_tokens": 60}}, daemon=True)
        holder.start()
        deadline = time.monotonic() + 10
        while not server.queue.lock.locked() and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        status, heads, body = _request(server)
        _assert_busy(status, heads, body)
        assert "stayed busy" in body["error"]["message"] and time.monotonic() - t0 < 5  # type: ignore[index]
        holder.join(60)
        _assert_next_good(server)


def _read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """All the server sends until it closes the connection (at most ``limit`` s): (bytes, seconds)."""
    t0 = time.monotonic()
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data, time.monotonic() - t0


@pytest.mark.parametrize("part", ["headers", "body"])
def test_trickled_request_gets_408_within_request_timeout(tiny_chat, part: str) -> None:  # type: ignore[no-untyped-def]
    """A client that sends a byte now and then (each well within any per-read timeout) is cut off
    once the whole request has taken request_timeout: 408 JSON, connection closed."""
    with running(tiny_chat, request_timeout=1.0) as server:
        s = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10)
        with s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            if part == "body":
                s.sendall(b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            t0 = time.monotonic()
            try:
                for _ in range(40):  # 4 s of trickling at most
                    time.sleep(0.1)
                    s.sendall(b"X-Slow: 1\r\n" if part == "headers" else b" ")
            except OSError:
                pass  # the server closed the connection: what is expected
            data, _ = _read_until_closed(s, 5)
            assert time.monotonic() - t0 < 4.5, "the trickling client was not cut off"
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        assert b'"request_timeout"' in data
        _assert_next_good(server)


def test_idle_connection_is_closed_quietly(tiny_chat) -> None:  # type: ignore[no-untyped-def]
    with running(tiny_chat, request_timeout=0.5) as server:
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
            data, took = _read_until_closed(s, 5)
        assert data == b"" and took < 3
        _assert_next_good(server)


# ----------------------------------------------------------------------------- hostile values


def test_extreme_sampling_values_are_handled_or_refused(small_server) -> None:  # type: ignore[no-untyped-def]
    """temperature / top_p of 1e-300 sample like greedy (not a NaN crash); a seed beyond what the
    generator takes is 400 naming 'seed' (streaming too: no 200 then an in-band error)."""
    _, _, greedy = _request(small_server)
    for field in ("temperature", "top_p"):
        status, _, body = _request(small_server, body={**HELLO, "temperature": 1.0, field: 1e-300, "seed": 1})
        assert status == 200, body
        if field == "temperature":
            assert body["choices"][0]["message"] == greedy["choices"][0]["message"]  # type: ignore[index]
    for seed in (2**64, -(2**63) - 1, 10**30):
        for stream in (False, True):
            status, _, body = _request(small_server, body={**HELLO, "temperature": 1.0, "seed": seed, "stream": stream})
            assert status == 400 and body["error"]["param"] == "seed", body  # type: ignore[index]
    status, _, body = _request(small_server, body={**HELLO, "temperature": 1.0, "seed": 2**64 - 1})
    assert status == 200, body
    _assert_next_good(small_server)


@pytest.mark.parametrize("stream", [False, True])
def test_lone_surrogate_is_400_naming_the_field(small_server, stream: bool) -> None:  # type: ignore[no-untyped-def]
    raw = b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}], "max_tokens": 2, "stream": %s}' % (
        b"true" if stream else b"false")
    status, _, body = _request(small_server, body=raw)
    assert status == 400 and body["error"]["param"] == "messages[0].content", body  # type: ignore[index]
    raw = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stop": ["\\udfff"]}'
    status, _, body = _request(small_server, body=raw)
    assert status == 400 and body["error"]["param"] == "stop", body  # type: ignore[index]
    _assert_next_good(small_server)


@pytest.mark.parametrize("method", ["FOO", "PUT", "DELETE", "TRACE", "CONNECT", "PATCH"])
def test_unknown_methods_are_json_405_with_allow(small_server, method: str) -> None:  # type: ignore[no-untyped-def]
    status, heads, body = _request(small_server, method, "/v1/chat/completions", body=None)
    assert status == 405 and heads.get("allow") == "GET, HEAD, POST, OPTIONS", (status, heads, body)
    assert isinstance(body, dict) and body["error"]["code"] == "method_not_allowed", body
    _assert_next_good(small_server)


def test_protocol_errors_are_json(small_server) -> None:  # type: ignore[no-untyped-def]
    """What http.server refuses by itself (an over-long header line, a bad request line) is JSON."""
    for raw in (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", b"GARBAGE\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", small_server.server_address[1]), timeout=10) as s:
            s.sendall(raw)
            data, _ = _read_until_closed(s, 10)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] in (b"400", b"431"), head
        assert b"application/json" in head and "error" in json.loads(body), data[:300]
    _assert_next_good(small_server)


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
def test_non_json_bodies_are_415(small_server, ctype: str | None) -> None:  # type: ignore[no-untyped-def]
    """A form or text body (what a cross-site page can send without a preflight) is refused."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", small_server.server_address[1], timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    raw = json.dumps(HELLO).encode()
    if ctype:
        conn.putheader("Content-Type", ctype)
    conn.putheader("Content-Length", str(len(raw)))
    conn.endheaders(raw)
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 415 and body["error"]["code"] == "unsupported_media_type", body
    status, _, _ = _request(small_server, headers={"Content-Type": "application/json; charset=utf-8"})
    assert status == 200


# ----------------------------------------------------------------------------- Host and Origin


def test_foreign_host_is_refused_dns_rebinding(small_server) -> None:  # type: ignore[no-untyped-def]
    """A page on evil.example re-pointed at 127.0.0.1 sends Host: evil.example: 403 on every
    route, so it can neither drive generation nor read a reply, not even /v1/models."""
    port = small_server.server_address[1]
    for method, path, body in (("POST", "/v1/chat/completions", HELLO), ("GET", "/v1/models", None), ("GET", "/", None)):
        for origin in (None, f"http://evil.example:{port}"):
            headers = {"Host": f"evil.example:{port}", **({"Origin": origin} if origin else {})}
            status, _, reply = _request(small_server, method, path, body, headers)
            assert status == 403 and reply["error"]["code"] == "host_not_allowed", (method, path, reply)  # type: ignore[index]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        status, _, _ = _request(small_server, "GET", "/v1/models", None, {"Host": host})
        assert status == 200, host


def test_cross_site_page_cannot_drive_generation(small_server) -> None:  # type: ignore[no-untyped-def]
    port = small_server.server_address[1]
    for origin in ("http://evil.example", "null", f"http://localhost:{port + 1}", f"https://127.0.0.1:{port}x"):
        status, heads, body = _request(small_server, headers={"Origin": origin})
        assert status == 403 and body["error"]["code"] == "origin_not_allowed", (origin, body)  # type: ignore[index]
        assert "access-control-allow-origin" not in heads
    # The server's own page (what the web chat's fetch sends) passes.
    status, heads, _ = _request(small_server, headers={"Origin": f"http://127.0.0.1:{port}"})
    assert status == 200 and "access-control-allow-origin" not in heads


def test_listed_origin_and_host_are_allowed(tiny_chat) -> None:  # type: ignore[no-untyped-def]
    with running(tiny_chat, allowed_origins=["http://localhost:3000"], allowed_hosts=["chatbox.lan"]) as server:
        status, heads, _ = _request(server, headers={"Origin": "http://localhost:3000"})
        assert status == 200 and heads.get("access-control-allow-origin") == "http://localhost:3000"
        status, heads, _ = _request(server, "OPTIONS", body=None, headers={"Origin": "http://localhost:3000",
                                                                             "Access-Control-Request-Method": "POST"})
        assert status == 204 and "POST" in heads.get("access-control-allow-methods", ""), heads
        status, _, _ = _request(server, "OPTIONS", body=None, headers={"Origin": "http://evil.example"})
        assert status == 403
        status, _, _ = _request(server, "GET", "/v1/models", None, {"Host": "chatbox.lan:8000"})
        assert status == 200
        status, _, _ = _request(server, "GET", "/v1/models", None, {"Host": "other.lan:8000"})
        assert status == 403


# ----------------------------------------------------------------------------- chat (terminal)


def test_chat_refuses_out_of_range_seed_and_undecodable_prompt(tiny_hf_model_dir: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    for extra, words in ((["--seed", str(2**64)], "--seed"), (["--prompt", "a\udcff b"], "--prompt")):
        argv = ["chat", str(tiny_hf_model_dir), "--device", "cpu", "--max-tokens", "2", "--prompt", "hi", *extra]
        rc, err = h.run_cli(argv, capsys)
        assert rc == 2 and "Traceback" not in err and words in err, err


def test_pipelined_requests_are_all_answered(small_server) -> None:  # type: ignore[no-untyped-def]
    """Two requests sent back to back on one connection (HTTP/1.1 pipelining) both get answers:
    the wait for a next request also looks at what is already buffered."""
    req = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", small_server.server_address[1]), timeout=10) as s:
        s.sendall(req + req + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data, took = _read_until_closed(s, 10)
    assert data.count(b"HTTP/1.1 200") == 3 and took < 5, data
