"""``llama-pipe serve MODEL``: an OpenAI-compatible HTTP server plus a web chat page.

Endpoints: ``GET /`` (the chat page), ``GET /v1/models``, ``POST /v1/chat/completions`` (JSON, or
server-sent events with ``"stream": true``), ``GET /health``. Standard library only
(``ThreadingHTTPServer``); requests are parsed concurrently but generation is serialised with a
lock (one model, one batch) behind a bounded queue. Every bad request gets a 4xx and an
OpenAI-style JSON error body (``{"error": {"message", "type", "param", "code"}}``), also the
ones http.server itself refuses (an unknown method is 405 with ``Allow``); a full server answers
503 with ``Retry-After``; an unexpected failure is logged and answered with a 500, and the server
keeps running. Binds 127.0.0.1 unless told otherwise; Host and Origin are checked
(:mod:`llama_pipe.serve.limits`).

A request's body length must be unambiguous, so that no proxy in front can read the bytes
differently (request smuggling): one ``Content-Length`` of plain decimal digits, no
``Transfer-Encoding`` beside it, no malformed header lines; anything else is 400 and the
connection is closed. A request that carries a body the route does not read closes its
connection after the answer. A client that leaves stops its generation within a token, streamed
or not.
"""

from __future__ import annotations

import argparse
import email.errors
import json
import logging
import re
import select
import signal
import socket
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from llama_pipe.config import ChatSettings, ServeSettings, settings_from_args
from llama_pipe.core.settings import add_settings_arguments, describe
from llama_pipe.models.generation import ChatModel, Completion, SamplingParams, load_chat_model
from llama_pipe.serve.api import ApiError, parse_chat_request, served_model_id
from llama_pipe.serve.limits import (
    ConnectionGate,
    Deadlines,
    GenerationQueue,
    Lobby,
    host_allowed,
    origin_allowed,
)

__all__ = ["ApiError", "ChatServer", "Handler", "parse_chat_request"]

log = logging.getLogger(__name__)

ALLOW = "GET, HEAD, POST, OPTIONS"
_DECIMAL = re.compile(r"[0-9]{1,18}")
# a header line without a colon (``Content-Length : 5``) or an indented first line: the headers after it are lost
_HEADER_LINE_DEFECTS = (email.errors.MissingHeaderBodySeparatorDefect, email.errors.FirstHeaderLineIsContinuationDefect)
_POLL_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL | getattr(select, "POLLRDHUP", 0)


