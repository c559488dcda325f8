"""``llama-pipe serve MODEL``: an OpenAI-compatible HTTP server plus a web chat page.

Endpoints: ``GET /`` (the chat page), ``GET /v1/models``, ``POST /v1/chat/completions`` (JSON, or
server-sent events with ``"stream": true``), ``GET /health``. Standard library only
(``ThreadingHTTPServer``); requests are parsed concurrently but generation is serialised with a
lock (one model, one batch). Every bad request gets a 4xx and an OpenAI-style JSON error body
(``{"error": {"message", "type", "param", "code"}}``); an unexpected failure is logged and answered
with a 500, and the server keeps running. Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from llama_pipe.config import ServeSettings
from llama_pipe.serve.generate import ChatModel, Completion, SamplingParams
from llama_pipe.settings import add_settings_arguments, describe, settings_from_args

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request error: HTTP status plus the OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{key}' must be a number", key)
    if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
        raise ApiError(400, f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", key)
    return float(value)


def _content(msg: dict[str, Any], i: int) -> str:
    content = msg.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": "..."}]
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "".join(texts)  # type: ignore[arg-type]
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def parse_chat_request(body: Any, model: ChatModel, settings: ServeSettings) -> tuple[list[dict[str, str]], SamplingParams, bool, bool]:
    """Validate a chat-completions body: (messages, sampling params, stream, include_usage)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    name = body.get("model")
    if name is not None and name != model.model_id:
        raise ApiError(404, f"model {name!r} is not served here; this server serves {model.model_id!r}", "model", "model_not_found")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    messages: list[dict[str, str]] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", f"messages[{i}]")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be system, user or assistant, got {m.get('role')!r}", f"messages[{i}].role")
        if role == "system" and i != 0:
            raise ApiError(400, "only the first message may be a system message", f"messages[{i}].role")
        messages.append({"role": role, "content": _content(m, i)})
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must be from the user", "messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = settings.max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, "'max_tokens' must be a positive integer", "max_tokens")
    if max_tokens > settings.max_tokens:
        raise ApiError(400, f"'max_tokens' {max_tokens} exceeds this server's limit of {settings.max_tokens}", "max_tokens")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "'seed' must be an integer", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    opts = body.get("stream_options") or {}
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", settings.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", settings.top_p, 0.0, 1.0, lo_open=True),
        seed=seed,
        stop=tuple(stop),
    )
    return messages, params, stream, include_usage


