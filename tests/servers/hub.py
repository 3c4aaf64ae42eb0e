"""A local server speaking the parts of the HuggingFace Hub HTTP API that huggingface_hub's
snapshot_download calls, so tests run the real client code path behind HF_ENDPOINT.

Answers: model info by revision, recursive tree listing, HEAD/GET of /resolve/ with the commit,
ETag and LFS headers, byte ranges, and the Hub's error codes (RepoNotFound, RevisionNotFound,
GatedRepo) with its status codes.
"""

import hashlib
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".pt")


@dataclass
class HubRepo:
    revisions: dict[str, Path]  # branch/tag name -> folder with the files of that revision
    token: str | None = None  # private: only this bearer token may read
    gated: bool = False
    shas: dict[str, str] = field(default_factory=dict)

    def sha(self, rev: str) -> str | None:
        if rev in self.revisions:
            return self.shas.setdefault(rev, hashlib.sha1(f"{rev}:{self.revisions[rev]}".encode()).hexdigest())
        return rev if rev in self.shas.values() else None

    def folder(self, rev_or_sha: str) -> Path | None:
        for name, folder in self.revisions.items():
            if rev_or_sha in (name, self.sha(name)):
                return folder
        return None


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _oids(path: Path) -> tuple[str, str]:
    data = path.read_bytes()
    git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return git, hashlib.sha256(data).hexdigest()


class HubServer:
    def __init__(self, stall_after: int | None = None):
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[tuple[str, str]] = []
        # stall_after: a weight file's GET sends that many bytes, then waits for `release` (a download in flight
        # that cannot finish on its own); `stalled` is set once one waits
        self.stall_after, self.release, self.stalled = stall_after, threading.Event(), threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server._handle(self, head=False)

            def do_HEAD(self):
                server._handle(self, head=True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> "HubServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add(self, repo_id: str, folder: Path, *, revision: str = "main", token: str | None = None,
            gated: bool = False) -> HubRepo:
        repo = self.repos.setdefault(repo_id, HubRepo(revisions={}, token=token, gated=gated))
        repo.revisions[revision] = Path(folder)
        repo.shas.pop(revision, None)  # adding to a branch again moves it to a new commit
        return repo

    # -- request handling -------------------------------------------------------------------
    def _send(self, h, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)) if not (headers or {}).get("Content-Length") else
                      headers["Content-Length"])
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def _error(self, h, status: int, code: str, msg: str, head: bool):
        body = json.dumps({"error": msg}).encode()
        self._send(h, status, body, {"X-Error-Code": code, "X-Error-Message": msg,
                                     "Content-Type": "application/json"}, head)

    def _authorized(self, h, repo: HubRepo, head: bool) -> bool:
        auth = h.headers.get("Authorization", "")
        if repo.token and auth != f"Bearer {repo.token}":
            if repo.gated:
                self._error(h, 403 if auth else 401, "GatedRepo", "Access to this model is restricted.", head)
            else:
                self._error(h, 401, "RepoNotFound", "Repository not found", head)
            return False
        return True

    def _handle(self, h, head: bool):
        url = urllib.parse.urlsplit(h.path)
        path = urllib.parse.unquote(url.path)
        self.requests.append((h.command, path))
        m = re.match(r"^/api/models/(.+)/revision/(.+)$", path)
        if m:
            return self._model_info(h, m.group(1), m.group(2), head)
        m = re.match(r"^/api/models/([^/]+/[^/]+)$", path)
        if m:
            return self._model_info(h, m.group(1), "main", head)
        m = re.match(r"^/api/models/(.+?/.+?)/tree/([^/]+)(/.*)?$", path)
        if m:
            return self._tree(h, m.group(1), m.group(2), head)
        m = re.match(r"^/(.+?/.+?)/resolve/([^/]+)/(.+)$", path)
        if m:
            return self._resolve(h, m.group(1), m.group(2), m.group(3), head)
        self._error(h, 404, "EntryNotFound", f"no route {path}", head)

    def _repo(self, h, repo_id: str, head: bool) -> HubRepo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 401, "RepoNotFound", "Repository not found", head)  # the Hub hides existence
            return None
        return repo if self._authorized(h, repo, head) else None

    def _model_info(self, h, repo_id, rev, head):
        repo = self._repo(h, repo_id, head)
        if not repo:
            return
        folder, sha = repo.folder(rev), repo.sha(rev)
        if folder is None:
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        body = json.dumps({"_id": sha, "id": repo_id, "modelId": repo_id, "sha": sha, "private": bool(repo.token),
                           "gated": repo.gated, "disabled": False, "tags": [], "downloads": 0, "likes": 0,
                           "lastModified": "2026-01-01T00:00:00.000Z",
                           "siblings": [{"rfilename": f} for f in _files(folder)]}).encode()
        self._send(h, 200, body, {"Content-Type": "application/json"}, head)

    def _tree(self, h, repo_id, rev, head):
        repo = self._repo(h, repo_id, head)
        if not repo:
            return
        folder = repo.folder(rev)
        if folder is None:
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        entries = []
        for f in _files(folder):
            p = folder / f
            git, sha256 = _oids(p)
            e = {"type": "file", "oid": git, "size": p.stat().st_size, "path": f}
            if f.endswith(LFS_SUFFIXES):
                e["lfs"] = {"oid": sha256, "size": p.stat().st_size, "pointerSize": 134}
            entries.append(e)
        self._send(h, 200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, head)

    def _resolve(self, h, repo_id, rev, fname, head):
        repo = self._repo(h, repo_id, head)
        if not repo:
            return
        folder = repo.folder(rev)
        if folder is None:
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        p = folder / fname
        if not p.is_file() or ".." in Path(fname).parts:
            return self._error(h, 404, "EntryNotFound", f"{fname} does not exist", head)
        git, sha256 = _oids(p)
        size = p.stat().st_size
        headers = {"X-Repo-Commit": repo.folder and repo.sha(rev) or rev, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        for name in repo.revisions:
            if rev in (name, repo.sha(name)):
                headers["X-Repo-Commit"] = repo.sha(name)
        if fname.endswith(LFS_SUFFIXES):
            headers.update({"X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(size), "ETag": f'"{sha256}"'})
        else:
            headers["ETag"] = f'"{git}"'
        start = 0
        rng = h.headers.get("Range")
        m = re.match(r"bytes=(\d+)-(\d*)$", rng or "")
        if m and not head:
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else size - 1
            with open(p, "rb") as f:
                f.seek(start)
                body = f.read(end - start + 1)
            headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{size}"
            return self._send(h, 206, body, headers)
        if head:
            headers["Content-Length"] = str(size)
            return self._send(h, 200, b"", headers, head=True)
        if self.stall_after is not None and fname.endswith(LFS_SUFFIXES):
            return self._send_stalled(h, p.read_bytes(), headers, start)
        return self._send(h, 200, p.read_bytes(), headers)

    def _send_stalled(self, h, data: bytes, headers: dict, start: int) -> None:
        body = data[start:]
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        h.send_response(206 if start else 200)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body[:self.stall_after])
        h.wfile.flush()
        self.stalled.set()
        self.release.wait(120)
        h.wfile.write(body[self.stall_after:])
