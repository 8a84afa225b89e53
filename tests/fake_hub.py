"""A fake Hugging Face Hub for offline tests: the real huggingface_hub upload and download code runs, only the HTTP
transport is replaced.

huggingface_hub sends all its traffic through one `httpx2.Client` made by a replaceable factory
(`huggingface_hub.utils._http.set_client_factory`). `FakeHub.client()` builds that client around an
`httpx2.MockTransport` that answers the endpoints a push and a download touch:

    POST /api/repos/create                         create a repo (409 when it exists)
    POST /api/validate-yaml                        the README.md metadata must parse as YAML
    POST /api/models/{repo}/preupload/{rev}        every file is uploaded in "regular" mode (no LFS, no Xet)
    POST /api/models/{repo}/commit/{rev}           ndjson: header, file (base64), deletedFile, deletedFolder
    GET  /api/models/{repo}[/revision/{rev}]       model info (sha, siblings)
    GET  /api/models/{repo}/tree/{rev}[/{path}]    file listing (snapshot_download)
    HEAD/GET /{repo}/resolve/{rev}/{path}          with X-Repo-Commit, ETag and Content-Length headers
    *    /api/telemetry/...                        accepted and ignored
    GET  /api/agent-harnesses                      an empty registry (huggingface_hub's agent detection)

Repos live in a folder (`root/org/name/files/...` plus `repo.json`), so another process can serve the same Hub:

    hub = FakeHub(tmp_path / "hub")
    with hub.installed():            # this process: huggingface_hub now talks to the fake Hub
        model.push_to_hub("org/name")
    # a subprocess: load this file by path, then `FakeHub(root).install()` before using huggingface_hub

Only the main branch exists; a revision is "main" or the current commit sha. Anything else the client asks for is
answered 501 and recorded in `hub.unhandled`, so a test can tell the fake fell short rather than the code under test.
This file imports only the standard library, httpx2 and huggingface_hub (never the package under test).
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote

import httpx2

ENDPOINT = "https://huggingface.co"
DEFAULT_NAMESPACE = "fake-user"  # the "logged in" user: owner of repos created without an organization


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file's content (what the Hub calls a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _json(status: int, payload, headers: dict | None = None) -> httpx2.Response:
    return httpx2.Response(status, json=payload, headers=headers or {})


def _error(status: int, code: str | None, message: str) -> httpx2.Response:
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return _json(status, {"error": message}, headers)


class FakeHub:
    """A folder-backed Hub. `requests` lists every `(method, path)` served, `unhandled` those it could not answer."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._lock = threading.RLock()

    # -- installing the transport ---------------------------------------------------------------------------------

    def client(self) -> httpx2.Client:
        """A client like huggingface_hub's default one (same request hook, so offline mode still refuses), whose
        transport is this fake Hub."""
        from huggingface_hub.utils._http import hf_request_event_hook

        return httpx2.Client(
            transport=httpx2.MockTransport(self.handle),
            event_hooks={"request": [hf_request_event_hook]},
            follow_redirects=True,
            timeout=None,
        )

    def install(self):
        """Route huggingface_hub's traffic to this Hub; returns a function that puts the previous factory back."""
        from huggingface_hub.utils import _http

        previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)
        _http.set_client_factory(self.client)  # also closes the client made by the previous factory
        return lambda: _http.set_client_factory(previous)

    @contextmanager
    def installed(self):
        restore = self.install()
        try:
            yield self
        finally:
            restore()

    # -- storage ----------------------------------------------------------------------------------------------------

    def _repo_dir(self, repo_id: str) -> Path:
        return self.root / repo_id

    def exists(self, repo_id: str) -> bool:
        return (self._repo_dir(repo_id) / "repo.json").is_file()

    def _meta(self, repo_id: str) -> dict:
        return json.loads((self._repo_dir(repo_id) / "repo.json").read_text())

    def _write_meta(self, repo_id: str, meta: dict) -> None:
        (self._repo_dir(repo_id) / "repo.json").write_text(json.dumps(meta, indent=1))

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The repo's files at its head, by path."""
        base = self._repo_dir(repo_id) / "files"
        return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}

    def commits(self, repo_id: str) -> list[dict]:
        return self._meta(repo_id)["commits"]

    # -- the transport ----------------------------------------------------------------------------------------------

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        path = unquote(request.url.path)
        with self._lock:
            self.requests.append((request.method, path))
            response = self._route(request, [part for part in request.url.path.split("/") if part])
        if response is None:
            self.unhandled.append((request.method, path))
            response = _error(501, None, f"the fake Hub does not serve {request.method} {path}")
        return response

    def _route(self, request: httpx2.Request, parts: list[str]) -> httpx2.Response | None:
        method = request.method
        if parts[:2] == ["api", "telemetry"]:
            return httpx2.Response(200)
        if parts == ["api", "agent-harnesses"]:  # huggingface_hub's best-effort agent detection
            return _json(200, {"standardEnvVars": [], "harnesses": {}})
        if parts == ["api", "repos", "create"] and method == "POST":
            return self._create(json.loads(request.content))
        if parts == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml(json.loads(request.content)["content"])
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            if not self.exists(repo_id):
                return _error(404, "RepoNotFound", f"Repository {repo_id} not found")
            if method == "GET" and (not rest or rest[0] == "revision"):
                return self._info(repo_id, unquote(rest[1]) if len(rest) > 1 else "main")
            if len(rest) >= 2 and rest[0] in ("preupload", "commit", "tree"):
                sha = self._resolve(repo_id, unquote(rest[1]))
                if sha is None:
                    return _error(404, "RevisionNotFound", f"Invalid rev id: {unquote(rest[1])}")
                if request.url.params.get("create_pr"):
                    return _error(400, None, "the fake Hub has no pull requests")
                if rest[0] == "preupload" and method == "POST":
                    return self._preupload(repo_id, json.loads(request.content))
                if rest[0] == "commit" and method == "POST":
                    return self._commit(repo_id, request.content)
                if rest[0] == "tree" and method == "GET":
                    recursive = request.url.params.get("recursive", "").lower() == "true"
                    return self._tree(repo_id, unquote("/".join(rest[2:])), recursive)
            return None
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id, revision, path = f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:]))
            return self._resolve_file(repo_id, revision, path, head=method == "HEAD")
        return None

    def _resolve(self, repo_id: str, revision: str) -> str | None:
        sha = self._meta(repo_id)["sha"]
        return sha if revision in ("main", "refs/heads/main", sha) else None

    def _create(self, payload: dict) -> httpx2.Response:
        repo_id = f"{payload.get('organization') or DEFAULT_NAMESPACE}/{payload['name']}"
        if payload.get("type", "model") != "model":
            return _error(400, None, "the fake Hub holds model repos only")
        if self.exists(repo_id):
            response = _json(409, {"error": "You already created this model repo", "url": f"{ENDPOINT}/{repo_id}"})
            response.headers["X-Error-Message"] = "You already created this model repo"
            return response
        (self._repo_dir(repo_id) / "files").mkdir(parents=True)
        empty = hashlib.sha1(f"initial commit of {repo_id}".encode()).hexdigest()
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self._write_meta(repo_id, {"sha": empty, "private": private, "commits": [{"oid": empty, "title": "initial"}]})
        return _json(200, {"url": f"{ENDPOINT}/{repo_id}", "name": repo_id, "id": repo_id})

    @staticmethod
    def _validate_yaml(content: str) -> httpx2.Response:
        import yaml

        if content.startswith("---"):
            front = content.split("---", 2)[1] if content.count("---") >= 2 else ""
            try:
                metadata = yaml.safe_load(front)
            except yaml.YAMLError as error:
                return _json(400, {"errors": [{"message": str(error)}], "warnings": []})
            if metadata is not None and not isinstance(metadata, dict):
                return _json(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
        return _json(200, {"errors": [], "warnings": []})

    def _preupload(self, repo_id: str, payload: dict) -> httpx2.Response:
        current = self.files(repo_id)
        files = [
            {
                "path": entry["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_sha1(current[entry["path"]]) if entry["path"] in current else None,
            }
            for entry in payload["files"]
        ]
        return _json(200, {"files": files})

    def _commit(self, repo_id: str, body: bytes) -> httpx2.Response:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return _error(400, None, "a commit starts with its header")
        base = self._repo_dir(repo_id) / "files"
        changes = []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            target = (base / value["path"]).resolve()
            if base.resolve() not in target.parents:
                return _error(400, None, f"bad path {value['path']!r}")
            if key == "file" and value.get("encoding") == "base64":
                changes.append(("add", target, base64.b64decode(value["content"])))
            elif key in ("deletedFile", "deletedFolder"):
                changes.append(("delete", target, None))
            else:
                return _error(400, None, f"the fake Hub does not take {key!r} commit lines")
        for kind, target, data in changes:
            if kind == "add":
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            elif target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        meta = self._meta(repo_id)
        tree = "".join(f"{path}\0{git_blob_sha1(data)}\n" for path, data in self.files(repo_id).items())
        sha = hashlib.sha1(f"{meta['sha']}\n{lines[0]['value']['summary']}\n{tree}".encode()).hexdigest()
        meta["sha"] = sha
        meta["commits"].append({"oid": sha, "title": lines[0]["value"]["summary"]})
        self._write_meta(repo_id, meta)
        return _json(
            200, {"commitUrl": f"{ENDPOINT}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}
        )

    def _info(self, repo_id: str, revision: str) -> httpx2.Response:
        sha = self._resolve(repo_id, revision)
        if sha is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        meta = self._meta(repo_id)
        siblings = [{"rfilename": path} for path in self.files(repo_id)]
        return _json(
            200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": meta["private"], "siblings": siblings}
        )

    def _tree(self, repo_id: str, prefix: str, recursive: bool) -> httpx2.Response:
        prefix = prefix.strip("/")
        entries, folders = [], set()
        for path, data in self.files(repo_id).items():
            if prefix and not path.startswith(prefix + "/"):
                continue
            relative = path[len(prefix) + 1 :] if prefix else path
            parts = relative.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(([prefix] if prefix else []) + parts[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append(
                        {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "path": folder}
                    )
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path})
        return _json(200, entries)

    def _resolve_file(self, repo_id: str, revision: str, path: str, head: bool) -> httpx2.Response:
        if not self.exists(repo_id):
            return _error(404, "RepoNotFound", f"Repository {repo_id} not found")
        sha = self._resolve(repo_id, revision)
        if sha is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        data = self.files(repo_id).get(path)
        if data is None:
            response = _error(404, "EntryNotFound", f"{path} does not exist on {revision}")
            response.headers["X-Repo-Commit"] = sha
            return response
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{git_blob_sha1(data)}"',
            "Content-Length": str(len(data)),
            "Content-Type": "application/octet-stream",
        }
        return httpx2.Response(200, headers=headers) if head else httpx2.Response(200, content=data, headers=headers)
