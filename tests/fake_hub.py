"""A local stand-in for the Hugging Face Hub's few endpoints that `node-supervisor pull` uses (HF_ENDPOINT
points at it; the real Hub is never asked): a repository's file tree, and a file's HEAD and GET (with
Range, for resumed downloads).  Files are served as LFS files, their SHA-256 listed and sent as the ETag."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Repo:
    files: dict[str, bytes]
    token: str | None = None  # private: only with this bearer token
    served: dict[str, bytes] = field(default_factory=dict)  # bytes sent instead of the listed ones (corruption)
    drop_after: dict[str, int] = field(default_factory=dict)  # the first GET of a file stops after this many bytes


class FakeHub:
    def __init__(self, repos: dict[str, Repo]) -> None:
        self.repos = repos
        self.ranges: list[str] = []  # Range headers of the file GETs, in order
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self) -> None:
                hub.answer(self, body=False)

            def do_GET(self) -> None:
                hub.answer(self, body=True)

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(request.path).path)
        tree = re.match(r"^/api/models/([^/]+/[^/]+)/tree/[^/]+/?$", path)
        resolve = re.match(r"^/([^/]+/[^/]+)/resolve/[^/]+/(.+)$", path)
        name = (tree or resolve).group(1) if (tree or resolve) else ""
        repo = self.repos.get(name)
        if repo is None or (repo.token and request.headers.get("authorization") != f"Bearer {repo.token}"):
            # As the Hub: a private repository is "not found" to whoever may not see it.
            return self._send(request, 401 if repo else 404, b"{}", {"X-Error-Code": "RepoNotFound"}, body)
        if tree:
            listing = [
                {
                    "type": "file",
                    "path": filename,
                    "size": len(data),
                    "oid": hashlib.sha1(data).hexdigest(),
                    "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 132},
                }
                for filename, data in repo.files.items()
            ]
            return self._send(request, 200, json.dumps(listing).encode(), {"Content-Type": "application/json"}, body)
        assert resolve is not None
        filename = resolve.group(2)
        if filename not in repo.files:
            return self._send(request, 404, b"{}", {"X-Error-Code": "EntryNotFound"}, body)
        data = repo.served.get(filename, repo.files[filename])
        sha = hashlib.sha256(repo.files[filename]).hexdigest()
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"', "Accept-Ranges": "bytes"}
        status, start = 200, 0
        if body:
            wanted = request.headers.get("range")
            self.ranges.append(wanted or "")
            if wanted:
                start = int(re.match(r"bytes=(\d+)-", wanted).group(1))
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        payload = data[start:]
        limit = repo.drop_after.pop(filename, None) if body else None
        if limit is not None:  # promise everything, send part, hang up: a dropped connection
            request.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(payload))}.items():
                request.send_header(key, value)
            request.end_headers()
            request.wfile.write(payload[:limit])
            request.wfile.flush()
            request.close_connection = True
            return
        self._send(request, status, payload, headers, body)

    @staticmethod
    def _send(
        request: BaseHTTPRequestHandler, status: int, payload: bytes, headers: dict[str, str], body: bool
    ) -> None:
        request.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(payload))}.items():
            request.send_header(key, value)
        request.end_headers()
        if body:
            request.wfile.write(payload)