class ChatServer(ThreadingHTTPServer):
    """The HTTP server: holds the model, the settings, the generation lock and the limits."""

    daemon_threads = True

    def __init__(self, model: ChatModel, settings: ServeSettings) -> None:
        self.model = model
        self.settings = settings
        self.queue = GenerationQueue(settings.max_queue, settings.queue_timeout)
        self.gate = ConnectionGate(settings.max_connections)
        self.lobby = Lobby(settings.max_connections, settings.allowed_hosts, settings.allowed_origins)
        self.deadlines = Deadlines(settings.request_timeout)
        self.page = resources.files("llama_pipe.serve").joinpath("static/index.html").read_bytes()
        self.request_queue_size = settings.listen_backlog  # listen() backlog, used by server_activate
        super().__init__((settings.host, settings.port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host.decode() if isinstance(host, bytes) else host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.gate.enter():
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.gate.leave()
                raise
            return
        self.lobby.add(request)  # /health is answered there; anything else gets 503

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.gate.leave()

    def server_close(self) -> None:
        self.deadlines.close()
        self.lobby.close()
        super().server_close()

    def generation_slot(self) -> Any:
        """Hold the model for one generation (a context manager); 503 when the queue is full."""
        return self.queue.slot()


class Handler(BaseHTTPRequestHandler):
    """One connection. Errors become JSON; nothing propagates to the server loop."""

    server: ChatServer
    protocol_version = "HTTP/1.1"
    server_version = "llama-pipe"

    def setup(self) -> None:
        # any one stalled read or write; socketserver reads self.timeout (typeshed calls it a ClassVar)
        self.timeout = self.server.settings.request_timeout  # type: ignore[misc]
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        log.info("%s %s", self.address_string(), format % args)

    def handle_one_request(self) -> None:
        """Wait (at most request_timeout) for a request to begin, then give it request_timeout to
        arrive whole: a watchdog answers 408 and disconnects a client that trickles it in."""
        poll = select.poll()
        poll.register(self.connection, select.POLLIN)
        if not self._buffered() and not poll.poll(self.server.settings.request_timeout * 1000):
            self.close_connection = True  # an idle kept-alive connection: closed quietly
            return
        self.cors_origin: str | None = None
        self.server.deadlines.arm(self.connection)
        try:
            super().handle_one_request()
        finally:
            self.server.deadlines.disarm(self.connection)

    def _buffered(self) -> bool:
        """Whether a (pipelined) request is already read into rfile's buffer, where poll cannot see it."""
        self.connection.settimeout(0.0)  # peek without waiting: an empty socket reads as no data
        try:
            return bool(self.rfile.peek(1))  # type: ignore[attr-defined]
        except OSError:
            return True  # let the request loop meet the error
        finally:
            self.connection.settimeout(self.timeout)

    # ------------------------------------------------------------------ plumbing
    def _send(self, status: int, body: bytes, ctype: str = "application/json", headers: dict[str, str] | None = None) -> None:
        self.server.deadlines.disarm(self.connection)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self._cors_headers()
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _cors_headers(self) -> None:
        if getattr(self, "cors_origin", None):
            self.send_header("Access-Control-Allow-Origin", self.cors_origin)  # type: ignore[arg-type]
            self.send_header("Vary", "Origin")

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), headers=headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, headers too long, unknown method) as JSON."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # an unparsable request line: answer with a status line anyway
            self.request_version = "HTTP/1.0"
        if code == HTTPStatus.NOT_IMPLEMENTED:  # no do_<METHOD>
            err = ApiError(405, f"method {self.command!r:.40} not allowed; use {ALLOW}", code="method_not_allowed", headers={"Allow": ALLOW})
        else:
            err = ApiError(code, message or HTTPStatus(code).phrase, code=HTTPStatus(code).name.lower())
        try:
            self._json(err.status, err.body(), err.headers)
        except OSError:
            pass

    def _guard(self, fn: Any) -> None:
        try:
            self._check_framing()
            self._check_caller()
            if self.command != "POST":
                self.server.deadlines.disarm(self.connection)  # no body to wait for
            fn()
        except ApiError as exc:
            self._json(exc.status, exc.body(), exc.headers)
        except (BrokenPipeError, ConnectionResetError):
            log.info("client went away")
        except Exception:  # noqa: BLE001 - the server must answer and keep running
            log.exception("internal error on %s %s", self.command, self.path)
            self.close_connection = True
            try:
                self._json(500, ApiError(500, "internal server error (see the server log)").body())
            except OSError:
                pass

    def _check_framing(self) -> None:
        """Refuse a body length that another HTTP parser could read otherwise (request smuggling
        behind a proxy): 400 and close unless there is at most one Content-Length of plain digits
        and no Transfer-Encoding beside it; a chunked body alone is 411, as before."""
        lengths = self.headers.get_all("Content-Length") or []
        codings = self.headers.get_all("Transfer-Encoding") or []

        def refuse(message: str, status: int = 400) -> ApiError:
            self.close_connection = True
            return ApiError(status, message, code="bad_request_framing" if status == 400 else None)

        if any(isinstance(d, _HEADER_LINE_DEFECTS) for d in self.headers.defects):
            raise refuse("malformed header line (a header without a colon, or a space before it)")
        if len(lengths) > 1:
            raise refuse(f"{len(lengths)} Content-Length headers; send exactly one")
        if len(self.headers.get_all("Host") or []) > 1:  # a proxy may route by one and we would check the other
            raise refuse("more than one Host header")
        if lengths and codings:
            raise refuse("both Transfer-Encoding and Content-Length; send the body with a Content-Length only")
        if lengths and not _DECIMAL.fullmatch(lengths[0].strip(" \t")):
            raise refuse(f"Content-Length {lengths[0]!r:.40} is not a plain decimal number")
        if codings:
            if self.command == "POST" and [c.strip().lower() for c in ",".join(codings).split(",")] == ["chunked"]:
                raise refuse("send the body with a Content-Length (chunked requests are not accepted)", 411)
            raise refuse(f"Transfer-Encoding {', '.join(codings)!r:.60} is not accepted; send the body with a Content-Length")
        if self.command != "POST" and lengths and int(lengths[0]):
            self.close_connection = True  # a body this route does not read must not be taken for the next request

    def _check_caller(self) -> None:
        """Host must name this server (DNS rebinding); Origin, when a browser sends one, must be
        this server's own page or listed in serve.allowed_origins."""
        s = self.server.settings
        host, origin = self.headers.get("Host"), self.headers.get("Origin")
        if not host_allowed(host, s.allowed_hosts):
            self.close_connection = True
            raise ApiError(403, f"Host {host!r:.100} is not this server; add it to serve.allowed_hosts to accept it", code="host_not_allowed")
        if not origin_allowed(origin, host, s.allowed_origins):
            self.close_connection = True
            raise ApiError(403, f"requests from the web page at {origin!r:.100} are not allowed; add its origin to "
                                "serve.allowed_origins to allow it", code="origin_not_allowed")
        if origin is not None and host is not None and origin.strip().lower().split("://", 1)[-1] != host.strip().lower():
            self.cors_origin = origin.strip()  # an allowed cross-origin page may read the reply

    def _read_json(self) -> Any:
        value = self.headers.get("Content-Length")  # one plain decimal: _check_framing saw to it
        if value is None:
            self.close_connection = True
            raise ApiError(411, "a Content-Length header is required")
        length = int(value)
        if length > self.server.settings.max_request_bytes:
            self.close_connection = True  # the unread body must not be taken for the next request
            raise ApiError(413, f"request body of {length} bytes exceeds the limit of {self.server.settings.max_request_bytes}")
        ctype = self.headers.get_content_type() if "Content-Type" in self.headers else None
        if ctype != "application/json" and not (ctype or "").endswith("+json"):
            self.close_connection = True
            raise ApiError(415, f"the body must be JSON sent with Content-Type: application/json (got {ctype or 'no Content-Type'})",
                           code="unsupported_media_type")
        raw = self.rfile.read(length)
        self.server.deadlines.disarm(self.connection)
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

    def do_OPTIONS(self) -> None:  # noqa: N802 - a CORS preflight (only origins allowed by _check_caller get here)
        self._guard(self._options)

    def _options(self) -> None:
        self.send_response(204)
        self.send_header("Allow", ALLOW)
        if self.cors_origin:
            self.send_header("Access-Control-Allow-Methods", ALLOW)
            self.send_header("Access-Control-Allow-Headers", "Content-Type, Authorization")
            self.send_header("Access-Control-Max-Age", "600")
        self._cors_headers()
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _other(self) -> None:
        self._guard(self._not_allowed)

    def _not_allowed(self) -> None:
        self.close_connection = True
        raise ApiError(405, f"method {self.command} not allowed; use {ALLOW}", code="method_not_allowed", headers={"Allow": ALLOW})

    do_PUT = do_DELETE = do_PATCH = _other

    def _post(self) -> None:
        path = self.path.split("?", 1)[0]
        if path != "/v1/chat/completions":
            self.close_connection = True
            raise ApiError(404, f"no route POST {path}", code="not_found")
        body = self._read_json()
        model = self.server.model
        messages, params, stream, include_usage = parse_chat_request(body, model, self.server.settings)
        prompt = self._prompt(messages)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        res = Completion()
        gone = _ClientGone(self.connection)
        if not stream:
            with self.server.generation_slot():
                for _ in model.stream(prompt, params, res, cancelled=gone):
                    pass
            if gone.seen:
                self.close_connection = True
                log.info("client went away; its generation stopped after %d token(s)", res.completion_tokens)
                return
            self._json(200, {
                "id": cid, "object": "chat.completion", "created": created, "model": model.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text}, "finish_reason": res.finish_reason}],
                "usage": _usage(res),
            })
            return
        self._stream(prompt, params, res, cid, created, include_usage, gone)

    def _prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt's token ids; 400 if the chat template cannot render the conversation or it
        does not fit the context (rendering is one pass over the messages: linear time)."""
        from jinja2 import TemplateError

        model = self.server.model
        try:
            prompt = model.prompt_ids(messages)
        except (ValueError, TypeError, TemplateError) as exc:
            raise ApiError(400, f"the chat template ({model.template.name}) cannot render this conversation: {str(exc)[:200]}",
                           "messages", "invalid_conversation") from None
        if len(prompt) >= model.context_length:
            raise ApiError(400, f"the conversation has {len(prompt)} tokens; the model's context is {model.context_length}",
                           "messages", "context_length_exceeded")
        return prompt

    def _stream(self, prompt: list[int], params: SamplingParams, res: Completion, cid: str, created: int, include_usage: bool,
                gone: _ClientGone) -> None:
        model = self.server.model

        def event(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> None:
            chunk: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model.model_id,
                                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else []}
            if usage is not None:
                chunk["usage"] = usage
            self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
            self.wfile.flush()

        with self.server.generation_slot():  # a full queue is a plain 503, before the 200 is sent
            self.close_connection = True  # the event stream ends when the connection closes
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self._cors_headers()
            self.send_header("Connection", "close")
            self.end_headers()
            event({"role": "assistant", "content": ""})
            pieces = model.stream(prompt, params, res, cancelled=gone)
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
        if gone.seen:
            log.info("client went away; its generation stopped after %d token(s)", res.completion_tokens)
            return
        event({}, res.finish_reason)
        if include_usage:
            event({}, usage=_usage(res))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


class _ClientGone:
    """Called between tokens: True once the client has closed its end of the connection (it can
    no longer read a reply), so generation stops within a token of it leaving."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.poll = select.poll()
        self.poll.register(sock, select.POLLIN | _POLL_GONE)
        self.seen = False

    def __call__(self) -> bool:
        if not self.seen:
            self.seen = self._check()
        return self.seen

    def _check(self) -> bool:
        events = self.poll.poll(0)
        if not events:
            return False
        if events[0][1] & _POLL_GONE:
            return True
        try:  # readable: a pipelined request (data) or the client's end of stream (b"")
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True


def _usage(res: Completion) -> dict[str, int]:
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
            "total_tokens": res.prompt_tokens + res.completion_tokens}


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="Hugging Face model directory (e.g. results/default/merged)")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR", help="peft adapter merged in memory before serving (repeatable)")
    add_settings_arguments(parser, ServeSettings, "serve")
    add_settings_arguments(parser, ChatSettings, "chat", config_flag=False, only=("template", "system_prompt"))


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, ServeSettings, "serve")
    chat = settings_from_args(args, ChatSettings, "chat")
    log.info("serve settings:\n%s", describe(settings))
    model_id = settings.model_id or served_model_id(Path(args.model), args.adapter)
    model = load_chat_model(Path(args.model), args.adapter, settings.device, chat.template, model_id, chat.system_prompt)
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
