"""A real HTTP server on 127.0.0.1 serving a directory, with Range support and fault injection."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar


class ReleaseServer(ThreadingHTTPServer):
    """Serves ``root``; records every request; can cut a file's first transfer half-way."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.cut_once: set[str] = set()  # paths whose next full transfer stops half-way
        self.ignore_range = False
        self.fail_with: dict[str, list[int]] = {}  # path -> statuses to answer before serving it
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def ranges(self, path: str) -> list[str | None]:
        return [r for p, r in self.requests if p == path]


class _Handler(BaseHTTPRequestHandler):
    server: ReleaseServer

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        rng = self.headers.get("Range")
        with self.server.lock:
            self.server.requests.append((path, rng))
            cut = path in self.server.cut_once
            self.server.cut_once.discard(path)
            queued = self.server.fail_with.get(path)
            status = queued.pop(0) if queued else None
        if status is not None:
            self.send_error(status)
            return
        f = (self.server.root / path.lstrip("/")).resolve()
        if not f.is_file() or self.server.root.resolve() not in f.parents:
            self.send_error(404)
            return
        data = f.read_bytes()
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and not self.server.ignore_range:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if cut:
            # Promise the whole body, send half, drop the connection: a network failure mid-file.
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


S = TypeVar("S", bound=ThreadingHTTPServer)


@contextmanager
def running(server: S) -> Iterator[S]:
    """Serve ``server`` on a background thread for the duration of the block, then close it."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def serve(root: Path) -> Iterator[ReleaseServer]:
    with running(ReleaseServer(root)) as server:
        yield server
