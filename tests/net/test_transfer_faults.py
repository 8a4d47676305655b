"""Every transfer ends: misbehaving servers on 127.0.0.1 against `download_file`, each within its deadline."""

from __future__ import annotations

import os
import threading
import time

import pytest

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.net.transfer import deadlines, parallel, retrying
from modal_services.net.transfer.download import download_file
from modal_services.net.transfer.errors import DownloadError
from modal_services.net.transfer.files import partial_path
from tests.fakes.hf_server import FakeHub
from tests.fakes.cancelling import cancelled_after
from tests.servers import running_handler

DATA = os.urandom(2 * (1 << 20) + 77)
REAL_SLEEP = retrying.wait_before_retry  # before the fixture below replaces it


@pytest.fixture
def hub():
    with FakeHub() as server:
        server.add_plain("f", DATA)
        yield server


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """Short deadlines and no waiting between retries."""
    monkeypatch.setenv("TOOLBOX_STALL_SECONDS", "0.6")
    monkeypatch.setattr(retrying, "wait_before_retry", lambda seconds, interrupt=None: None)
    monkeypatch.setattr(deadlines, "WATCH_INTERVAL", 0.05)


def timed(call):
    started = time.monotonic()
    with pytest.raises(ToolboxError) as caught:
        call()
    return caught.value, time.monotonic() - started


def test_a_trickling_server_is_a_stall_and_ends(hub, tmp_path):
    hub.fault("/files/f", "trickle", times=3, at=1000, interval=0.1)
    error, took = timed(lambda: download_file(f"{hub.url}/files/f", tmp_path / "f", retries=2))
    assert error.code is ErrorCode.DOWNLOAD_FAILED and "stalled" in error.message
    assert took < 6  # three attempts of about one stall window each
    assert not (tmp_path / "f").exists()


def test_a_silent_server_is_a_stall_and_ends(hub, tmp_path):
    hub.fault("/files/f", "silent", times=2, at=5000, interval=3.0)
    error, took = timed(lambda: download_file(f"{hub.url}/files/f", tmp_path / "f", retries=1))
    assert error.code is ErrorCode.DOWNLOAD_FAILED and took < 4
    assert not (tmp_path / "f").exists()


