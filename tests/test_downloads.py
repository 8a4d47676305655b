"""The download engine against a fake hub on 127.0.0.1 that misbehaves on request."""

from __future__ import annotations

import errno
import hashlib
import os
import pickle

import pytest

from modal_services import downloads
from modal_services.downloads import (
    DownloadError,
    DownloadHTTPError,
    download_file,
    filename_from_disposition,
    partial_path,
    retry_after_seconds,
    safe_url,
)
from modal_services.errors import ErrorCode, ToolboxError
from tests.fakes.hf_server import FakeHub


@pytest.fixture
def hub():
    with FakeHub() as server:
        yield server


@pytest.fixture
def sleeps(monkeypatch):
    """Retries run without waiting; the delays asked for are recorded."""
    waited: list[float] = []
    monkeypatch.setattr(downloads, "_sleep", waited.append)
    return waited


DATA = os.urandom(3 * (1 << 20) + 123)  # over three chunks, not a multiple of one
SHA = hashlib.sha256(DATA).hexdigest()


def test_plain_download_verified_with_filename(hub, tmp_path, sleeps):
    hub.add_plain("lora.bin", DATA, {"Content-Disposition": 'attachment; filename="My LoRA.safetensors"'})
    seen = []
    result = download_file(f"{hub.url}/files/lora.bin", tmp_path / "out.bin", expected_size=len(DATA),
                           expected_sha256=SHA.upper(), progress=lambda done, total: seen.append((done, total)))
    assert result.path.read_bytes() == DATA
    assert (result.size, result.sha256, result.filename) == (len(DATA), SHA, "My LoRA.safetensors")
    assert not partial_path(result.path).exists()
    assert seen[-1] == (len(DATA), len(DATA)) and seen[0][0] == 0
    assert sleeps == []


def test_dropped_connection_resumes_with_range_and_verifies(hub, tmp_path, sleeps):
    hub.add_plain("big", DATA)
    hub.fault("/files/big", "drop", at=1_500_000)
    hub.fault("/files/big", "drop", at=1_000_000)
    result = download_file(f"{hub.url}/files/big", tmp_path / "big", expected_sha256=SHA)
    assert result.path.read_bytes() == DATA and result.sha256 == SHA
    ranges = [r["headers"].get("Range") for r in hub.body_requests("/files/big")]
    # Each retry asks only for what is not on disk yet (whole chunks that arrived before the cut).
    offsets = [int(r[len("bytes="):-1]) for r in ranges[1:]]
    assert ranges[0] is None and len(offsets) == 2
    assert 0 < offsets[0] <= 1_500_000 and offsets[0] <= offsets[1] <= offsets[0] + 1_000_000
    assert len(sleeps) == 2


def test_server_ignoring_range_restarts_cleanly(hub, tmp_path, sleeps):
    hub.add_plain("f", DATA)
    dest = tmp_path / "f"
    partial_path(dest).write_bytes(DATA[:5000])  # left by a killed process
    hub.fault("/files/f", "ignore_range")
    result = download_file(f"{hub.url}/files/f", dest, expected_sha256=SHA)
    assert result.path.read_bytes() == DATA


def test_killed_partial_is_resumed_never_believed_complete(hub, tmp_path, sleeps):
    hub.add_plain("f", DATA)
    dest = tmp_path / "f"
    partial_path(dest).write_bytes(DATA[:777])
    assert not dest.exists()
    result = download_file(f"{hub.url}/files/f", dest, expected_size=len(DATA), expected_sha256=SHA)
    assert result.sha256 == SHA
    assert hub.body_requests("/files/f")[0]["headers"]["Range"] == "bytes=777-"


def test_partial_that_is_already_whole_is_verified_not_refetched(hub, tmp_path, sleeps):
    hub.add_plain("f", DATA)
    dest = tmp_path / "f"
    partial_path(dest).write_bytes(DATA)
    result = download_file(f"{hub.url}/files/f", dest, expected_sha256=SHA)
    assert result.sha256 == SHA and dest.read_bytes() == DATA


def test_foreign_partial_from_a_killed_run_fails_the_hash_and_is_removed(hub, tmp_path, sleeps):
    hub.add_plain("f", DATA)
    dest = tmp_path / "f"
    partial_path(dest).write_bytes(b"x" * 1000)  # not a prefix of this file
    with pytest.raises(ToolboxError) as caught:
        download_file(f"{hub.url}/files/f", dest, expected_sha256=SHA)
    assert caught.value.code is ErrorCode.CHECKSUM_MISMATCH
    assert not partial_path(dest).exists() and not dest.exists()
    # ...and the next attempt starts from zero and succeeds.
    assert download_file(f"{hub.url}/files/f", dest, expected_sha256=SHA).sha256 == SHA


