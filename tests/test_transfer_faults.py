"""Every transfer ends: misbehaving servers on 127.0.0.1 against `download_file`, each within its deadline."""

from __future__ import annotations

import os
import threading
import time

import pytest

from modal_services import transfer
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.transfer import DownloadError, download_file, partial_path
from tests.fakes.hf_server import FakeHub

DATA = os.urandom(2 * (1 << 20) + 77)


@pytest.fixture
def hub():
    with FakeHub() as server:
        server.add_plain("f", DATA)
        yield server


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """Short deadlines and no waiting between retries."""
    monkeypatch.setenv("TOOLBOX_STALL_SECONDS", "0.6")
    monkeypatch.setattr(transfer, "_sleep", lambda seconds: None)
    monkeypatch.setattr(transfer, "WATCH_INTERVAL", 0.05)


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
    stop = threading.Event()

    def progress(done, total):
        if stop.is_set():
            raise ToolboxError(ErrorCode.CANCELLED, "Stopped on request.")

    threading.Timer(0.3, stop.set).start()
    error, took = timed(lambda: download_file(f"{hub.url}/files/f", tmp_path / "f", progress=progress))
    assert error.code is ErrorCode.CANCELLED and took < 1.5
    assert partial_path(tmp_path / "f").stat().st_size == 4096  # kept to resume from
    assert not (tmp_path / "f").exists()


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


def test_a_body_without_a_size_under_the_cap_is_accepted(hub, tmp_path):
    hub.fault("/files/f", "no_length")
    got = download_file(f"{hub.url}/files/f", tmp_path / "f")
    assert got.size == len(DATA) and (tmp_path / "f").read_bytes() == DATA


def test_the_file_deadline_ends_a_transfer_that_keeps_resuming(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "file_deadline", lambda size, stall: 1.0)
    hub.fault("/files/f", "trickle", times=100, at=100_000, interval=0.05)
    error, took = timed(lambda: download_file(f"{hub.url}/files/f", tmp_path / "f", retries=100))
    assert error.code is ErrorCode.TIMEOUT and took < 3


def test_the_stall_setting_is_checked():
    with pytest.raises(ToolboxError) as caught:
        transfer.stall_seconds({"TOOLBOX_STALL_SECONDS": "soon"})
    assert caught.value.code is ErrorCode.INVALID_INPUT
    assert transfer.stall_seconds({}) == transfer.DEFAULT_STALL_SECONDS
