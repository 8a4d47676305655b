"""A fake Hugging Face Hub (and plain file host) on 127.0.0.1, misbehaving on request.

It speaks the shapes huggingface_hub 2.x uses:

- `HEAD|GET /{repo}/resolve/{revision}/{path}` with `X-Repo-Commit`, `ETag`
  (the sha256 for LFS files, as the Hub does), `X-Linked-Etag`,
  `X-Linked-Size`, `Accept-Ranges` and `Range` / `Content-Range`;
- `GET /api/models/{repo}[/revision/{revision}]` (model_info, `siblings`
  with `size`, `blobId` and `lfs.sha256` as with `files_metadata=True`);
- `GET /api/whoami-v2` (token check), and CivitAI's `GET /api/v1/me`;
- `GET /files/{name}` for plain URL downloads, with `Content-Disposition`.

Faults are queued per path fragment and used up one request at a time:
drop the connection after N body bytes, answer with a status (429 with
`Retry-After`, 500, 401...), send wrong bytes, ignore `Range` (and then
drop, with `at`), answer a range with a wrong `Content-Range`, trickle a
byte every `interval` seconds after `at` bytes, fall silent after `at`
bytes, or send the body without a `Content-Length`. Slow faults end by
themselves within `interval * TRICKLE_BYTES` seconds.

Bodies can be generated (`GeneratedBlob`) so that a 2 GB file costs no memory.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SEND_CHUNK = 1 << 20
TRICKLE_BYTES = 40  # a trickle sends this many bytes at most, then hangs up


class Blob:
    """Bytes held in memory."""

    def __init__(self, data: bytes):
        self.data = data
        self.size = len(data)
        self.sha256 = hashlib.sha256(data).hexdigest()

    def chunks(self, start: int, end: int) -> Iterator[bytes]:
        view = memoryview(self.data)
        for offset in range(start, end, SEND_CHUNK):
            yield view[offset : min(offset + SEND_CHUNK, end)]


class GeneratedBlob(Blob):
    """`size` bytes made by repeating one random block: large files without the memory."""

    def __init__(self, size: int, seed: int = 0, block_size: int = 1 << 20):
        import random

        self.block = random.Random(seed).randbytes(block_size)
        self.size = size
        digest = hashlib.sha256()
        for chunk in self.chunks(0, size):
            digest.update(chunk)
        self.sha256 = digest.hexdigest()

    def chunks(self, start: int, end: int) -> Iterator[bytes]:
        block, n = memoryview(self.block), len(self.block)
        offset = start
        while offset < end:
            at = offset % n
            piece = block[at : min(n, at + end - offset)]
            yield piece
            offset += len(piece)


@dataclass
class Fault:
    """One misbehaviour for the next request whose path contains `match`."""

    match: str
    kind: str  # "drop" | "status" | "corrupt" | "ignore_range" | "wrong_range" | "trickle" | "silent" | "no_length"
    at: int = 0  # drop, trickle, silent, ignore_range: body bytes sent before the fault begins (0: none for ignore_range)
    interval: float = 0.5  # trickle: seconds between bytes; silent: seconds of silence before hanging up
    skip: int = 0  # matching requests let through untouched before this one applies
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    methods: tuple[str, ...] = ("GET",)


@dataclass
class HubFile:
    blob: Blob
    lfs: bool


class FakeHub:
    def __init__(self, host: str = "127.0.0.1"):
        self.host = host  # any loopback address: 127.0.0.2 stands for "another host"
        self.repos: dict[str, dict[str, HubFile]] = {}
        self.plain: dict[str, tuple[Blob, dict[str, str]]] = {}
        self.faults: list[Fault] = []
        self.requests: list[dict] = []
        self.valid_tokens: set[str] = set()
        self.require_token = False
        self.pace: float | None = None  # bytes per second per connection, for bodies
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- content -------------------------------------------------------------
    def add_file(self, repo: str, path: str, data: bytes | Blob, lfs: bool | None = None) -> Blob:
        blob = data if isinstance(data, Blob) else Blob(data)
        self.repos.setdefault(repo, {})[path] = HubFile(blob, lfs if lfs is not None else path.endswith(".safetensors"))
        return blob

    def add_plain(self, name: str, data: bytes | Blob, headers: dict[str, str] | None = None) -> Blob:
        blob = data if isinstance(data, Blob) else Blob(data)
        self.plain[name] = (blob, dict(headers or {}))
        return blob

    def fault(self, match: str, kind: str, times: int = 1, **options) -> None:
        with self._lock:
            self.faults.extend(Fault(match, kind, **options) for _ in range(times))

    def body_requests(self, fragment: str) -> list[dict]:
        """GET requests (the ones that move bytes) whose path contains `fragment`."""
        return [r for r in self.requests if r["method"] == "GET" and fragment in r["path"]]

    # -- server --------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = QuietServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for index, fault in enumerate(self.faults):
                if fault.match in path and method in fault.methods:
                    if fault.skip:
                        fault.skip -= 1
                        return None
                    return self.faults.pop(index)
        return None


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """Clients that hang up (the point of some tests) are not errors worth a traceback."""


def etag_for(file: HubFile) -> str:
    # LFS files: the sha256 (what huggingface_hub treats as a content hash);
    # regular files: their git blob id, as the Hub serves them.
    return file.blob.sha256 if file.lfs else git_blob_id(file.blob.data)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    timeout = 10  # an idle keep-alive connection frees its thread

    def log_message(self, format, *args) -> None:  # keep test output quiet
        pass

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_GET(self) -> None:
        self._route("GET")

    def _route(self, method: str) -> None:
        hub = self.hub
        path = unquote(urlsplit(self.path).path)
        # The headers object itself: its `get` ignores case, as HTTP does.
        hub.requests.append({"method": method, "path": path, "headers": self.headers})
        fault = hub._take_fault(method, path)
        if fault is not None and fault.kind == "status":
            return self._json(fault.status, {"error": "fault"}, fault.headers)

        if path == "/api/whoami-v2" or path == "/api/v1/me":
            return self._whoami()
        if hub.require_token and not self._authorized():
            return self._json(401, {"error": "Invalid credentials"})

        match = re.fullmatch(r"/api/models/(.+?)(?:/revision/([^/]+))?", path)
        if match:
            return self._model_info(match.group(1), match.group(2))
        match = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
        if match:
            repo, revision, name = match.groups()
            file = hub.repos.get(repo, {}).get(name)
            if file is None or revision not in ("main", COMMIT):
                return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            headers = {
                "X-Repo-Commit": COMMIT,
                "ETag": f'"{etag_for(file)}"',
                "X-Linked-Size": str(file.blob.size),
            }
            if file.lfs:
                headers["X-Linked-Etag"] = f'"{file.blob.sha256}"'
            return self._send_blob(method, file.blob, headers, fault)
        if path.startswith("/files/") and path[len("/files/"):] in hub.plain:
            blob, headers = hub.plain[path[len("/files/"):]]
            return self._send_blob(method, blob, dict(headers), fault)
        return self._json(404, {"error": "Not found"})

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and auth[len("Bearer "):] in self.hub.valid_tokens

    def _whoami(self) -> None:
        if not self._authorized():
            return self._json(401, {"error": "Invalid credentials in Authorization header"})
        return self._json(200, {"type": "user", "name": "tester", "id": 7, "username": "tester"})

    def _model_info(self, repo: str, revision: str | None) -> None:
        files = self.hub.repos.get(repo)
        if files is None or revision not in (None, "main", COMMIT):
            return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        siblings = []
        for name, file in sorted(files.items()):
            sibling = {"rfilename": name, "size": file.blob.size, "blobId": etag_for(file)}
            if file.lfs:
                sibling["lfs"] = {"size": file.blob.size, "sha256": file.blob.sha256, "pointerSize": 134}
            siblings.append(sibling)
        return self._json(200, {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "siblings": siblings})

    def _json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_blob(self, method: str, blob: Blob, headers: dict[str, str], fault: Fault | None) -> None:
        start, end, status = 0, blob.size, 200
        kind = fault.kind if fault else None
        wanted = self.headers.get("Range")
        if wanted and kind != "ignore_range":
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
            if match:
                start = int(match.group(1))
                if match.group(2):
                    end = min(int(match.group(2)) + 1, blob.size)
                if start >= blob.size:
                    return self._json(416, {"error": "range"}, {"Content-Range": f"bytes */{blob.size}"})
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
        if kind == "wrong_range":  # a 206 for bytes that were not asked for, Range or not
            status = 206
            headers["Content-Range"] = f"bytes {start + 1}-{end - 1}/{blob.size}"
        self.send_response(status)
        if kind != "no_length":
            self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        for name, value in headers.items():
            self.send_header(name, value)
        if kind == "no_length":
            self.send_header("Connection", "close")
        self.end_headers()
        if method == "HEAD":
            return
        cut_at = fault.at if fault and (kind in ("drop", "trickle", "silent") or (kind == "ignore_range" and fault.at)) else None
        sent = 0
        try:
            for chunk in blob.chunks(start, end):
                if cut_at is not None and sent + len(chunk) >= cut_at:
                    self.wfile.write(chunk[: max(cut_at - sent, 0)])
                    self.wfile.flush()
                    self._misbehave(fault, bytes(chunk[max(cut_at - sent, 0):]))
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if kind == "corrupt":
                    chunk = bytes(b ^ 0xFF for b in chunk)
                self._write_paced(chunk)
                sent += len(chunk)
            if kind == "no_length":
                self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _write_paced(self, chunk) -> None:
        """At the hub's pace per connection (a storage node's per-connection limit), or as fast as it goes."""
        import time

        pace = self.hub.pace
        if not pace:
            self.wfile.write(chunk)
            return
        step = 64 * 1024
        started = time.monotonic()
        for offset in range(0, len(chunk), step):
            self.wfile.write(chunk[offset : offset + step])
            ahead = (offset + step) / pace - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)

    def _misbehave(self, fault: Fault, rest: bytes) -> None:
        """After the cut point: a trickle, a silence, or nothing (a drop)."""
        import time

        if fault.kind == "trickle":
            for byte in rest[:TRICKLE_BYTES]:
                time.sleep(fault.interval)
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
        elif fault.kind == "silent":
            time.sleep(fault.interval)


def serve_registry(hub: FakeHub, registry=None, weights_size: int = 4096) -> None:
    """Tiny stand-ins for every repo the base-model registry names, so real keys download in milliseconds."""
    from modal_services.base_models.registry import BASE_MODELS

    for n, entry in enumerate((registry or BASE_MODELS).values()):
        source = entry.source
        names = []
        for pattern in source.include or ("config.json", "model.safetensors", "tokenizer_config.json"):
            if any(ch in pattern for ch in "*?["):
                names += [pattern.replace("*", stem) for stem in ("vocab.json", "merges.txt")]
            else:
                names.append(pattern)
        for i, name in enumerate(names):
            data = (f"{entry.key}/{name}".encode() * (weights_size // 16 + 1))[:weights_size] if name.endswith(
                ".safetensors") else f'{{"file": "{name}", "n": {n}{i}}}'.encode()
            hub.add_file(source.repo_id, name, data)
