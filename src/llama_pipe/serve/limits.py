"""The server's guard rails: who may call it, how many at once, and how slowly.

* **Host** (DNS rebinding): a page on ``evil.example`` whose name is re-pointed at 127.0.0.1 sends
  ``Host: evil.example``. Only IP literals (a rebinding attack needs a name), ``localhost`` (and
  ``*.localhost``) and ``serve.allowed_hosts`` are accepted.
* **Origin** (cross-site requests): a browser names the page that sends a request. Only the
  server's own page (the same scheme-less ``host:port`` as the ``Host`` header) and
  ``serve.allowed_origins`` may call the API; requests without ``Origin`` (curl, SDKs) pass.
* **Connections**: at most ``max_connections`` are served at once; one more is answered 503 with
  ``Retry-After`` straight from the accepting thread and closed.
* **Generation**: one request generates at a time; at most ``max_queue`` wait, each at most
  ``queue_timeout``; others are answered 503 with ``Retry-After`` (before any streaming starts).
* **Slow clients**: a request (line, headers, body) must arrive within ``request_timeout`` of the
  connection becoming ready for it; a watchdog answers 408 and shuts the socket down otherwise.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from llama_pipe.serve.api import ApiError

RETRY_AFTER_S = 2


def error_bytes(status: int, reason: str, message: str, code: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 response with an OpenAI-style JSON error body, closing the connection."""
    body = json.dumps({"error": {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error",
                                 "param": None, "code": code}}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json", f"Content-Length: {len(body)}",
            "Connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _host_name(host: str) -> str:
    """``Host`` header value without port, lower-case, IPv6 brackets removed."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(host: str | None, allowed: list[str]) -> bool:
    """Whether a request's ``Host`` header names this server rather than someone else's domain."""
    if host is None or "*" in allowed:
        return True  # no Host header: not a browser (browsers always send it)
    name = _host_name(host)
    extra = {_host_name(a) for a in allowed}
    return _is_ip(name) or name == "localhost" or name.endswith(".localhost") or name in extra


def origin_allowed(origin: str | None, host: str | None, allowed: list[str]) -> bool:
    """Whether a browser page at ``origin`` may call the API: the server's own page, or listed."""
    if origin is None or "*" in allowed:
        return True
    origin = origin.strip().lower()
    if origin in {a.strip().lower().rstrip("/") for a in allowed}:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc or host is None:
        return False  # "null" (sandboxed frames, file: pages) and anything odd
    return parts.netloc == host.strip().lower()


class ConnectionGate:
    """Counts open connections; :meth:`enter` refuses one beyond the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.open >= self.limit:
                return False
            self.open += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.open -= 1


def refuse_connection(sock: socket.socket, limit: int) -> None:
    """Answer 503 on a connection over the limit without reading it, then close it gracefully."""
    try:
        sock.settimeout(1.0)
        sock.sendall(error_bytes(503, "Service Unavailable", f"the server is at its limit of {limit} open connections; retry shortly",
                                 "server_busy", {"Retry-After": str(RETRY_AFTER_S)}))
        sock.shutdown(socket.SHUT_WR)
        end = time.monotonic() + 2.0
        while time.monotonic() < end and sock.recv(65536):  # drain what the client sent (until it closes),
            pass  # so that close() does not turn into a reset that could discard the 503
    except OSError:
        pass


class Deadlines:
    """Sockets that must finish sending a request by a deadline; a daemon thread enforces them."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._due: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="serve-deadlines", daemon=True)
        self._thread.start()

    def arm(self, sock: socket.socket) -> None:
        with self._lock:
            self._due[sock] = time.monotonic() + self.timeout

    def disarm(self, sock: socket.socket) -> None:
        with self._lock:
            self._due.pop(sock, None)

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        tick = min(1.0, self.timeout / 4)
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:  # held while answering, so disarm() never races a 408 into a reply
                for s in [s for s, due in self._due.items() if due <= now]:
                    del self._due[s]
                    self._expire(s)

    def _expire(self, sock: Any) -> None:
        try:
            sock.settimeout(0.5)  # a client that reads nothing cannot hold the watchdog
            sock.sendall(error_bytes(408, "Request Timeout", f"the request did not arrive within {self.timeout:g} s",
                                     "request_timeout"))
        except OSError:
            pass
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the handler blocked in recv(); it then closes
        except OSError:
            pass


class GenerationQueue:
    """The model's lock behind a bounded, time-limited queue."""

    def __init__(self, max_queue: int, timeout: float) -> None:
        self.lock = threading.Lock()
        self.max_queue, self.timeout = max_queue, timeout
        self.waiting = 0
        self._count = threading.Lock()

    @contextmanager
    def slot(self) -> Iterator[None]:
        busy = {"Retry-After": str(RETRY_AFTER_S)}
        with self._count:
            if self.lock.locked() and self.waiting >= self.max_queue:
                raise ApiError(503, f"the server is busy ({self.waiting} request(s) queued, the limit is {self.max_queue}); "
                                    "retry shortly", code="server_busy", headers=busy)
            self.waiting += 1
        try:
            got = self.lock.acquire(timeout=self.timeout)
        finally:
            with self._count:
                self.waiting -= 1
        if not got:
            raise ApiError(503, f"the model stayed busy for {self.timeout:g} s; retry shortly", code="server_busy", headers=busy)
        try:
            yield
        finally:
            self.lock.release()
