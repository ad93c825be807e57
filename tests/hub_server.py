"""A local stand-in for the Hugging Face Hub's file protocol, for tests: real HTTP on 127.0.0.1.

It serves ``<root>/<owner>/<name>/<revision>/<file>`` the way the Hub serves a repository's files, so
flagcore's Hub code (huggingface_hub's ``hf_hub_download``, ``list_repo_refs``, and our range reads
through huggingface_hub's session) runs unchanged against it with ``HF_ENDPOINT`` set to its address:

* ``HEAD``/``GET /<owner>/<name>/resolve/<revision>/<file>``: the file, with ``ETag`` (its SHA-256, as
  the Hub gives for LFS files), ``X-Repo-Commit`` (the commit the revision points to), ``Content-Length``
  and ``Accept-Ranges: bytes``; a ``Range: bytes=a-b`` (or ``a-``) request is answered ``206 Partial
  Content`` with ``Content-Range`` (``416`` when unsatisfiable). A revision may also be named by its
  commit.
* ``GET /api/models/<owner>/<name>/refs``: the branches (every revision directory) and their commits.
* errors as the Hub sends them: ``X-Error-Code: RepoNotFound`` (401), ``RevisionNotFound`` (404),
  ``EntryNotFound`` (404).

A revision directory that is a symbolic link to another is a branch pointing to the same commit; a copy
is a different commit with the same bytes (Pythia's ``main`` and ``step143000``). The commit is the
SHA-1 of the resolved directory's absolute path (unique to this server's files, so no Hub cache left by
another test can match it). ``ranges=False`` makes the server ignore ``Range`` (answering 200 with the
whole file), for negative tests. ``requests`` (per method and path), ``body_bytes`` and
``range_requests`` account for the traffic independently of the client's own count.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class HubServer:
    def __init__(self, root: Path, *, ranges: bool = True):
        self.root = Path(root).resolve()
        self.ranges = ranges
        self.requests: Counter = Counter()  # (method, path) -> count
        self.body_bytes = 0
        self.range_requests = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):
                server._handle(self, body=False)

            def do_GET(self):
                server._handle(self, body=True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- repositories

    def _commit(self, directory: Path) -> str:
        return hashlib.sha1(str(directory.resolve()).encode()).hexdigest()

    def _revision_dir(self, repo: Path, revision: str) -> Path | None:
        candidate = repo / revision
        if "/" not in revision and candidate.is_dir():
            return candidate
        for child in repo.iterdir():  # a commit hash
            if child.is_dir() and self._commit(child) == revision:
                return child
        return None

    # -- protocol

    def _send(self, handler, status: int, headers: dict, payload: bytes, body: bool) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        if body and payload:
            handler.wfile.write(payload)
            with self._lock:
                self.body_bytes += len(payload)

    def _error(self, handler, status: int, code: str, message: str, body: bool) -> None:
        payload = json.dumps({"error": message}).encode()
        self._send(handler, status, {"X-Error-Code": code, "X-Error-Message": message,
                                     "Content-Type": "application/json"}, payload, body)

    def _handle(self, handler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        with self._lock:
            self.requests[(handler.command, path)] += 1
        parts = path.strip("/").split("/")
        if len(parts) == 5 and parts[:2] == ["api", "models"] and parts[4] == "refs":
            return self._refs(handler, parts[2], parts[3], body)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(handler, parts[0], parts[1], parts[3], "/".join(parts[4:]), body)
        self._error(handler, 404, "NotFound", f"no route {path}", body)

    def _refs(self, handler, owner: str, name: str, body: bool) -> None:
        repo = self.root / owner / name
        if not repo.is_dir():
            return self._error(handler, 401, "RepoNotFound", "Repository not found", body)
        branches = [{"name": child.name, "ref": f"refs/heads/{child.name}", "targetCommit": self._commit(child)}
                    for child in sorted(repo.iterdir()) if child.is_dir()]
        payload = json.dumps({"branches": branches, "converts": [], "tags": []}).encode()
        self._send(handler, 200, {"Content-Type": "application/json"}, payload, body)

    def _resolve(self, handler, owner: str, name: str, revision: str, filename: str, body: bool) -> None:
        repo = self.root / owner / name
        if not repo.is_dir():
            return self._error(handler, 401, "RepoNotFound", "Repository not found", body)
        directory = self._revision_dir(repo, revision)
        if directory is None:
            return self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
        file = directory / filename
        if ".." in Path(filename).parts or not file.is_file():
            return self._error(handler, 404, "EntryNotFound", f"{filename} does not exist on {revision}", body)
        data = file.read_bytes()
        headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": self._commit(directory),
                   "Accept-Ranges": "bytes" if self.ranges else "none", "Content-Type": "application/octet-stream"}
        requested = handler.headers.get("Range")
        if requested and self.ranges:
            match = _RANGE.fullmatch(requested.strip())
            if match is None:
                return self._error(handler, 400, "BadRange", f"unsupported Range {requested!r}", body)
            start = int(match[1])
            end = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
            if start >= len(data) or end < start:
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{len(data)}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            with self._lock:
                self.range_requests += 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(handler, 206, headers, data[start:end + 1], body)
        self._send(handler, 200, headers, data, body)
