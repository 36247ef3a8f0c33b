"""A Hugging Face Hub over HTTP on 127.0.0.1, for `ember pull` run as a real process (HF_ENDPOINT points here):
the model-info API with LFS hashes and sizes, and /resolve/ downloads with HEAD, ETag and Range. Downloads can
be slowed down (to kill a pull in the middle of one) and are recorded (to see what was asked for).

test_store_pull.py's FakeHub replaces huggingface_hub's functions in-process instead; this one goes through
huggingface_hub's real download code, its cache, locks and temporary files.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 64 * 1024


class FakeHFServer:
    def __init__(self, repos: dict[str, dict[str, Path]]):
        self.repos = repos
        self.seconds_per_chunk = 0.0  # > 0: downloads crawl, so a test can kill a pull mid-file
        self.listed_sizes: dict[str, int] = {}  # file name -> the size the model-info API claims (a lie)
        self.requests: list[tuple[str, str, str | None]] = []  # (method, file name, Range header)
        self.bytes_sent: dict[str, int] = {}
        self._hashes: dict[Path, str] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                server._handle(self, head=False)

            def do_HEAD(self):
                server._handle(self, head=True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeHFServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def sha256(self, path: Path) -> str:
        if path not in self._hashes:
            self._hashes[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._hashes[path]

    def downloads_of(self, name: str) -> list[str | None]:
        """The Range header of every GET of file `name` (None: the whole file)."""
        return [rng for method, file, rng in self.requests if method == "GET" and file == name]

    # ---- requests ---------------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        info = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
        if info:
            return self._model_info(handler, info.group(1), head)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if resolve and resolve.group(1) in self.repos and resolve.group(3) in self.repos[resolve.group(1)]:
            return self._file(handler, self.repos[resolve.group(1)][resolve.group(3)], resolve.group(3), head)
        self._send(handler, 404, b'{"error": "not found"}', {"Content-Type": "application/json",
                                                             "X-Error-Code": "RepoNotFound"}, head)

    def _model_info(self, handler, repo: str, head: bool) -> None:
        if repo not in self.repos:
            return self._send(handler, 404, b'{"error": "Repository not found"}',
                              {"Content-Type": "application/json", "X-Error-Code": "RepoNotFound"}, head)
        siblings = []
        for name, path in self.repos[repo].items():
            size = self.listed_sizes.get(name, path.stat().st_size)
            sibling = {"rfilename": name, "size": size}
            if path.suffix in (".gguf", ".safetensors"):
                sibling["lfs"] = {"sha256": self.sha256(path), "size": size, "pointerSize": 134}
            siblings.append(sibling)
        body = json.dumps({"id": repo, "modelId": repo, "sha": COMMIT, "siblings": siblings}).encode()
        self._send(handler, 200, body, {"Content-Type": "application/json"}, head)

    def _file(self, handler, path: Path, name: str, head: bool) -> None:
        size = path.stat().st_size
        lfs = path.suffix in (".gguf", ".safetensors")
        etag = self.sha256(path) if lfs else hashlib.sha1(path.read_bytes()).hexdigest()
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if lfs:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(size)
        start = 0
        wanted = handler.headers.get("Range")
        with self._lock:
            self.requests.append(("HEAD" if head else "GET", name, wanted))
        status = 200
        if wanted and not head:
            match = re.fullmatch(r"bytes=(\d+)-", wanted.strip())
            start = int(match.group(1)) if match else 0
            if start >= size:
                return self._send(handler, 416, b"", {"Content-Range": f"bytes */{size}"}, head)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(size - start))
        handler.end_headers()
        if head:
            return
        with open(path, "rb") as fh:
            fh.seek(start)
            try:
                while chunk := fh.read(CHUNK):
                    handler.wfile.write(chunk)
                    with self._lock:
                        self.bytes_sent[name] = self.bytes_sent.get(name, 0) + len(chunk)
                    if self.seconds_per_chunk:
                        time.sleep(self.seconds_per_chunk)
            except (BrokenPipeError, ConnectionResetError):  # the client was killed
                pass

    @staticmethod
    def _send(handler, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if not head:
            handler.wfile.write(body)