def test_a_trickle_recovers_when_the_server_does(hub, tmp_path):
    hub.fault("/files/f", "trickle", at=300_000, interval=0.1)
    got = download_file(f"{hub.url}/files/f", tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == DATA and got.size == len(DATA)
    assert hub.body_requests("/files/f")[1]["headers"]["Range"].startswith("bytes=300")  # resumed


def test_cancel_stops_a_blocked_read_at_once(hub, tmp_path):
    hub.fault("/files/f", "silent", at=4096, interval=5.0)
    progress = cancelled_after(0.3)
    error, took = timed(lambda: download_file(f"{hub.url}/files/f", tmp_path / "f", progress=progress))
    assert error.code is ErrorCode.CANCELLED and took < 1.5
    assert partial_path(tmp_path / "f").stat().st_size == 4096  # kept to resume from
    assert not (tmp_path / "f").exists()


def test_cancel_does_not_wait_out_a_long_retry_after(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(retrying, "wait_before_retry", REAL_SLEEP)
    hub.fault("/files/f", "status", status=429, headers={"Retry-After": "60"})
    progress = cancelled_after(0.3)
    error, took = timed(lambda: download_file(f"{hub.url}/files/f", tmp_path / "f", progress=progress))
    assert error.code is ErrorCode.CANCELLED and took < 2
    assert len(hub.body_requests("/files/f")) == 1 and not (tmp_path / "f").exists()


def test_the_back_off_still_waits_when_nothing_stops_it(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(retrying, "wait_before_retry", REAL_SLEEP)
    hub.fault("/files/f", "status", status=503, headers={"Retry-After": "1"})
    started = time.monotonic()
    assert download_file(f"{hub.url}/files/f", tmp_path / "f", progress=lambda done, total: None).size == len(DATA)
    assert time.monotonic() - started >= 1.0 and len(hub.body_requests("/files/f")) == 2


def test_a_wrong_content_range_uses_up_the_budget_instead_of_looping(hub, tmp_path):
    partial_path(tmp_path / "f").write_bytes(DATA[:1000])
    hub.fault("/files/f", "wrong_range", times=50)
    error, _ = timed(lambda: download_file(f"{hub.url}/files/f", tmp_path / "f", retries=3))
    assert error.code is ErrorCode.DOWNLOAD_FAILED and "Content-Range" in error.message
    assert len(hub.body_requests("/files/f")) == 4
    assert not (tmp_path / "f").exists() and not partial_path(tmp_path / "f").exists()


def test_one_wrong_content_range_restarts_cleanly(hub, tmp_path):
    partial_path(tmp_path / "f").write_bytes(b"x" * 1000)
    hub.fault("/files/f", "wrong_range")
    assert download_file(f"{hub.url}/files/f", tmp_path / "f").size == len(DATA)
    assert (tmp_path / "f").read_bytes() == DATA and len(hub.body_requests("/files/f")) == 2


def test_a_server_that_ignores_range_and_drops_fails_in_bounded_attempts(hub, tmp_path):
    hub.fault("/files/f", "ignore_range", times=100, at=1 << 20)
    error, _ = timed(lambda: download_file(f"{hub.url}/files/f", tmp_path / "f", retries=3))
    assert error.code is ErrorCode.DOWNLOAD_FAILED and "connection cut" in error.message
    assert len(hub.body_requests("/files/f")) == 4  # the first try and three retries, none of them going further
    assert not (tmp_path / "f").exists()


def test_a_body_without_a_size_is_capped(hub, tmp_path):
    hub.fault("/files/f", "no_length")
    error, _ = timed(lambda: download_file(f"{hub.url}/files/f", tmp_path / "f", max_bytes=1 << 20))
    assert isinstance(error, DownloadError) and "more than the" in error.message
    assert not (tmp_path / "f").exists() and not partial_path(tmp_path / "f").exists()


def test_a_declared_size_over_the_cap_is_refused_before_the_body_is_read(hub, tmp_path):
    hub.add_plain("large", os.urandom(8 << 20))
    hub.pace = 1 << 20  # reading the body would take eight seconds
    error, took = timed(lambda: download_file(f"{hub.url}/files/large", tmp_path / "f", max_bytes=1 << 20))
    assert isinstance(error, DownloadError) and "offers 8.0 MiB, more than the 1.0 MiB allowed" in error.message
    assert took < 2 and len(hub.body_requests("/files/large")) == 1  # a refusal, not retried
    assert not list(tmp_path.iterdir())


def test_a_resumed_file_larger_than_the_cap_is_refused(hub, tmp_path):
    partial_path(tmp_path / "f").write_bytes(DATA[:1000])  # the 206's Content-Range declares the whole size
    error, _ = timed(lambda: download_file(f"{hub.url}/files/f", tmp_path / "f", max_bytes=1 << 20))
    assert isinstance(error, DownloadError) and "more than the 1.0 MiB allowed" in error.message
    assert hub.body_requests("/files/f")[0]["headers"]["Range"] == "bytes=1000-"
    assert not list(tmp_path.iterdir())


def test_an_undeclared_body_longer_than_expected_is_refused(hub, tmp_path):
    hub.fault("/files/f", "no_length")
    error, _ = timed(lambda: download_file(f"{hub.url}/files/f", tmp_path / "f", expected_size=len(DATA) - 10))
    assert error.code is ErrorCode.CHECKSUM_MISMATCH and "more than the" in error.message
    assert not list(tmp_path.iterdir())


@pytest.fixture
def overlong():
    """A server whose body runs past its declared Content-Length (chunked, so the client sees it all)."""
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(DATA)))
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            for piece in (DATA, os.urandom(len(DATA))):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args):
            pass

    with running_handler(Handler) as url:
        yield f"{url}/f"


