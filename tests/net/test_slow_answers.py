"""Before the response exists: servers on 127.0.0.1 that accept a connection, then trickle their status line and
headers a byte at a time (or say nothing at all). The answer deadline, Cancel and a transfer's deadline all
reach such a request, and cut its connection for real."""

from __future__ import annotations

import os
import time

import pytest
import urllib3

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.net.egress import Purpose, open_url
from modal_services.net.transfer import deadlines, parallel, retrying
from modal_services.net.transfer.download import download_file
from modal_services.net.transfer.files import partial_path
from tests.fakes.hf_server import FakeHub
from tests.fakes.slow_answers import SlowAnswers
from tests.fakes.cancelling import cancelled_after
from tests.servers import running_handler


@pytest.fixture
def slow():
    with SlowAnswers(interval=0.05) as server:
        yield server


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """No waiting between retries; the watch looks often."""
    monkeypatch.setattr(retrying, "wait_before_retry", lambda seconds, interrupt=None: None)
    monkeypatch.setattr(deadlines, "WATCH_INTERVAL", 0.05)


def timed(call, error=ToolboxError):
    started = time.monotonic()
    with pytest.raises(error) as caught:
        call()
    return caught.value, time.monotonic() - started


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------- the answer deadline (every request)


def test_headers_that_never_finish_end_at_the_read_timeout(slow):
    error, took = timed(lambda: open_url(f"{slow.url}/f", Purpose.URL, timeout=(5.0, 0.5)),
                        urllib3.exceptions.ReadTimeoutError)
    assert 0.5 <= took < 1.5, took
    assert slow.wait_for_hang_ups(1)  # the connection was closed, not left to trickle


def test_a_tls_handshake_that_never_comes_ends_at_the_read_timeout():
    """The server takes the ClientHello and answers nothing: only the answer deadline (0.5 s) ends it, long
    before the connect timeout (5 s) the handshake's reads wait under."""
    with SlowAnswers(silent=True) as silent:
        url = f"https://127.0.0.1:{silent.port}/f"
        error, took = timed(lambda: open_url(url, Purpose.URL, timeout=(5.0, 0.5)),
                            urllib3.exceptions.ReadTimeoutError)
        assert took < 1.5, took
        assert silent.wait_for_hang_ups(1)


def test_the_deadline_ends_with_the_headers_not_the_body(monkeypatch):
    """A body slower in all than the read timeout, whose every read is quick, still comes whole."""
    data = os.urandom(1 << 20)
    with FakeHub() as hub:
        hub.add_plain("f", data)
        hub.pace = 1 << 20  # one second for the body
        with open_url(f"{hub.url}/files/f", Purpose.URL, timeout=(5.0, 0.4)) as response:
            assert response.read_capped(2 << 20) == data


def test_requests_leave_no_descriptor_or_connection_behind(slow, tmp_path):
    with FakeHub() as hub:
        hub.add_plain("f", b"x" * 1000)
        before = open_fds()
        for _ in range(3):
            assert download_file(f"{hub.url}/files/f", tmp_path / "f").size == 1000
            (tmp_path / "f").unlink()
        timed(lambda: download_file(f"{slow.url}/f", tmp_path / "g", progress=cancelled_after(0.2)))
        assert slow.wait_for_hang_ups(1)
        assert open_fds() <= before


# ---------------------------------------------------------------- a transfer's watch holds the connection


def test_cancel_ends_a_transfer_whose_headers_trickle(slow, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLBOX_STALL_SECONDS", "30")  # only the Cancel can end it in time
    error, took = timed(lambda: download_file(f"{slow.url}/f", tmp_path / "f", progress=cancelled_after(0.3)))
    assert error.code is ErrorCode.CANCELLED and took < 1.3, (error, took)
    assert slow.accepted == 1 and slow.wait_for_hang_ups(1)
    assert not (tmp_path / "f").exists()


def test_the_transfer_deadline_ends_a_transfer_whose_headers_trickle(slow, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLBOX_STALL_SECONDS", "30")
    error, took = timed(lambda: download_file(f"{slow.url}/f", tmp_path / "f",
                                              deadline_at=time.monotonic() + 0.5))
    assert error.code is ErrorCode.TIMEOUT and took < 1.5, (error, took)


def test_headers_that_never_finish_are_a_stall_and_use_up_the_retries(slow, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLBOX_STALL_SECONDS", "0.4")
    error, took = timed(lambda: download_file(f"{slow.url}/f", tmp_path / "f", retries=2))
    assert error.code is ErrorCode.DOWNLOAD_FAILED and "kept failing" in error.message, error
    assert "stalled" in error.message or "timed out" in error.message, error.message
    assert slow.accepted == 3 and took < 2.5, took
    assert not (tmp_path / "f").exists() and not partial_path(tmp_path / "f").exists()


def test_cancel_ends_the_range_probe_of_a_large_file(slow, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLBOX_STALL_SECONDS", "30")
    monkeypatch.setenv("TOOLBOX_DOWNLOAD_CONNECTIONS", "4")
    size = parallel.PARALLEL_MIN_BYTES * 2  # large enough for ranges: the first request is the probe
    error, took = timed(lambda: download_file(f"{slow.url}/f", tmp_path / "f", size_hint=size,
                                              progress=cancelled_after(0.3)))
    assert error.code is ErrorCode.CANCELLED and took < 1.3, (error, took)
    assert slow.accepted == 1


@pytest.fixture
def closing_then_silent():
    """A server whose answer says `Connection: close` (the client's HTTP layer lets go of the socket at once),
    then sends part of the body and falls silent."""
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 20))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"x" * 4096)
            self.wfile.flush()
            time.sleep(3)

        def log_message(self, *args):
            pass

    with running_handler(Handler) as url:
        yield f"{url}/f"


def test_cancel_cuts_a_body_whose_answer_closes_the_connection(closing_then_silent, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLBOX_STALL_SECONDS", "30")
    error, took = timed(lambda: download_file(closing_then_silent, tmp_path / "f", progress=cancelled_after(0.3)))
    assert error.code is ErrorCode.CANCELLED and took < 1.3, (error, took)
    assert partial_path(tmp_path / "f").stat().st_size == 4096
