"""A stand-in HuggingFace Hub: a real HTTP server on 127.0.0.1 speaking the routes huggingface_hub uses.

Routes (as huggingface_hub 2.4's `hf_api.py` / `file_download.py` call them):
- `GET /api/models/{repo}[/revision/{rev}]` (model_info; `?blobs=true` adds sizes, blob ids, LFS info)
- `GET /api/models/{repo}/tree/{rev}[/{path}]` (list_repo_tree, used by snapshot_download)
- `HEAD|GET /{repo}/resolve/{rev}/{path}`: `X-Repo-Commit`, `ETag` (git blob sha1, or the sha256 for LFS
  files), `Content-Length`, `Accept-Ranges`; LFS files answer 302 to `/cdn/{repo}/{sha256}` with
  `X-Linked-Etag`/`X-Linked-Size`, as the real hub sends its large files to a CDN.
- `GET /cdn/{repo}/{sha256}` with `Range: bytes=N-` support (206 + `Content-Range`).
Errors carry the hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound), which is what
huggingface_hub turns into its typed exceptions.

Test controls: `cut_next(path, after_bytes)` closes the connection once after N body bytes (to test
resume), `fail_next(path, status)` answers one GET with an error, `chunk_delay_s` slows every body
(to watch progress or cancel a transfer), and `requests` logs what was asked (method, repo, path, range).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_CDN = re.compile(r"^/cdn/(?P<repo>[^/]+/[^/]+)/(?P<sha>[0-9a-f]{64})$")
_CHUNK = 16 * 1024


@dataclass
class HubFile:
    data: bytes
    blob_sha1: str  # git's blob id
    sha256: str

    @property
    def is_lfs(self) -> bool:
        return self.sha256 != ""


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, HubFile]
    commit: str
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit


@dataclass
class LoggedRequest:
    method: str
    repo_id: str
    path: str
    range: str | None
    status: int
    authorization: str | None = None


def _hub_file(path: str, data: bytes) -> HubFile:
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    sha256 = hashlib.sha256(data).hexdigest() if path.endswith(LFS_SUFFIXES) else ""
    return HubFile(data=data, blob_sha1=blob, sha256=sha256)


class StandInHub:
    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[LoggedRequest] = []
        self.chunk_delay_s = 0.0
        self._cuts: dict[str, int] = {}
        self._failures: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> StandInHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, folder: Path, *, prefix: str = "", tags: tuple[str, ...] = ()) -> HubRepo:
        """Serve every file under `folder` (placed under `prefix/` inside the repo) on branch main."""
        files = {
            f"{prefix}/{p.relative_to(folder).as_posix()}".lstrip("/"): _hub_file(p.name, p.read_bytes())
            for p in sorted(Path(folder).rglob("*")) if p.is_file()
        }
        digest = hashlib.sha1(repo_id.encode())
        for path, hub_file in sorted(files.items()):
            digest.update(path.encode() + hub_file.blob_sha1.encode())
        commit = digest.hexdigest()
        repo = HubRepo(repo_id=repo_id, files=files, commit=commit, refs={"main": commit, **dict.fromkeys(tags, commit)})
        self.repos[repo_id] = repo
        return repo

    def reset(self) -> None:
        """Forget the request log and any fault not yet triggered."""
        with self._lock:
            self.requests.clear()
            self._cuts.clear()
            self._failures.clear()
        self.chunk_delay_s = 0.0

    def cut_next(self, path: str, *, after_bytes: int) -> None:
        """The next GET of repo file `path` sends only `after_bytes` of its body, then drops the connection."""
        with self._lock:
            self._cuts[path] = after_bytes

    def fail_next(self, path: str, *, status: int = 500) -> None:
        with self._lock:
            self._failures[path] = status

    def add_file(self, repo_id: str, path: str, data: bytes) -> None:
        """Add a file as listed (any name, even one a real hub would refuse) to a served repo."""
        self.repos[repo_id].files[path] = _hub_file(path, data)

    def gets_of(self, path: str) -> list[LoggedRequest]:
        return [r for r in self.requests if r.method == "GET" and r.path == path]

    # -- used by the handler ------------------------------------------------------------------
    def take_cut(self, path: str) -> int | None:
        with self._lock:
            return self._cuts.pop(path, None)

    def take_failure(self, path: str) -> int | None:
        with self._lock:
            return self._failures.pop(path, None)

    def log(self, entry: LoggedRequest) -> None:
        with self._lock:
            self.requests.append(entry)


def _make_handler(hub: StandInHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the real hub; every answer sets Content-Length

        def log_message(self, format, *args) -> None:  # noqa: A002 - silence stderr access logs
            pass

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route(head=False)

        # -- routing ---------------------------------------------------------------------------
        def _route(self, *, head: bool) -> None:
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            if match := _CDN.match(path):
                return self._cdn(match["repo"], match["sha"], head=head)
            if match := _TREE.match(path):
                return self._tree(match["repo"], match["rev"], match["path"] or "")
            if match := _INFO.match(path):
                return self._info(match["repo"], match["rev"] or "main", blobs=query.get("blobs") == ["true"])
            if match := _RESOLVE.match(path):
                return self._resolve(match["repo"], match["rev"], match["path"], head=head)
            self._error(404, "EntryNotFound", "no such route")

        def _repo_commit(self, repo_id: str, rev: str) -> tuple[HubRepo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                return None
            commit = repo.refs.get(rev) or (rev if rev == repo.commit else None)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", commit_header=None)
                return None
            return repo, commit

        def _info(self, repo_id: str, rev: str, *, blobs: bool) -> None:
            found = self._repo_commit(repo_id, rev)
            if found is None:
                return
            repo, commit = found
            siblings = []
            for path, f in repo.files.items():
                sibling: dict = {"rfilename": path}
                if blobs:
                    sibling.update(size=len(f.data), blobId=f.blob_sha1)
                    if f.is_lfs:
                        sibling["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": 134}
                siblings.append(sibling)
            self._json({"_id": commit[:24], "id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                        "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                        "lastModified": "2026-01-30T12:00:00.000Z", "siblings": siblings})

        def _tree(self, repo_id: str, rev: str, prefix: str) -> None:
            found = self._repo_commit(repo_id, rev)
            if found is None:
                return
            repo, _ = found
            entries = []
            for path, f in repo.files.items():
                if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                    continue
                entry: dict = {"type": "file", "oid": f.blob_sha1, "size": len(f.data), "path": path}
                if f.is_lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
                entries.append(entry)
            self._json(entries)

        def _resolve(self, repo_id: str, rev: str, path: str, *, head: bool) -> None:
            found = self._repo_commit(repo_id, rev)
            if found is None:
                return
            repo, commit = found
            f = repo.files.get(path)
            if f is None:
                self._error(404, "EntryNotFound", f"{path} does not exist on {rev}", commit_header=commit)
                return
            if f.is_lfs:  # like the hub: large files live elsewhere, the metadata rides on the redirect
                self._log(repo_id, path, 302)
                self.send_response(302)
                self.send_header("Location", f"/cdn/{repo_id}/{f.sha256}")
                self.send_header("X-Repo-Commit", commit)
                self.send_header("X-Linked-Etag", f'"{f.sha256}"')
                self.send_header("X-Linked-Size", str(len(f.data)))
                self.send_header("ETag", f'"{f.blob_sha1}"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._body(repo_id, path, f, etag=f.blob_sha1, commit=commit, head=head)

        def _cdn(self, repo_id: str, sha: str, *, head: bool) -> None:
            repo = hub.repos.get(repo_id)
            found = next(((p, f) for p, f in repo.files.items() if f.sha256 == sha), None) if repo else None
            if found is None:
                self._error(404, "EntryNotFound", "no such blob")
                return
            path, f = found
            self._body(repo_id, path, f, etag=f.sha256, commit=repo.commit, head=head)

        # -- answers ---------------------------------------------------------------------------
        def _body(self, repo_id: str, path: str, f: HubFile, *, etag: str, commit: str, head: bool) -> None:
            failure = None if head else hub.take_failure(path)
            if failure is not None:
                self._error(failure, "", "injected failure", log=(repo_id, path))
                return
            size, start = len(f.data), 0
            wanted = self.headers.get("Range")
            if wanted and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())):
                start = int(m[1])
                end = int(m[2]) if m[2] else size - 1
                status, body = 206, f.data[start:end + 1]
            else:
                status, body = 200, f.data
            self._log(repo_id, path, status, method="HEAD" if head else "GET", range_=wanted)
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Repo-Commit", commit)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{size}")
            self.end_headers()
            if head:
                return
            cut = hub.take_cut(path)
            sent = 0
            for offset in range(0, len(body), _CHUNK):
                chunk = body[offset:offset + _CHUNK]
                if cut is not None and sent + len(chunk) > cut:
                    self.wfile.write(chunk[: cut - sent])
                    self.wfile.flush()
                    self.close_connection = True  # the client sees a body shorter than Content-Length
                    return
                self.wfile.write(chunk)
                sent += len(chunk)
                if hub.chunk_delay_s:
                    threading.Event().wait(hub.chunk_delay_s)

        def _json(self, data: object) -> None:
            body = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, code: str, message: str, *, commit_header: str | None = None,
                   log: tuple[str, str] | None = None) -> None:
            if log:
                self._log(*log, status, method=self.command)
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit_header:
                self.send_header("X-Repo-Commit", commit_header)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _log(self, repo_id: str, path: str, status: int, *, method: str | None = None,
                 range_: str | None = None) -> None:
            hub.log(LoggedRequest(method or self.command, repo_id, path, range_, status,
                                  self.headers.get("Authorization")))

    return Handler
