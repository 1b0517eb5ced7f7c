"""An in-process stand-in for the Hugging Face Hub, and a Hugging Face cache builder, for offline tests.

Sharing edit packs goes through ``huggingface_hub``; testing that without network needs something
that answers the same HTTP calls. :class:`FakeHub` is a tiny ``http.server`` on ``127.0.0.1`` that
implements just the endpoints ``huggingface_hub`` 2.x uses to create a repo, upload a folder and
download it again:

* ``POST /api/repos/create`` (409 when the repo exists, as the Hub answers ``exist_ok``),
* ``POST /api/validate-yaml`` (parses the model card's YAML front matter with PyYAML),
* ``POST /api/models/<repo>/preupload/<rev>`` (every file is a *regular* upload: see below),
* ``POST /api/models/<repo>/commit/<rev>`` (the ndjson commit payload, base64 file contents),
* ``GET /api/models/<repo>/revision/<rev>``, ``GET /api/models/<repo>/tree/<rev>`` (repo info and
  file listing, for ``snapshot_download`` / ``list_repo_files``),
* ``HEAD``/``GET /<repo>/resolve/<rev>/<path>`` (file metadata and content, for ``hf_hub_download``).

It records every commit (message, files, bytes) so tests can assert what was pushed.

What it does not do: the real Hub sends large binary files (``*.safetensors``) through Xet/LFS
storage; here the preupload answer is ``"regular"`` for every file, so ``huggingface_hub`` inlines
them (base64) in the commit. Authentication is not checked (the ``Authorization`` header is recorded).
A push to the real Hub is therefore *not* exercised by anything that uses this class.

:func:`populate_hf_cache` lays a local folder out exactly as ``huggingface_hub`` caches a download
(``models--org--name/{blobs,snapshots/<commit>,refs/main}``), so loading *by repo id* with
``HF_HUB_OFFLINE=1`` can be tested without any server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

__all__ = ["Commit", "FakeHub", "populate_hf_cache"]


@dataclass
class Commit:
    """One commit received by :class:`FakeHub`."""

    oid: str
    summary: str
    description: str
    files: dict[str, bytes]
    deleted: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    def files(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for c in self.commits:
            for path in c.deleted:
                out.pop(path, None)
            out.update(c.files)
        return out

    @property
    def sha(self) -> str:
        return self.commits[-1].oid if self.commits else "0" * 40


class FakeHub:
    """A local Hub server for tests: ``with FakeHub() as hub: HfApi(endpoint=hub.endpoint)...``.

    Attributes:
        endpoint: ``http://127.0.0.1:<port>``, to pass as ``endpoint=`` (or ``HF_ENDPOINT``).
        requests: ``(method, path)`` of every request received, in order.
    """

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.yaml_checked: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not running; call start() or use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ inspection
    def commits(self, repo_id: str) -> list[Commit]:
        return list(self.repos[repo_id].commits)

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The repo's files at its latest commit."""
        return self.repos[repo_id].files()


# ---------------------------------------------------------------------- HTTP handler

