"""Real servers on 127.0.0.1 in a thread: uvicorn for end-to-end tests and benchmarks, a bare HTTP handler
for transfer tests that need an answer no framework would send."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import uvicorn

LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def running_uvicorn(app, max_seconds: float = 60.0) -> Iterator[str]:
    """Serve `app` on an ephemeral loopback port; yields its base URL.

    The server stops when the block ends, or by itself after `max_seconds`
    whatever the test does, so a hung test cannot leave it listening.
    """
    with running_server(uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on")), max_seconds) as url:
        yield url


@contextlib.contextmanager
def running_server(server: uvicorn.Server, max_seconds: float = 60.0) -> Iterator[str]:
    """`running_uvicorn` for a server configured by the caller."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    deadline = threading.Timer(max_seconds, lambda: setattr(server, "should_exit", True))
    thread.start()
    deadline.start()
    try:
        for _ in range(500):
            if server.started or not thread.is_alive():
                break
            time.sleep(0.01)
        if not server.started:
            raise RuntimeError("uvicorn did not start within 5 s")
        yield f"http://{LOOPBACK}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        deadline.cancel()
        thread.join(timeout=10)
        sock.close()


@contextlib.contextmanager
def running_handler(handler: type[BaseHTTPRequestHandler], max_seconds: float = 60.0) -> Iterator[str]:
    """Serve `handler` on an ephemeral loopback port; yields its base URL. Stops when the block ends, or by
    itself after `max_seconds`."""
    server = ThreadingHTTPServer((LOOPBACK, 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    deadline = threading.Timer(max_seconds, server.shutdown)
    thread.start()
    deadline.start()
    try:
        yield f"http://{LOOPBACK}:{server.server_address[1]}"
    finally:
        deadline.cancel()
        server.shutdown()
        server.server_close()
