"""serve: the official openai client against our server (plain and streaming), and bad requests."""

from __future__ import annotations

import http.client
import json
import socket

import openai
import pytest

from llama_pipe.models.generation import SamplingParams

HELLO = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else {}


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_is_the_models_own_greedy_reply(client: openai.OpenAI, chat_model) -> None:
    resp = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=20, temperature=0)
    expected = chat_model.complete(HELLO, SamplingParams(max_new_tokens=20, temperature=0))
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert resp.usage.prompt_tokens == len(chat_model.prompt_ids(HELLO))
    assert resp.usage.completion_tokens == expected.completion_tokens <= 20
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streaming_matches_the_plain_reply(client: openai.OpenAI) -> None:
    kwargs = dict(model="tiny", messages=HELLO, max_tokens=40, temperature=0.8, seed=7)
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == plain and len(deltas) > 1
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    def ask(seed: int) -> str:
        r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=30, temperature=1.0, seed=seed)
        return r.choices[0].message.content

    assert ask(1) == ask(1)
    assert len({ask(s) for s in (1, 2, 3)}) > 1


def test_stop_string_cuts_the_reply(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=40, temperature=0).choices[0].message.content
    assert len(full) > 10
    stop = full[5:8]
    cut = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=40, temperature=0, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.index(stop)] and cut.finish_reason == "stop"
    streamed = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=40, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut.message.content


def test_client_errors_are_4xx_json(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="exceeds this server's limit"):
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=10_000)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4", messages=HELLO)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=HELLO, temperature=5)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "text"),
    [
        ("POST", "/v1/chat/completions", b"{not json", 400, "not valid JSON"),
        ("POST", "/v1/chat/completions", b"\xff\xfe", 400, "not valid JSON"),
        ("POST", "/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
        ("POST", "/v1/chat/completions", b'{"messages": []}', 400, "non-empty"),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', 400, "content"),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": ["user"], "content": "x"}]}', 400, "role"),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "assistant", "content": "hi"}]}', 400, "last message"),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}', 400, "max_tokens"),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "temperature"),
        ("POST", "/v1/chat/completions", b"[" * 3000, 400, "not valid JSON"),
        ("POST", "/v1/chat/completions", b"x" * 5000, 413, "exceeds the limit"),
        ("POST", "/v1/completions", b"{}", 404, "no route"),
        ("GET", "/nope", None, 404, "no route"),
        ("DELETE", "/v1/models", None, 405, "not allowed"),
    ],
)
def test_bad_requests(server, method: str, path: str, body: bytes | None, status: int, text: str) -> None:
    code, payload = raw(server, method, path, body, {"Content-Type": "application/json"})
    assert code == status
    assert text in payload["error"]["message"] and payload["error"]["type"] == "invalid_request_error"
    assert raw(server, "GET", "/health") == (200, {"status": "ok"})


def test_conversation_longer_than_the_context_is_refused(server) -> None:
    text = "龘" * 1100  # 3.3 kB of UTF-8 (under the 4 kB limit), byte-fallback tokens: > 1024-token context
    body = json.dumps({"messages": [{"role": "user", "content": text}]}, ensure_ascii=False).encode()
    code, payload = raw(server, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    assert code == 400 and "context" in payload["error"]["message"]
    assert payload["error"]["code"] == "context_length_exceeded"


def test_client_that_disconnects_mid_stream_does_not_block_the_server(slow_server, server) -> None:
    host, port = slow_server.server_address[:2]
    body = json.dumps({"messages": HELLO, "stream": True, "max_tokens": 64}).encode()
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert b"200 OK" in s.recv(4096)
    # The generation lock was released: the next request is answered.
    c = openai.OpenAI(base_url=slow_server.url + "/v1", api_key="x", max_retries=0, timeout=30)
    assert c.chat.completions.create(model="tiny-slow", messages=HELLO, max_tokens=3).choices[0].finish_reason == "length"


def test_web_page_is_served(server) -> None:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/")
    resp = conn.getresponse()
    page = resp.read().decode()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/html")
    assert "/v1/chat/completions" in page and 'id="prompt"' in page


def test_serve_command_starts_answers_and_stops_cleanly_on_sigterm(tiny_hf_model_dir) -> None:
    import os
    import re
    import signal
    import subprocess
    import sys
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_pipe.cli", "serve", str(tiny_hf_model_dir), "--port", "0", "--model-id", "cli-model", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stdout.readline()
        url = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
        assert url, f"unexpected first line: {line!r}"
        with urllib.request.urlopen(url.group(1) + "/v1/models", timeout=30) as r:
            assert json.load(r)["data"][0]["id"] == "cli-model"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_concurrent_requests_are_serialised_and_all_answered(client: openai.OpenAI) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def ask(seed: int) -> str:
        r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=1.0, seed=seed)
        return r.choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(ask, range(4)))
    assert parallel == [ask(s) for s in range(4)]
