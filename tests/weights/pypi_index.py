"""A PEP 503 "simple" package index on 127.0.0.1, serving wheels the test builds."""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .httpserver import running


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def build_wheel(folder: Path, name: str, version: str, files: dict[str, bytes], requires: tuple[str, ...] = ()) -> Path:
    """A valid pure-Python wheel holding ``files`` (paths inside the wheel) and dist-info."""
    dist = re.sub(r"[-_.]+", "_", name).lower()
    info = f"{dist}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    members = {
        **files,
        f"{info}/METADATA": metadata.encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: llama-pipe-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in members.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    members[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in members.items():
            zf.writestr(path, data)
    return wheel


def write_simple_index(root: Path, wheels: list[Path]) -> None:
    """``root/simple/<project>/index.html`` linking each wheel (under ``root/files/``) with its sha256."""
    by_project: dict[str, list[Path]] = {}
    for w in wheels:
        project = re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower()
        by_project.setdefault(project, []).append(w)
    (root / "files").mkdir(parents=True, exist_ok=True)
    for project, ws in by_project.items():
        page = root / "simple" / project
        page.mkdir(parents=True, exist_ok=True)
        links = []
        for w in ws:
            target = root / "files" / w.name
            if w != target:
                target.write_bytes(w.read_bytes())
            sha = hashlib.sha256(target.read_bytes()).hexdigest()
            links.append(f'<a href="../../files/{w.name}#sha256={sha}">{w.name}</a><br>')
        page.joinpath("index.html").write_text("<!DOCTYPE html><html><body>" + "".join(links) + "</body></html>\n")


@contextmanager
def serve_index(root: Path) -> Iterator[str]:
    """Serve ``root`` and yield the index URL (``http://127.0.0.1:PORT/simple``)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    server.daemon_threads = True
    with running(server):
        yield f"http://127.0.0.1:{server.server_address[1]}/simple"
