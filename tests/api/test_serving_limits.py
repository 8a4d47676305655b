"""`toolbox serve`'s uvicorn under slow and greedy clients, over raw sockets on 127.0.0.1, with small limits."""

from __future__ import annotations

import json
import logging
import socket
import time
from contextlib import ExitStack
from urllib.parse import urlsplit

import httpx
import pytest

from bot.api import api_for_settings
from bot.api.server import ServingLimits, api_server, redacted_target
from bot.settings import Settings
from tests.servers import LOOPBACK, running_server

TOKEN = "limits-test-token-5c1e"
LIMITS = ServingLimits(header_timeout=0.6, min_body_rate=1000, connections_per_client=3, body_grace=0.3)


@pytest.fixture
def api_address():
    with running_server(api_server(api_for_settings(Settings.load(), TOKEN), LIMITS), max_seconds=30) as url:
        parts = urlsplit(url)
        yield url, (parts.hostname, parts.port)


def connected(address, source: str = LOOPBACK) -> socket.socket:
    sock = socket.create_connection(address, timeout=5, source_address=(source, 0))
    return sock


def read_until_closed(sock: socket.socket, limit: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection (or `limit` seconds pass)."""
    sock.settimeout(limit)
    received = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def error_of(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_slow_header_sender_is_cut_near_the_deadline(api_address):
    _, address = api_address
    with connected(address) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        sock.settimeout(0.1)
        answer = b""
        for byte in b"Host: x\r\nX-Slow: " + b"a" * 100:  # one byte every 50 ms, never done
            try:
                sock.sendall(bytes([byte]))
                answer = sock.recv(65536)
            except (socket.timeout, BlockingIOError):
                continue
            except OSError:
                break
            if answer:
                break
            time.sleep(0.05)
        took = time.monotonic() - started
        answer += read_until_closed(sock)
    status, body = error_of(answer)
    assert status == 408 and body["error_code"] == "TIMEOUT" and "0.6 s" in body["error"]
    assert 0.5 < took < 1.5


def test_slow_body_is_cut_with_an_answer_and_the_connection_closed(api_address):
    _, address = api_address
    with connected(address) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 5000\r\n\r\n")
        sock.settimeout(0.05)
        answer = b""
        for _ in range(100):  # 20 bytes a second against a floor of 1000
            try:
                sock.sendall(b"{")
                answer = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if answer:
                break
        took = time.monotonic() - started
        answer += read_until_closed(sock)
    status, body = error_of(answer)
    assert status == 408 and "too slowly" in body["error"]
    assert took < 1.5, took
    assert b"connection: close" in answer.lower()


def test_one_address_gets_its_connections_and_no_more_while_others_are_served(api_address):
    url, address = api_address
    with ExitStack() as held:
        for _ in range(LIMITS.connections_per_client):
            held.enter_context(connected(address))
        time.sleep(0.1)  # the server has accepted them
        with connected(address) as one_too_many:
            status, body = error_of(read_until_closed(one_too_many))
        assert status == 429 and body["error_code"] == "RATE_LIMITED"
        # Another address is served meanwhile (all of 127.0.0.0/8 is this machine).
        with connected(address, source="127.0.0.2") as other:
            other.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert read_until_closed(other).startswith(b"HTTP/1.1 200")
    time.sleep(0.1)  # the held ones are closed: the first address is served again
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200


def test_a_normal_client_is_unaffected(api_address):
    url, _ = api_address
    body = {"kind": "caption", "images_base64": ["x" * 200_000]}  # read in one go, far above the floor
    with httpx.Client(base_url=url, timeout=5, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        for _ in range(3):  # one kept-alive connection, idle past the header deadline between requests
            assert client.get("/health").status_code == 200
            refused = client.post("/jobs", json=body)
            assert refused.status_code == 400 and refused.json()["error_code"] == "INVALID_INPUT"
            time.sleep(0.3)


def test_the_access_log_shows_no_query_values(api_address, caplog):
    url, _ = api_address
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        httpx.get(f"{url}/health?token=very-secret-9f&plain-secret-77", timeout=5)
        time.sleep(0.05)
    lines = [record.getMessage() for record in caplog.records if record.name == "uvicorn.access"]
    assert any("/health?token=***&***" in line for line in lines), lines
    assert not any("secret" in line for line in lines)


@pytest.mark.parametrize("target, shown", [
    ("/jobs", "/jobs"),
    ("/jobs?", "/jobs?"),
    ("/a?x=1&y=&z", "/a?x=***&y=***&***"),
    ("GET", "GET"),
    ("127.0.0.1:5 - ?q=1", "127.0.0.1:5 - ?q=1"),
])
def test_redacted_target(target, shown):
    assert redacted_target(target) == shown
