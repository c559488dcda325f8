"""The server's guard rails, as a cross-check of the serve tests: it binds 127.0.0.1 by default,
bounds request size and max_tokens, and answers bad JSON with 400 while it keeps serving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.reliability import harness as h


@pytest.fixture(scope="module")
def small_server(tiny_hf_model_dir: Path):  # type: ignore[no-untyped-def]
    """The real ChatServer on the tiny model: default host, port 0, max_tokens 8, 8 KB bodies."""
    h.require_stage("serve")
    import threading

    from llama_pipe.config import ServeSettings
    from llama_pipe.serve.generate import load_chat_model
    from llama_pipe.serve.server import ChatServer

    settings = ServeSettings(port=0, max_tokens=8, max_request_bytes=8192, device="cpu")
    server = ChatServer(load_chat_model(tiny_hf_model_dir, device="cpu"), settings)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


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