def test_a_body_longer_than_declared_is_cut_there_and_judged_by_its_checksum(overlong, tmp_path):
    import hashlib

    got = download_file(overlong, tmp_path / "f", expected_sha256=hashlib.sha256(DATA).hexdigest())
    assert got.size == len(DATA) and (tmp_path / "f").read_bytes() == DATA
    error, _ = timed(lambda: download_file(overlong, tmp_path / "g", expected_sha256="0" * 64))
    assert error.code is ErrorCode.CHECKSUM_MISMATCH and not (tmp_path / "g").exists()
    assert download_file(overlong, tmp_path / "h").size == len(DATA)  # no checksum: the declared bytes only


def test_a_body_without_a_size_under_the_cap_is_accepted(hub, tmp_path):
    hub.fault("/files/f", "no_length")
    got = download_file(f"{hub.url}/files/f", tmp_path / "f")
    assert got.size == len(DATA) and (tmp_path / "f").read_bytes() == DATA


def test_the_file_deadline_ends_a_transfer_that_keeps_resuming(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(deadlines, "file_deadline", lambda size, stall: 1.0)
    hub.fault("/files/f", "trickle", times=100, at=100_000, interval=0.05)
    error, took = timed(lambda: download_file(f"{hub.url}/files/f", tmp_path / "f", retries=100))
    assert error.code is ErrorCode.TIMEOUT and took < 3


def test_the_stall_setting_is_checked():
    with pytest.raises(ToolboxError) as caught:
        deadlines.stall_seconds({"TOOLBOX_STALL_SECONDS": "soon"})
    assert caught.value.code is ErrorCode.INVALID_INPUT
    assert deadlines.stall_seconds({}) == deadlines.DEFAULT_STALL_SECONDS


# ---------------------------------------------------------------- parallel ranges

BIG = os.urandom(4 * (1 << 20) + 4321)


@pytest.fixture
def ranged(hub, monkeypatch):
    """Parallel ranges from 1 MiB (instead of 64), four connections."""
    monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", 1 << 20)
    monkeypatch.setenv("TOOLBOX_DOWNLOAD_CONNECTIONS", "4")
    hub.add_plain("big", BIG)
    return hub


def ranges_asked(hub):
    return [r["headers"].get("Range") for r in hub.body_requests("/files/big")]


def test_a_large_file_comes_over_four_ranges(ranged, tmp_path):
    import hashlib

    got = download_file(f"{ranged.url}/files/big", tmp_path / "big", expected_size=len(BIG),
                        expected_sha256=hashlib.sha256(BIG).hexdigest())
    assert (tmp_path / "big").read_bytes() == BIG and got.sha256 == hashlib.sha256(BIG).hexdigest()
    asked = ranges_asked(ranged)
    assert asked[0] == "bytes=0-0" and len(asked) == 5  # the probe, then one request per range
    assert not list(tmp_path.glob("*.partial*"))


def test_a_dropped_range_resumes_on_its_own(ranged, tmp_path):
    ranged.fault("/files/big", "drop", at=300_000, skip=1)  # the first range request, after the probe
    got = download_file(f"{ranged.url}/files/big", tmp_path / "big", size_hint=len(BIG))
    assert (tmp_path / "big").read_bytes() == BIG and got.size == len(BIG)
    asked = ranges_asked(ranged)
    size = -(-len(BIG) // 4)
    starts = [int(value.split("=")[1].split("-")[0]) for value in asked[1:]]
    assert len(asked) == 6 and sorted(start % size for start in starts) == [0, 0, 0, 0, 300_000]  # that range, from its cut


def test_a_cancelled_parallel_download_resumes_every_range(ranged, tmp_path):
    ranged.pace = 4 << 20  # bytes/s per connection: the cancel lands mid-way
    stop = threading.Event()

    def progress(done, total):
        if done > len(BIG) // 2:
            stop.set()
        if stop.is_set():
            raise ToolboxError(ErrorCode.CANCELLED, "Stopped on request.")

    with pytest.raises(ToolboxError) as caught:
        download_file(f"{ranged.url}/files/big", tmp_path / "big", size_hint=len(BIG), progress=progress)
    assert caught.value.code is ErrorCode.CANCELLED
    assert partial_path(tmp_path / "big").exists() and (tmp_path / "big.partial.ranges").exists()
    ranged.pace = None
    first_run = len(ranges_asked(ranged))
    got = download_file(f"{ranged.url}/files/big", tmp_path / "big", size_hint=len(BIG))
    assert (tmp_path / "big").read_bytes() == BIG and got.size == len(BIG)
    later = ranges_asked(ranged)[first_run:]
    size = -(-len(BIG) // 4)
    assert 1 <= len(later) <= 4 and "bytes=0-0" not in later  # no new probe: the ledger is trusted
    assert all(int(value.split("=")[1].split("-")[0]) % size != 0 for value in later)  # each from where it got to
    assert not list(tmp_path.glob("*.partial*"))


def test_a_large_file_over_the_cap_is_refused_after_the_probe(ranged, tmp_path):
    error, _ = timed(lambda: download_file(f"{ranged.url}/files/big", tmp_path / "big", size_hint=len(BIG),
                                           max_bytes=2 << 20))
    assert isinstance(error, DownloadError) and "offers 4.0 MiB, more than the 2.0 MiB allowed" in error.message
    assert ranges_asked(ranged) == ["bytes=0-0"] and not list(tmp_path.iterdir())


def test_a_server_that_ignores_ranges_gets_one_connection(ranged, tmp_path):
    ranged.fault("/files/big", "ignore_range")  # the probe gets the whole file: no ranges here
    got = download_file(f"{ranged.url}/files/big", tmp_path / "big", size_hint=len(BIG))
    assert got.size == len(BIG) and (tmp_path / "big").read_bytes() == BIG
    assert ranges_asked(ranged) == ["bytes=0-0", None]


def test_ranges_refused_midway_fall_back_to_one_connection(ranged, tmp_path):
    ranged.fault("/files/big", "ignore_range", skip=1)  # the probe is answered; a range gets the whole file
    got = download_file(f"{ranged.url}/files/big", tmp_path / "big", size_hint=len(BIG))
    assert got.size == len(BIG) and (tmp_path / "big").read_bytes() == BIG
    assert ranges_asked(ranged)[-1] is None  # the one-connection request that finished it
    assert not list(tmp_path.glob("*.partial*"))


def test_cancel_stops_every_range_at_once(ranged, tmp_path):
    for _ in range(5):
        ranged.fault("/files/big", "silent", at=100_000, interval=5.0)
    progress = cancelled_after(0.5)
    error, took = timed(lambda: download_file(f"{ranged.url}/files/big", tmp_path / "big", size_hint=len(BIG),
                                              progress=progress))
    assert error.code is ErrorCode.CANCELLED and took < 2
    assert not (tmp_path / "big").exists()


def test_cancel_ends_every_range_in_its_back_off(ranged, tmp_path, monkeypatch):
    monkeypatch.setattr(retrying, "wait_before_retry", REAL_SLEEP)
    ranged.fault("/files/big", "status", times=4, skip=1, status=503, headers={"Retry-After": "60"})
    progress = cancelled_after(0.5)
    error, took = timed(lambda: download_file(f"{ranged.url}/files/big", tmp_path / "big", size_hint=len(BIG),
                                              progress=progress))
    assert error.code is ErrorCode.CANCELLED and took < 3
    assert len(ranges_asked(ranged)) == 5  # the probe and one try per range, none after the cancel


def test_the_connections_setting_is_checked():
    assert parallel.download_connections({}) == 4
    assert parallel.download_connections({"TOOLBOX_DOWNLOAD_CONNECTIONS": "1"}) == 1
    for bad in ("0", "17", "many", "-2"):
        with pytest.raises(ToolboxError):
            parallel.download_connections({"TOOLBOX_DOWNLOAD_CONNECTIONS": bad})
