"""A local Hugging Face Hub server for tests: standard library only, in-memory, with fault injection.

It speaks enough of the Hub's HTTP protocol for the real ``huggingface_hub`` client (and so diffusers'
``from_pretrained``) to create repos, upload folders (inline base64 files, or the LFS batch API + PUT when
the client runs with ``HF_HUB_DISABLE_XET=1``), list trees, read repo info and download files. Protocol facts
come from ``huggingface_hub`` 2.4's client code (``_commit_api.py``, ``lfs.py``, ``file_download.py``); what it
implements and why is in docs/hub_protocol.md.

Faults:
    ``fail_next(n, status=500)``: the next ``n`` matching requests get ``status`` with a JSON error body.
    ``delay_next(n, seconds)``: the next ``n`` matching requests are answered after ``seconds`` (client timeouts).
    ``go_down(seconds)``: the port refuses connections (listener and open connections closed) and comes back
        after ``seconds`` (``None``: until ``come_up()``).

Usage::

    server = HubServer().start()        # or HubServer(port=...) to bind a chosen port
    os.environ["HF_ENDPOINT"] = server.url
    ...
    server.stop()
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_NAMESPACE = "test-user"
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


def git_blob_sha1(content: bytes) -> str:
    """Git's object id of a blob: sha1 over ``blob <size>\\0`` + content (what the Hub calls ``oid``)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class StoredFile:
    """One file at one revision; ``lfs_sha256`` is set for files stored through LFS."""

    content: bytes
    lfs_sha256: str | None = None

    @property
    def blob_id(self) -> str:
        if self.lfs_sha256 is not None:
            return git_blob_sha1(lfs_pointer(self.lfs_sha256, len(self.content)))
        return git_blob_sha1(self.content)

    @property
    def etag(self) -> str:
        # The Hub's ETag is the git blob id for regular files and the sha256 for LFS files.
        return self.lfs_sha256 or self.blob_id


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def resolve(self, revision: str) -> Commit | None:
        if revision == "main":
            return self.head
        return next((c for c in self.commits if c.oid == revision), None)


@dataclass
class _Fault:
    remaining: int
    match: str | None
    status: int | None = None
    delay: float = 0.0

    def applies(self, method: str, path: str) -> bool:
        return self.remaining > 0 and (self.match is None or re.search(self.match, f"{method} {path}") is not None)


