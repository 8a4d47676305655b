"""Discord's attachment CDN, faked on 127.0.0.1: where `fake_attachment`'s bytes are downloaded from.

`publish` serves bytes at a fresh signed-looking path (as Discord's
`attachment.url`, with `ex`/`is`/`hm` in the query) and returns the URL;
`redirect` and `answer` make paths that answer a redirect or a bare status.
A published file can wait before its body (`delay`, bounded by `MAX_DELAY`)
or go without a `Content-Length` (the body then ends when the connection
does). Every request path is recorded, and `cut` counts bodies the client
stopped reading before their end. Sockets time out; the server thread is a
daemon, stopped by `close`.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, urlsplit

MAX_DELAY = 5.0
SEND_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Served:
    data: bytes = b""
    content_type: str = "application/octet-stream"
    status: int = 200
    location: str | None = None
    delay: float = 0.0
    content_length: bool = True


class FakeCdn:
    def __init__(self):
        self.files: dict[str, Served] = {}
        self.requests: list[str] = []
        self.cut = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def host_port(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> "FakeCdn":
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "FakeCdn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        with self._lock:
            self.files.clear()
            self.requests.clear()
            self.cut = 0

    def _add(self, filename: str, served: Served) -> str:
        path = f"/attachments/3003/{next(self._ids)}/{quote(filename)}"
        self.files[path] = served
        return f"http://{self.host_port}{path}?ex=6800aa00&is=6800a000&hm={secrets.token_hex(16)}&"

    def publish(self, data: bytes, filename: str = "image.png", content_type: str = "image/png", *,
                delay: float = 0.0, content_length: bool = True) -> str:
        return self._add(filename, Served(data, content_type, delay=delay, content_length=content_length))

    def redirect(self, location: str, filename: str = "image.png") -> str:
        return self._add(filename, Served(status=302, location=location))

    def answer(self, status: int, filename: str = "image.png") -> str:
        return self._add(filename, Served(status=status))

    def wait_for_cut(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Whether `count` bodies have been cut by the client within `timeout` (the server notices late)."""
        deadline = time.monotonic() + timeout
        while self.cut < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.cut >= count


def _handler(cdn: FakeCdn):
    class Handler(BaseHTTPRequestHandler):
        timeout = 5  # a client that opens a connection and sends nothing is dropped

        def log_message(self, *args):  # quiet test output
            pass

        def do_GET(self):
            path = urlsplit(self.path).path
            with cdn._lock:
                cdn.requests.append(path)
            served = cdn.files.get(path)
            if served is None:
                self._bare(404)
            elif served.location is not None:
                self._bare(served.status, {"Location": served.location})
            elif served.status != 200:
                self._bare(served.status)
            else:
                self._body(served)

        def _bare(self, status: int, headers: dict[str, str] | None = None):
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _body(self, served: Served):
            self.send_response(200)
            self.send_header("Content-Type", served.content_type)
            if served.content_length:
                self.send_header("Content-Length", str(len(served.data)))
            self.end_headers()
            try:
                self.wfile.flush()
                time.sleep(min(served.delay, MAX_DELAY))
                view = memoryview(served.data)
                for offset in range(0, len(view), SEND_CHUNK):
                    self.wfile.write(view[offset : offset + SEND_CHUNK])
            except (BrokenPipeError, ConnectionResetError):
                with cdn._lock:
                    cdn.cut += 1

    return Handler
