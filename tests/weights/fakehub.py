"""A minimal Hugging Face Hub on 127.0.0.1: enough of the API for ``snapshot_download``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tests.weights.httpserver import running

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(ThreadingHTTPServer):
    """Serves one repo ``repo_id`` whose files are those of ``root``; records requested paths."""

    daemon_threads = True

    def __init__(self, repo_id: str, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repo_id = repo_id
        self.root = root
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    def downloaded(self) -> set[str]:
        prefix = f"/{self.repo_id}/resolve/{COMMIT}/"
        return {unquote(p[len(prefix):]) for m, p, _ in self.requests if m == "GET" and p.startswith(prefix)}


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _json(self, obj: object) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self, head: bool) -> None:
        hub = self.server
        path = urlsplit(self.path).path
        hub.requests.append(("HEAD" if head else "GET", path, self.headers.get("Authorization")))
        api = f"/api/models/{hub.repo_id}"
        if path.startswith(api + "/revision/"):
            return self._json({"id": hub.repo_id, "sha": COMMIT, "siblings": [{"rfilename": f} for f in hub.files()]})
        if path.startswith(api + "/tree/"):
            return self._json([
                {"type": "file", "path": f, "size": (hub.root / f).stat().st_size,
                 "oid": hashlib.sha1((hub.root / f).read_bytes()).hexdigest()}
                for f in hub.files()
            ])
        prefix = f"/{hub.repo_id}/resolve/"
        if path.startswith(prefix):
            rel = unquote(path[len(prefix):]).split("/", 1)[1]
            f = hub.root / rel
            if f.is_file():
                data = f.read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)
                return
        body = json.dumps({"error": "Repository not found"}).encode()
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._handle(head=False)

    def do_HEAD(self) -> None:
        self._handle(head=True)


@contextmanager
def fake_hub(repo_id: str, root: Path) -> Iterator[FakeHub]:
    with running(FakeHub(repo_id, root)) as hub:
        yield hub