class HubError(Exception):
    """An HTTP error reply: status, message and the Hub's ``X-Error-Code``."""

    def __init__(self, status: int, message: str, error_code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code


class HubServer:
    """In-memory Hub on 127.0.0.1 with fault injection; see the module docstring.

    Args:
        port: port to bind (0 picks a free one).
        lfs_min_size: files of at least this many bytes are answered ``uploadMode: "lfs"`` in preupload;
            ``None`` answers ``"regular"`` for everything (required when ``hf_xet`` is active on the client,
            which sends every LFS file through Xet, a protocol this server does not speak).
    """

    def __init__(self, port: int = 0, lfs_min_size: int | None = None):
        self.host = "127.0.0.1"
        self.port = port
        self.lfs_min_size = lfs_min_size
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.auth_headers: list[str] = []  # every Authorization header seen, so tests can check a token was sent
        self.unhandled: list[tuple[str, str]] = []
        self._faults: list[_Fault] = []
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._up_timer: threading.Timer | None = None

    # ----------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> HubServer:
        """Bind and serve in a daemon thread; returns ``self``."""
        server = self

        class _Httpd(ThreadingHTTPServer):
            allow_reuse_address = True
            daemon_threads = True

            def process_request(self, request, client_address):
                with server._lock:
                    server._connections.add(request)
                super().process_request(request, client_address)

            def shutdown_request(self, request):
                with server._lock:
                    server._connections.discard(request)
                super().shutdown_request(request)

        self._httpd = _Httpd((self.host, self.port), _make_handler(self))
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every open connection (the port then refuses connections)."""
        if self._up_timer is not None:
            self._up_timer.cancel()
            self._up_timer = None
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self._connections.clear()
        self._httpd = None

    def go_down(self, seconds: float | None = None) -> None:
        """Refuse connections now; come back by itself after ``seconds`` (never, if ``None``)."""
        self.stop()
        if seconds is not None:
            self._up_timer = threading.Timer(seconds, self.come_up)
            self._up_timer.daemon = True
            self._up_timer.start()

    def come_up(self) -> None:
        if self._httpd is None:
            self.start()

    def reset(self) -> None:
        """Forget every repo, object, fault and recorded request (between tests)."""
        with self._lock:
            self.repos.clear()
            self.lfs_objects.clear()
            self.requests.clear()
            self.auth_headers.clear()
            self.unhandled.clear()
            self._faults.clear()
        self.lfs_min_size = None
        self.come_up()

    # ----------------------------------------------------------------- faults
    def fail_next(self, count: int, status: int = 500, match: str | None = None) -> None:
        """Answer the next ``count`` requests whose ``"METHOD /path"`` matches regex ``match`` with ``status``."""
        with self._lock:
            self._faults.append(_Fault(remaining=count, match=match, status=status))

    def delay_next(self, count: int, seconds: float, match: str | None = None) -> None:
        """Answer the next ``count`` matching requests only after ``seconds``."""
        with self._lock:
            self._faults.append(_Fault(remaining=count, match=match, delay=seconds))

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.applies(method, path):
                    fault.remaining -= 1
                    return fault
        return None

    # ----------------------------------------------------------------- repo helpers for tests
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Path -> content of ``repo_id`` at ``revision``."""
        commit = self._repo(repo_id, "model").resolve(revision)
        if commit is None:
            raise KeyError(revision)
        return {path: f.content for path, f in commit.files.items()}

    def _repo(self, repo_id: str, repo_type: str) -> Repo:
        repo = self.repos.get(f"{repo_type}:{repo_id}")
        if repo is None:
            raise HubError(404, f"Repository Not Found for url: {repo_id}", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, message: str, files: dict[str, StoredFile]) -> Commit:
        parent = repo.commits[-1].oid if repo.commits else ""
        digest = hashlib.sha1(f"{parent}\n{message}\n{time.time_ns()}".encode())
        for path in sorted(files):
            digest.update(f"{path}:{files[path].etag}".encode())
        commit = Commit(oid=digest.hexdigest(), message=message, files=files)
        repo.commits.append(commit)
        return commit

    # ----------------------------------------------------------------- endpoints
    def create_repo(self, host: str, body: dict) -> tuple[int, dict]:
        repo_type = body.get("type") or "model"
        namespace = body.get("organization") or DEFAULT_NAMESPACE
        repo_id = f"{namespace}/{body['name']}"
        url = f"http://{host}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        with self._lock:
            key = f"{repo_type}:{repo_id}"
            if key in self.repos:
                return 409, {"error": "You already created this model repo", "url": url}
            repo = Repo(repo_id=repo_id, repo_type=repo_type, private=body.get("visibility") == "private")
            self._commit(repo, "initial commit", {".gitattributes": StoredFile(_GITATTRIBUTES)})
            self.repos[key] = repo
        return 200, {"url": url, "name": repo_id, "id": repo_id}

    def preupload(self, repo: Repo, revision: str, body: dict) -> dict:
        commit = repo.resolve(revision)
        existing = commit.files if commit is not None else {}
        files = []
        for entry in body.get("files", []):
            lfs = self.lfs_min_size is not None and entry["size"] >= self.lfs_min_size
            old = existing.get(entry["path"])
            files.append(
                {
                    "path": entry["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": old.blob_id if old is not None else None,
                }
            )
        return {"files": files}

    def commit(self, repo: Repo, revision: str, host: str, ndjson: bytes) -> dict:
        if revision != "main":
            raise HubError(400, "this test server commits to main only")
        lines = [json.loads(line) for line in ndjson.splitlines() if line.strip()]
        with self._lock:
            files = dict(repo.head.files)
            header = {}
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "header":
                    header = value
                elif key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                    files[value["path"]] = StoredFile(base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    content = self.lfs_objects.get(value["oid"])
                    if content is None:
                        raise HubError(422, f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = StoredFile(content, lfs_sha256=value["oid"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: f for p, f in files.items() if not p.startswith(prefix)}
                else:
                    raise HubError(400, f"unsupported commit operation {key!r}")
            commit = self._commit(repo, header.get("summary", ""), files)
        return {"commitUrl": f"http://{host}/{repo.repo_id}/commit/{commit.oid}", "commitOid": commit.oid}

    def lfs_batch(self, host: str, body: dict) -> dict:
        objects = []
        for obj in body.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs_objects:
                entry["actions"] = {"upload": {"href": f"http://{host}/__lfs/{obj['oid']}", "header": {}}}
            objects.append(entry)
        return {"transfer": "basic", "objects": objects}

    def lfs_put(self, oid: str, content: bytes) -> None:
        if hashlib.sha256(content).hexdigest() != oid:
            raise HubError(400, "sha256 of the uploaded content does not match the object id")
        with self._lock:
            self.lfs_objects[oid] = content

    def repo_info(self, repo: Repo, revision: str) -> dict:
        commit = self._resolve(repo, revision)
        return {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": commit.oid,
            "private": repo.private,
            "lastModified": "2026-01-01T00:00:00.000Z",
            "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        }

    def tree(self, repo: Repo, revision: str, prefix: str, recursive: bool) -> list[dict]:
        commit = self._resolve(repo, revision)
        prefix = prefix.strip("/")
        entries: dict[str, dict] = {}
        for path, stored in sorted(commit.files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1 :] if prefix else path
            parts = rest.split("/")
            base = f"{prefix}/" if prefix else ""
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts))):
                folder = base + "/".join(parts[:i])
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": git_blob_sha1(folder.encode())})
            if recursive or len(parts) == 1:
                entry = {"type": "file", "path": path, "size": len(stored.content), "oid": stored.blob_id}
                if stored.lfs_sha256 is not None:
                    pointer = lfs_pointer(stored.lfs_sha256, len(stored.content))
                    entry["lfs"] = {"oid": stored.lfs_sha256, "size": len(stored.content), "pointerSize": len(pointer)}
                entries[path] = entry
        return list(entries.values())

    def resolve_file(self, repo: Repo, revision: str, path: str) -> tuple[Commit, StoredFile]:
        commit = self._resolve(repo, revision)
        stored = commit.files.get(path)
        if stored is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        return commit, stored

    @staticmethod
    def _resolve(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit


def _make_handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub; every reply carries Content-Length

        def log_message(self, format, *args):  # noqa: A002 - silence the default stderr access log
            pass

        def do_GET(self):
            self._dispatch()

        def do_HEAD(self):
            self._dispatch()

        def do_POST(self):
            self._dispatch()

        def do_PUT(self):
            self._dispatch()

        def _read_body(self) -> bytes:
            # Always drain the body so the keep-alive connection stays in sync.
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, payload, headers: dict | None = None):
            self._send(status, json.dumps(payload).encode(), headers)

        def _dispatch(self):
            split = urlsplit(self.path)
            path, query = split.path, parse_qs(split.query)
            body = self._read_body()
            with server._lock:
                server.requests.append((self.command, path))
                if "Authorization" in self.headers:
                    server.auth_headers.append(self.headers["Authorization"])
            fault = server._take_fault(self.command, path)
            if fault is not None and fault.delay:
                time.sleep(fault.delay)
            if fault is not None and fault.status is not None:
                self._json(fault.status, {"error": f"injected fault: HTTP {fault.status}"})
                return
            try:
                self._route(path, query, body)
            except HubError as err:
                headers = {"X-Error-Code": err.error_code} if err.error_code else {}
                self._json(err.status, {"error": err.message}, headers)
            except (KeyError, ValueError, TypeError) as err:
                self._json(400, {"error": f"bad request: {err!r}"})

        def _repo_for(self, repo_type_plural: str, ns: str, name: str) -> Repo:
            repo = server._repo(f"{unquote(ns)}/{unquote(name)}", _REPO_TYPES[repo_type_plural])
            if repo.private and "Authorization" not in self.headers:
                # The Hub hides private repos from anonymous callers behind a 401 "Repository Not Found".
                raise HubError(401, "Repository Not Found", "RepoNotFound")
            return repo

        def _route(self, path: str, query: dict, body: bytes):
            host = self.headers.get("Host", f"{server.host}:{server.port}")
            method = self.command
            if method == "POST" and path == "/api/repos/create":
                status, payload = server.create_repo(host, json.loads(body))
                return self._json(status, payload)
            if method == "POST" and path == "/api/validate-yaml":
                return self._json(200, {"errors": [], "warnings": []})
            if method == "GET" and path == "/api/agent-harnesses":  # huggingface_hub's agent-detection registry
                return self._json(200, {"standardEnvVars": [], "harnesses": {}})
            if method == "GET" and path == "/api/whoami-v2":
                return self._json(200, {"type": "user", "name": DEFAULT_NAMESPACE, "orgs": []})
            if m := re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+)/([^/]+)/preupload/([^/]+)", path):
                if method == "POST":
                    return self._json(200, server.preupload(self._repo_for(*m.groups()[:3]), unquote(m[4]), json.loads(body)))
            if m := re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+)/([^/]+)/commit/([^/]+)", path):
                if method == "POST":
                    return self._json(200, server.commit(self._repo_for(*m.groups()[:3]), unquote(m[4]), host, body))
            if m := re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+)/([^/]+)(?:/revision/([^/]+))?", path):
                if method == "GET":
                    return self._json(200, server.repo_info(self._repo_for(*m.groups()[:3]), unquote(m[4] or "main")))
            if m := re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+)/([^/]+)/tree/([^/]+)(/.*)?", path):
                if method == "GET":
                    recursive = query.get("recursive", ["false"])[0].lower() == "true"
                    repo = self._repo_for(*m.groups()[:3])
                    return self._json(200, server.tree(repo, unquote(m[4]), unquote(m[5] or ""), recursive))
            if m := re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+)/([^/]+?)\.git/info/lfs/objects/batch", path):
                if method == "POST":
                    self._repo_for(m[1] or "models", m[2], m[3])
                    return self._json(200, server.lfs_batch(host, json.loads(body)))
            if m := re.fullmatch(r"/__lfs/([0-9a-f]{64})", path):
                if method == "PUT":
                    server.lfs_put(m[1], body)
                    return self._json(200, {})
            if m := re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)", path):
                if method in ("GET", "HEAD"):
                    repo = self._repo_for(m[1] or "models", m[2], m[3])
                    return self._send_file(repo, unquote(m[4]), unquote(m[5]))
            with server._lock:
                server.unhandled.append((method, path))
            raise HubError(404, f"test hub server has no route for {method} {path}")

        def _send_file(self, repo: Repo, revision: str, path: str):
            commit, stored = server.resolve_file(repo, revision, path)
            headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{stored.etag}"', "Accept-Ranges": "none"}
            if stored.lfs_sha256 is not None:
                headers.update({"X-Linked-Etag": f'"{stored.lfs_sha256}"', "X-Linked-Size": str(len(stored.content))})
            self._send(200, stored.content, headers, content_type="application/octet-stream")

    return Handler