def test_429_honours_retry_after_then_succeeds(hub, tmp_path, sleeps):
    hub.add_plain("f", DATA)
    hub.fault("/files/f", "status", status=429, headers={"Retry-After": "7"})
    hub.fault("/files/f", "status", status=500)
    assert download_file(f"{hub.url}/files/f", tmp_path / "f").sha256 == SHA
    assert sleeps[0] == 7.0
    assert 0 < sleeps[1] <= downloads.RETRY_MAX_DELAY


def test_persistent_5xx_gives_up_after_retries(hub, tmp_path, sleeps):
    hub.add_plain("f", DATA)
    hub.fault("/files/f", "status", times=10, status=503)
    with pytest.raises(DownloadError) as caught:
        download_file(f"{hub.url}/files/f", tmp_path / "f", retries=3)
    assert caught.value.code is ErrorCode.DOWNLOAD_FAILED and caught.value.status == 503
    assert len(hub.body_requests("/files/f")) == 4 and len(sleeps) == 3
    assert not (tmp_path / "f").exists()


def test_persistent_429_is_rate_limited(hub, tmp_path, sleeps):
    hub.add_plain("f", DATA)
    hub.fault("/files/f", "status", times=10, status=429, headers={"Retry-After": "1"})
    with pytest.raises(DownloadError) as caught:
        download_file(f"{hub.url}/files/f", tmp_path / "f", retries=2)
    assert caught.value.code is ErrorCode.RATE_LIMITED
    assert sleeps == [1.0, 1.0]


def test_retry_after_beyond_the_cap_fails_at_once(hub, tmp_path, sleeps):
    hub.add_plain("f", DATA)
    hub.fault("/files/f", "status", status=429, headers={"Retry-After": "86400"})
    with pytest.raises(DownloadError) as caught:
        download_file(f"{hub.url}/files/f", tmp_path / "f")
    assert caught.value.code is ErrorCode.RATE_LIMITED and sleeps == []


@pytest.mark.parametrize("status", [401, 403, 404])
def test_refusals_raise_distinct_type_without_retry_or_secret(hub, tmp_path, sleeps, status):
    hub.add_plain("f", DATA)
    hub.fault("/files/f", "status", status=status)
    secret = "sk-very-secret-token"
    with pytest.raises(DownloadHTTPError) as caught:
        download_file(f"{hub.url}/files/f?token={secret}", tmp_path / "f", headers={"Authorization": f"Bearer {secret}"})
    assert caught.value.status == status and sleeps == []
    assert secret not in str(caught.value) and secret not in caught.value.message
    copy = pickle.loads(pickle.dumps(caught.value))  # crosses a Modal boundary intact
    assert isinstance(copy, DownloadHTTPError) and copy.status == status and copy.message == caught.value.message


def test_wrong_bytes_checksum_mismatch_removes_partial(hub, tmp_path, sleeps):
    hub.add_plain("f", DATA)
    hub.fault("/files/f", "corrupt")
    dest = tmp_path / "f"
    with pytest.raises(ToolboxError) as caught:
        download_file(f"{hub.url}/files/f", dest, expected_sha256=SHA)
    assert caught.value.code is ErrorCode.CHECKSUM_MISMATCH
    assert not dest.exists() and not partial_path(dest).exists()


def test_wrong_size_is_checksum_mismatch_before_transfer(hub, tmp_path, sleeps):
    hub.add_plain("f", DATA)
    dest = tmp_path / "f"
    with pytest.raises(ToolboxError) as caught:
        download_file(f"{hub.url}/files/f", dest, expected_size=len(DATA) + 1)
    assert caught.value.code is ErrorCode.CHECKSUM_MISMATCH
    assert not dest.exists() and not partial_path(dest).exists()


def test_disk_full_is_storage_full_and_removes_partial(hub, tmp_path, sleeps, monkeypatch):
    hub.add_plain("f", DATA)
    dest = tmp_path / "f"
    real_open = open
    writes = {"n": 0}

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            writes["n"] += 1
            if writes["n"] > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return FullDisk(handle) if str(path).endswith(".partial") and "b" in mode and mode != "rb" else handle

    monkeypatch.setattr("builtins.open", fake_open)
    with pytest.raises(ToolboxError) as caught:
        download_file(f"{hub.url}/files/f", dest)
    assert caught.value.code is ErrorCode.STORAGE_FULL
    assert not dest.exists() and not partial_path(dest).exists()


def test_unreachable_host_fails_after_retries(tmp_path, sleeps):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError) as caught:
        download_file(f"http://127.0.0.1:{port}/x", tmp_path / "x", retries=1)
    assert caught.value.code is ErrorCode.DOWNLOAD_FAILED and len(sleeps) == 1


def test_helpers():
    assert filename_from_disposition("attachment; filename*=UTF-8''na%C3%AFve%20lora.safetensors") == "naïve lora.safetensors"
    assert filename_from_disposition('attachment; filename="../../etc/passwd"') == "passwd"
    assert filename_from_disposition("inline") is None
    assert retry_after_seconds("12") == 12.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after_seconds("soon") is None
    assert safe_url("https://user:pw@h.example:8443/a/b?token=x#f") == "https://h.example:8443/a/b"