_API_RE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<op>preupload|commit|revision|tree)/(?P<rev>[^/?]+)(?P<rest>/.*)?$")
_RESOLVE_RE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return None  # keep test output clean

    # ------------------------------------------------------------------ helpers
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, payload: Any = None, *, raw: bytes | None = None, headers: dict[str, str] | None = None,
              head: bool = False) -> None:
        data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None, head: bool = False) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers=headers, head=head)

    def _repo(self, repo_id: str, head: bool = False) -> _Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, f"Repository {repo_id} not found", code="RepoNotFound", head=head)
        return repo

    def _record(self) -> str:
        path = unquote(urlparse(self.path).path)
        with self.hub._lock:
            self.hub.requests.append((self.command, path))
        return path

    # ------------------------------------------------------------------ verbs
    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        path = self._record()
        body = self._body()
        if path == "/api/repos/create":
            return self._create(json.loads(body or b"{}"))
        if path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body or b"{}"))
        m = _API_RE.match(path)
        if m and m["op"] == "preupload":
            return self._preupload(m["repo"], json.loads(body or b"{}"))
        if m and m["op"] == "commit":
            return self._commit(m["repo"], body)
        self._error(404, f"FakeHub does not implement POST {path}")

    def do_GET(self) -> None:  # noqa: N802
        self._get(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._get(head=True)

    def _get(self, head: bool) -> None:
        path = self._record()
        m = _API_RE.match(path)
        if m and m["op"] in ("revision", "tree"):
            repo = self._repo(m["repo"], head)
            if repo is None:
                return None
            if not repo.commits:
                return self._error(404, f"Revision {m['rev']} not found", code="RevisionNotFound", head=head)
            files = repo.files()
            if m["op"] == "revision":
                info = {"id": repo.repo_id, "sha": repo.sha, "private": repo.private,
                        "siblings": [{"rfilename": p} for p in sorted(files)]}
                return self._send(200, info, head=head)
            tree = [{"type": "file", "path": p, "size": len(b), "oid": _git_blob_sha(b)} for p, b in sorted(files.items())]
            return self._send(200, tree, head=head)
        m = _RESOLVE_RE.match(path)
        if m:
            repo = self._repo(m["repo"], head)
            if repo is None:
                return None
            files = repo.files()
            if m["rev"] not in ("main", repo.sha) or m["path"] not in files:
                return self._error(404, f"Entry {m['path']} not found", code="EntryNotFound", head=head)
            data = files[m["path"]]
            headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{_git_blob_sha(data)}"'}
            return self._send(200, raw=data, headers=headers, head=head)
        self._error(404, f"FakeHub does not implement {self.command} {path}", head=head)

    # ------------------------------------------------------------------ endpoints
    def _create(self, payload: dict[str, Any]) -> None:
        name, org = payload.get("name"), payload.get("organization")
        repo_id = f"{org}/{name}" if org else f"user/{name}"
        with self.hub._lock:
            if repo_id in self.hub.repos:
                # the Hub's 409 body carries the url too; create_repo(exist_ok=True) reads it
                msg = "You already created this model repo"
                return self._send(409, {"error": msg, "url": f"{self.hub.endpoint}/{repo_id}"},
                                  headers={"X-Error-Message": msg, "X-Error-Code": "RepoExists"})
            self.hub.repos[repo_id] = _Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        self._send(200, {"url": f"{self.hub.endpoint}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, payload: dict[str, Any]) -> None:
        import yaml

        content = payload.get("content", "")
        m = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        if not m:
            return self._send(200, {"warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
        try:
            meta = yaml.safe_load(m.group(1)) or {}
        except yaml.YAMLError as exc:
            return self._error(400, f"Invalid YAML in README.md: {exc}")
        self.hub.yaml_checked.append(meta)
        self._send(200, {"errors": [], "warnings": []})

    def _preupload(self, repo_id: str, payload: dict[str, Any]) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return None
        current = repo.files()
        out = []
        for f in payload.get("files", []):
            old = current.get(f["path"])
            out.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                        "oid": _git_blob_sha(old) if old is not None else None})
        self._send(200, {"files": out, "commitOid": repo.sha})

    def _commit(self, repo_id: str, body: bytes) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return None
        header: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                return self._error(400, f"FakeHub does not implement commit operation {key!r} (LFS/Xet uploads)")
        h = hashlib.sha1()
        h.update(repo.sha.encode())
        h.update(json.dumps(header, sort_keys=True).encode())
        for p in sorted(files):
            h.update(p.encode() + b"\0" + files[p])
        oid = h.hexdigest()
        auth = {k: v for k, v in self.headers.items() if k.lower() == "authorization"}
        with self.hub._lock:
            repo.commits.append(Commit(oid, header.get("summary", ""), header.get("description", ""), files, deleted, auth))
        self._send(200, {"commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True})


def _git_blob_sha(data: bytes) -> str:
    """The git blob id of ``data`` (what the Hub reports as a regular file's oid/etag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ---------------------------------------------------------------------- HF cache layout


def populate_hf_cache(
    folder: str | os.PathLike,
    repo_id: str,
    cache_dir: str | os.PathLike,
    *,
    revision: str = "main",
    commit: str | None = None,
) -> Path:
    """Copy the files of ``folder`` into ``cache_dir`` the way ``huggingface_hub`` caches a download.

    Layout (``huggingface_hub``'s cache-system docs)::

        <cache_dir>/models--<org>--<name>/
            blobs/<etag>                       file contents, named by git blob sha
            snapshots/<commit>/<path>          relative symlinks to ../../blobs/<etag>
            refs/<revision>                    the commit hash, no trailing newline

    Returns the snapshot folder. ``commit`` defaults to a hash of the folder's contents.
    """
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    if commit is None:
        h = hashlib.sha1()
        for p, b in files.items():
            h.update(p.encode() + b"\0" + b)
        commit = h.hexdigest()
    storage = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        etag = _git_blob_sha(data)
        blob = storage / "blobs" / etag
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        try:
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:  # pragma: no cover - filesystems without symlinks: huggingface_hub copies too
            link.write_bytes(data)
    (storage / "refs" / revision).write_text(commit)
    return snapshot
