"""The server's guard rails: who may call it, how many at once, and how slowly.

* **Host** (DNS rebinding): a page on ``evil.example`` whose name is re-pointed at 127.0.0.1 sends
  ``Host: evil.example``. Only IP literals (a rebinding attack needs a name), ``localhost`` (and
  ``*.localhost``) and ``serve.allowed_hosts`` are accepted.
* **Origin** (cross-site requests): a browser names the page that sends a request. Only the
  server's own page (the same scheme-less ``host:port`` as the ``Host`` header) and
  ``serve.allowed_origins`` may call the API; requests without ``Origin`` (curl, SDKs) pass.
* **Connections**: at most ``max_connections`` are served at once. One more waits in the
  :class:`Lobby` (one thread for all of them, at most ``LOBBY_WAIT`` seconds to send its request
  head): ``GET /health`` is answered 200 there, so a server whose connections are all held (300
  slow clients) still answers its health check at once; anything else gets 503 with
  ``Retry-After``; then the connection is closed.
* **Generation**: one request generates at a time; at most ``max_queue`` wait, each at most
  ``queue_timeout``; others are answered 503 with ``Retry-After`` (before any streaming starts).
* **Slow clients**: a request (line, headers, body) must arrive within ``request_timeout`` of the
  connection becoming ready for it; a watchdog answers 408 and shuts the socket down otherwise.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from llama_pipe.serve.api import ApiError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 2
LOBBY_WAIT = 1.0  # seconds a connection over the limit has to send its request head
LOBBY_DRAIN = 1.0  # seconds its later bytes are read (and dropped) after the answer, so close() does not reset it
LOBBY_CAPACITY = 1024  # connections the lobby holds; for one more the oldest is closed
HEAD_LIMIT = 16384  # bytes of a request head the lobby reads


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
    try:
        parts = urlsplit(origin)
    except ValueError:  # "http://[": not an origin a browser sends
        return False
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


class _Waiting:
    __slots__ = ("buf", "due", "answered")

    def __init__(self, due: float) -> None:
        self.buf, self.due, self.answered = b"", due, False


class Lobby:
    """Connections beyond ``max_connections``, served by one thread with non-blocking sockets.

    Each may send a request head within ``wait`` seconds: ``GET``/``HEAD /health`` (from an allowed
    Host and Origin) is answered 200, anything else (or nothing in time) 503 with ``Retry-After``;
    then what the client still sends is read and dropped for ``LOBBY_DRAIN`` seconds (so that
    closing does not reset the answer away) and the connection is closed. The accepting thread
    only hands sockets over, so neither slow clients nor a burst can keep it from accepting.
    """

    def __init__(self, limit: int, allowed_hosts: list[str], allowed_origins: list[str],
                 wait: float = LOBBY_WAIT, capacity: int = LOBBY_CAPACITY) -> None:
        self.limit, self.wait, self.capacity = limit, wait, capacity
        self.allowed_hosts, self.allowed_origins = allowed_hosts, allowed_origins
        self._sel = selectors.DefaultSelector()
        self._waiting: dict[socket.socket, _Waiting] = {}  # insertion order: oldest first
        self._new: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name="serve-lobby", daemon=True)
        self._thread.start()

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._new.append(sock)
        self._wake()

    def close(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(5)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # the wake-up pipe is full (the thread will look anyway) or closed
            pass

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for key, _ in self._sel.select(timeout=0.1):
                    if key.fileobj is self._wake_r:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except OSError:
                            pass
                    else:
                        self._guarded(self._readable, key.fileobj)
                self._admit()
                now = time.monotonic()
                for sock, w in [(s, w) for s, w in self._waiting.items() if w.due <= now]:
                    if w.answered:
                        self._drop(sock)
                    else:
                        self._guarded(self._answer, sock, w)
        finally:
            for sock in list(self._waiting):
                self._drop(sock)
            with self._lock:
                new, self._new = self._new, []
            for sock in new:
                sock.close()
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def _guarded(self, fn: Any, sock: Any, *args: Any) -> None:
        """``fn(sock, *args)``; a failure drops that connection, never the lobby's thread."""
        try:
            fn(sock, *args)
        except Exception:  # noqa: BLE001 - one odd client must not stop the lobby
            log.exception("lobby: dropping a connection")
            self._drop(sock)

    def _admit(self) -> None:
        with self._lock:
            new, self._new = self._new, []
        for sock in new:
            while len(self._waiting) >= self.capacity:
                self._drop(next(iter(self._waiting)))
            try:
                sock.setblocking(False)
                self._sel.register(sock, selectors.EVENT_READ)
            except (OSError, ValueError):
                sock.close()
                continue
            self._waiting[sock] = _Waiting(time.monotonic() + self.wait)

    def _drop(self, sock: socket.socket) -> None:
        self._waiting.pop(sock, None)
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass
        sock.close()

    def _readable(self, sock: socket.socket) -> None:
        w = self._waiting.get(sock)
        if w is None:
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the client closed: nothing (more) to say to it
            self._drop(sock)
            return
        if w.answered:
            return  # draining
        w.buf += data
        if b"\r\n\r\n" in w.buf or len(w.buf) >= HEAD_LIMIT:
            self._answer(sock, w)

    def _answer(self, sock: socket.socket, w: _Waiting) -> None:
        try:
            sock.send(self._response(w.buf))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(sock)
            return
        w.answered, w.buf, w.due = True, b"", time.monotonic() + LOBBY_DRAIN

    def _response(self, head: bytes) -> bytes:
        lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                fields.setdefault(name.strip().lower(), value.strip())
        host, origin = fields.get("host"), fields.get("origin")
        if (len(parts) == 3 and parts[0] in ("GET", "HEAD") and parts[1].split("?", 1)[0] == "/health"
                and host_allowed(host, self.allowed_hosts) and origin_allowed(origin, host, self.allowed_origins)):
            body = json.dumps({"status": "ok"}).encode()
            head_out = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            return head_out.encode() + (body if parts[0] == "GET" else b"")
        return error_bytes(503, "Service Unavailable", f"the server is at its limit of {self.limit} open connections; retry shortly",
                           "server_busy", {"Retry-After": str(RETRY_AFTER_S)})


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