class ChatServer(ThreadingHTTPServer):
    """The HTTP server: holds the model, the settings and the generation lock."""

    daemon_threads = True

    def __init__(self, model: ChatModel, settings: ServeSettings) -> None:
        self.model = model
        self.settings = settings
        self.lock = threading.Lock()
        self.page = resources.files("llama_pipe.serve").joinpath("static/index.html").read_bytes()
        super().__init__((settings.host, settings.port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class Handler(BaseHTTPRequestHandler):
    """One request. Errors become JSON; nothing propagates to the server loop."""

    server: ChatServer
    protocol_version = "HTTP/1.1"
    server_version = "llama-pipe"
    timeout = 300  # seconds a socket may stall (a client that stops reading or sending is dropped)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        log.info("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------------ plumbing
    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"))

    def _guard(self, fn: Any) -> None:
        try:
            fn()
        except ApiError as exc:
            self._json(exc.status, exc.body())
        except (BrokenPipeError, ConnectionResetError):
            log.info("client went away")
        except Exception:  # noqa: BLE001 - the server must answer and keep running
            log.exception("internal error on %s %s", self.command, self.path)
            self.close_connection = True
            try:
                self._json(500, ApiError(500, "internal server error (see the server log)").body())
            except OSError:
                pass

    def _read_json(self) -> Any:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "send the body with a Content-Length (chunked requests are not accepted)")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise ApiError(411, "a Content-Length header is required") from None
        if length < 0:
            self.close_connection = True
            raise ApiError(400, "invalid Content-Length")
        if length > self.server.settings.max_request_bytes:
            self.close_connection = True  # the unread body must not be taken for the next request
            raise ApiError(413, f"request body of {length} bytes exceeds the limit of {self.server.settings.max_request_bytes}")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw.decode("utf-8"))
        except RecursionError:
            raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an over-long integer literal
            raise ApiError(400, f"the body is not valid JSON: {str(exc).split(';')[0]}") from None

    # ------------------------------------------------------------------ routes
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._guard(self._get)

    do_HEAD = do_GET

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(200, self.server.page, "text/html; charset=utf-8")
        elif path == "/v1/models":
            m = self.server.model
            self._json(200, {"object": "list", "data": [{"id": m.model_id, "object": "model", "created": 0, "owned_by": "llama-pipe"}]})
        elif path == "/health":
            self._json(200, {"status": "ok"})
        else:
            raise ApiError(404, f"no route GET {path}", code="not_found")

    def do_POST(self) -> None:  # noqa: N802
        self._guard(self._post)

    def _other(self) -> None:
        self._guard(self._not_allowed)

    def _not_allowed(self) -> None:
        self.close_connection = True
        raise ApiError(405, f"method {self.command} not allowed")

    do_PUT = do_DELETE = do_PATCH = _other

    def _post(self) -> None:
        path = self.path.split("?", 1)[0]
        if path != "/v1/chat/completions":
            self.close_connection = True
            raise ApiError(404, f"no route POST {path}", code="not_found")
        body = self._read_json()
        model = self.server.model
        messages, params, stream, include_usage = parse_chat_request(body, model, self.server.settings)
        prompt = model.prompt_ids(messages)
        if len(prompt) >= model.context_length:
            raise ApiError(400, f"the conversation has {len(prompt)} tokens; the model's context is {model.context_length}", "messages", "context_length_exceeded")
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        res = Completion()
        if not stream:
            with self.server.lock:
                for _ in model.stream(prompt, params, res):
                    pass
            self._json(200, {
                "id": cid, "object": "chat.completion", "created": created, "model": model.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text}, "finish_reason": res.finish_reason}],
                "usage": _usage(res),
            })
            return
        self._stream(prompt, params, res, cid, created, include_usage)

    def _stream(self, prompt: list[int], params: SamplingParams, res: Completion, cid: str, created: int, include_usage: bool) -> None:
        model = self.server.model
        self.close_connection = True  # the event stream ends when the connection closes
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

        def event(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> None:
            chunk: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model.model_id,
                                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else []}
            if usage is not None:
                chunk["usage"] = usage
            self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
            self.wfile.flush()

        with self.server.lock:
            event({"role": "assistant", "content": ""})
            pieces = model.stream(prompt, params, res)
            try:
                for piece in pieces:
                    event({"content": piece})
            except (BrokenPipeError, ConnectionResetError):
                raise
            except Exception:  # noqa: BLE001 - headers are sent: report in-band, keep serving
                log.exception("generation failed")
                err = ApiError(500, "generation failed (see the server log)").body()
                self.wfile.write(f"data: {json.dumps(err)}\n\n".encode())
                return
            finally:
                pieces.close()  # a client that went away stops the generation here
        event({}, res.finish_reason)
        if include_usage:
            event({}, usage=_usage(res))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def _usage(res: Completion) -> dict[str, int]:
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
            "total_tokens": res.prompt_tokens + res.completion_tokens}


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="Hugging Face model directory (e.g. results/merged)")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR", help="peft adapter merged in memory before serving (repeatable)")
    add_settings_arguments(parser, ServeSettings, "serve")


def run(args: argparse.Namespace) -> int:
    from llama_pipe.serve.generate import load_chat_model

    settings = settings_from_args(args, ServeSettings, "serve")
    log.info("serve settings:\n%s", describe(settings))
    model = load_chat_model(Path(args.model), args.adapter, settings.device, settings.template, settings.model_id)
    server = ChatServer(model, settings)
    print(f"serve: {model.model_id} at {server.url}/v1 (web chat: {server.url}/); Ctrl-C stops", flush=True)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM (docker stop, systemd, kill) ends like Ctrl-C

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print("serve: stopped")
    return 0
