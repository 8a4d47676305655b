"""The download engine against a fake hub on 127.0.0.1 that misbehaves on request."""

from __future__ import annotations

import errno
import hashlib
import os
import pickle

import pytest

from modal_services.base_models import downloads

from modal_services.net.transfer import retrying
from modal_services.net.transfer.download import download_file
from modal_services.net.transfer.errors import DownloadError, DownloadHTTPError
from modal_services.net.transfer.files import partial_path
from modal_services.net.transfer.responses import filename_from_disposition, retry_after_seconds, safe_url
from modal_services.net.egress import Credentials
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
    monkeypatch.setattr(retrying, "wait_before_retry", lambda seconds, interrupt=None: waited.append(seconds))
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
    assert 0 < sleeps[1] <= retrying.RETRY_MAX_DELAY


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
        download_file(f"{hub.url}/files/f?token={secret}", tmp_path / "f",
                      credentials=Credentials.for_base(hub.url, {"Authorization": f"Bearer {secret}"}))
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


# ---------------------------------------------------------------------------
# The engine: base models from the fake hub through huggingface_hub.
# ---------------------------------------------------------------------------

import asyncio
import time

from modal_services.base_models.downloads import DownloadEngine
from modal_services.base_models.manifests import check_files
from modal_services.base_models.states import missing_models, model_states
from modal_services.state.keys import download_key, lock_key, manifest_key
from modal_services.jobs.requests import DownloadRequest, VerifyRequest
from modal_services.layout import Layout
from modal_services.base_models.registry import HFSource, ModelEntry, PublishedFile, URLSource
from modal_services.state.store import SqliteStore

WEIGHTS = os.urandom(2 * (1 << 20) + 17)
CONFIG = b'{"hidden": 4}'


@pytest.fixture
def hf_hub(hub, monkeypatch):
    """The fake hub as HF_ENDPOINT, with huggingface_hub's offline switch (set for all tests) lifted."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub.add_file("org/tile", "config.json", CONFIG)
    hub.add_file("org/tile", "diffusion_pytorch_model.safetensors", WEIGHTS)
    hub.add_file("org/tile", "README.md", b"# not wanted")
    hub.add_file("org/adapters", "sdxl_models/adapter.safetensors", DATA)
    hub.add_file("org/adapters", "sd15_models/other.safetensors", b"not wanted")
    hub.add_file("org/base", "model_index.json", b"{}")
    hub.add_file("org/base", "tokenizer/vocab.json", b'{"a": 1}')
    hub.add_file("org/base", "tokenizer/merges.txt", b"#version\n")
    hub.add_file("org/base", "unet/diffusion_pytorch_model.safetensors", b"weights we skip")
    hub.add_plain("direct.bin", CONFIG * 3)
    return hub


REGISTRY = {
    "tile": ModelEntry("tile", "Tile", HFSource("org/tile", include=("config.json", "diffusion_pytorch_model.safetensors")),
                       "tile", approx_bytes=2_000_000),
    "adapter": ModelEntry("adapter", "Adapter", HFSource(
        "org/adapters", include=("sdxl_models/adapter.safetensors",),
        rename={"sdxl_models/adapter.safetensors": "adapter.safetensors"}), "ip/x", approx_bytes=3_000_000),
    "base": ModelEntry("base", "Base configs", HFSource("org/base", include=("model_index.json", "tokenizer/*")),
                       "base", approx_bytes=100),
}


@pytest.fixture
async def store(tmp_path):
    state = SqliteStore(tmp_path / "state.sqlite3")
    yield state
    await state.close()


def make_engine(tmp_path, store, registry=REGISTRY, **hooks) -> DownloadEngine:
    engine = DownloadEngine(Layout(tmp_path / "models", tmp_path / "loras", store), registry=registry, **hooks)
    engine.load()
    return engine


def run(engine, method="download", keys=None):
    """Blocking engine call in a thread, as run_job does it."""
    seen = []
    request = (VerifyRequest if method == "verify" else DownloadRequest)(keys=keys or [])
    result = getattr(engine, method)(request, lambda fraction, stage: seen.append((fraction, stage)))
    return result, seen


async def test_downloads_verifies_and_writes_manifests(hf_hub, tmp_path, store, sleeps):
    commits, reloads = [], []
    engine = make_engine(tmp_path, store, commit=lambda: commits.append(1), reload=lambda: reloads.append(1))
    result, seen = await asyncio.to_thread(run, engine)
    assert result == {"tile": "downloaded", "adapter": "downloaded", "base": "downloaded"}
    models = tmp_path / "models"
    assert (models / "tile" / "diffusion_pytorch_model.safetensors").read_bytes() == WEIGHTS
    assert (models / "ip/x/adapter.safetensors").read_bytes() == DATA  # renamed out of sdxl_models/
    assert not (models / "ip/x/sdxl_models/adapter.safetensors").exists()
    assert sorted(p.name for p in (models / "base" / "tokenizer").iterdir()) == ["merges.txt", "vocab.json"]
    assert not (models / "base" / "unet").exists() and not (models / "tile" / "README.md").exists()

    manifest = await store.get(manifest_key("tile"))
    assert manifest["complete"] and manifest["size_bytes"] == len(WEIGHTS) + len(CONFIG)
    assert manifest["files"]["diffusion_pytorch_model.safetensors"]["sha256"] == hashlib.sha256(WEIGHTS).hexdigest()
    assert (await store.get(download_key("tile")))["status"] == "complete"
    assert await missing_models(store, list(REGISTRY)) == []
    assert len(commits) == 3 and len(reloads) == 1
    assert seen[-1] == (1.0, "done")
    assert await store.keys("lock:") == []

    # Idempotent: a second run moves no bytes.
    gets = len(hf_hub.body_requests("/resolve/"))
    result, _ = await asyncio.to_thread(run, engine)
    assert set(result.values()) == {"present"} and len(hf_hub.body_requests("/resolve/")) == gets


async def test_hf_dropped_connection_is_resumed_and_verified(hf_hub, tmp_path, store, sleeps, monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub keeps whole 10 MB chunks; smaller ones let a 2 MB file resume mid-way.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 18)
    hf_hub.fault("diffusion_pytorch_model.safetensors", "drop", at=1_200_000)
    engine = make_engine(tmp_path, store)
    await asyncio.to_thread(run, engine, keys=["tile"])
    assert (tmp_path / "models/tile/diffusion_pytorch_model.safetensors").read_bytes() == WEIGHTS
    ranges = [r["headers"].get("Range") for r in hf_hub.body_requests("diffusion_pytorch_model")]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"


async def test_hf_wrong_bytes_checksum_mismatch_manifest_untouched(hf_hub, tmp_path, store, sleeps):
    hf_hub.fault("diffusion_pytorch_model.safetensors", "corrupt")
    engine = make_engine(tmp_path, store)
    with pytest.raises(ToolboxError) as caught:
        await asyncio.to_thread(run, engine, keys=["tile"])
    assert caught.value.code is ErrorCode.CHECKSUM_MISMATCH
    assert not (tmp_path / "models/tile/diffusion_pytorch_model.safetensors").exists()
    assert await store.get(manifest_key("tile")) is None
    record = await store.get(download_key("tile"))
    assert record["status"] == "failed" and record["error_code"] == "CHECKSUM_MISMATCH"
    assert await store.keys("lock:") == []
    # The next run starts clean and succeeds.
    await asyncio.to_thread(run, engine, keys=["tile"])
    assert await missing_models(store, ["tile"]) == []


async def test_hf_500_and_429_are_retried(hf_hub, tmp_path, store, sleeps):
    hf_hub.fault("adapter.safetensors", "status", status=500)
    # A 429 on the transfer is huggingface_hub's own to wait out (it honours Retry-After itself).
    hf_hub.fault("adapter.safetensors", "status", status=429, headers={"Retry-After": "1"})
    engine = make_engine(tmp_path, store)
    started = time.monotonic()
    await asyncio.to_thread(run, engine, keys=["adapter"])
    assert (tmp_path / "models/ip/x/adapter.safetensors").read_bytes() == DATA
    assert len(sleeps) == 1  # our retry of the 500
    assert len(hf_hub.body_requests("adapter.safetensors")) == 3 and time.monotonic() - started >= 1.0


async def test_hf_refusal_fails_with_a_clear_message_and_others_continue(hf_hub, tmp_path, store, sleeps):
    hf_hub.fault("/api/models/org/tile", "status", status=401, headers={"X-Error-Code": "RepoNotFound"})
    engine = make_engine(tmp_path, store)
    with pytest.raises(ToolboxError) as caught:
        await asyncio.to_thread(run, engine)
    assert caught.value.code is ErrorCode.DOWNLOAD_FAILED
    assert "1 of 3 models failed (tile)" in caught.value.message and "token" in caught.value.message
    assert await missing_models(store, list(REGISTRY)) == ["tile"]
    states = {s.key: s for s in await model_states(store, REGISTRY.values())}
    assert states["tile"].state == "failed" and states["base"].state == "present"


async def test_hf_token_from_setup_is_sent(hf_hub, tmp_path, store, sleeps):
    hf_hub.require_token = True
    hf_hub.valid_tokens = {"hf_secret_token"}
    await store.put("secret:hf", {"token": "hf_secret_token", "user": "tester"})
    engine = make_engine(tmp_path, store)
    await asyncio.to_thread(run, engine, keys=["base"])
    assert all(r["headers"].get("Authorization") == "Bearer hf_secret_token" for r in hf_hub.body_requests("/resolve/"))


async def test_hf_disk_full_is_storage_full_nothing_left(hf_hub, tmp_path, store, sleeps, monkeypatch):
    import huggingface_hub.file_download as file_download

    def full(url, temp_file, **kwargs):
        temp_file.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_download, "http_get", full)
    engine = make_engine(tmp_path, store)
    with pytest.raises(ToolboxError) as caught:
        await asyncio.to_thread(run, engine, keys=["tile", "base"])
    assert caught.value.code is ErrorCode.STORAGE_FULL
    leftovers = [p for p in (tmp_path / "models").rglob("*") if p.is_file() and p.suffix in (".incomplete", ".safetensors")]
    assert leftovers == []
    assert await store.get(manifest_key("tile")) is None and await store.get(manifest_key("base")) is None


async def test_two_downloads_at_once_make_one_transfer(hf_hub, tmp_path, store, sleeps, monkeypatch):
    monkeypatch.setattr(downloads, "LOCK_POLL_SECONDS", 0.05)
    first, second = make_engine(tmp_path, store), make_engine(tmp_path, store)
    results = await asyncio.gather(asyncio.to_thread(run, first, keys=["tile"]), asyncio.to_thread(run, second, keys=["tile"]))
    assert sorted(r[0]["tile"] for r in results) == ["downloaded", "present"]
    assert len(hf_hub.body_requests("diffusion_pytorch_model.safetensors")) == 1


async def test_live_lock_is_waited_for_and_stale_lock_taken_over(hf_hub, tmp_path, store, sleeps, monkeypatch):
    monkeypatch.setattr(downloads, "LOCK_POLL_SECONDS", 0.05)
    await store.put(lock_key("download:base"), {"owner": "other", "heartbeat": time.time()})
    engine = make_engine(tmp_path, store)
    task = asyncio.ensure_future(asyncio.to_thread(run, engine, keys=["base"]))
    await asyncio.sleep(0.3)
    assert not task.done() and hf_hub.body_requests("/resolve/") == []  # waiting, not downloading
    # The holder dies without releasing: its heartbeat goes stale.
    await store.put(lock_key("download:base"), {"owner": "other", "heartbeat": time.time() - 10_000})
    result, _ = await asyncio.wait_for(task, timeout=10)
    assert result == {"base": "downloaded"}


async def test_killed_download_is_discarded_never_believed_complete(hf_hub, tmp_path, store, sleeps):
    # What a killed run leaves: huggingface_hub's temp file, a half file, a stale lock and record.
    folder = tmp_path / "models" / "tile"
    orphan = folder / ".cache/huggingface/download/diffusion_pytorch_model.safetensors.abc.incomplete"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(WEIGHTS[:1000])
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(WEIGHTS[:1000])
    old = time.time() - 10_000
    await store.put(lock_key("download:tile"), {"owner": "dead", "heartbeat": old})
    await store.put(download_key("tile"), {"status": "downloading", "bytes_done": 1000, "bytes_total": 5, "updated_at": old})
    states = await model_states(store, [REGISTRY["tile"]])
    assert states[0].state == "missing" and await missing_models(store, ["tile"]) == ["tile"]

    engine = make_engine(tmp_path, store)
    await asyncio.to_thread(run, engine, keys=["tile"])
    assert (folder / "diffusion_pytorch_model.safetensors").read_bytes() == WEIGHTS
    assert not orphan.exists()


async def test_verify_finds_damage_and_fixes_the_manifest(hf_hub, tmp_path, store, sleeps):
    engine = make_engine(tmp_path, store)
    await asyncio.to_thread(run, engine, keys=["tile", "base"])
    weights = tmp_path / "models/tile/diffusion_pytorch_model.safetensors"
    damaged = bytearray(WEIGHTS)
    damaged[100] ^= 1  # same size: only a hash can tell
    weights.write_bytes(bytes(damaged))
    assert check_files(weights.parent, await store.get(manifest_key("tile"))) == []  # the cheap check passes

    result, seen = await asyncio.to_thread(run, engine, "verify", ["tile", "base"])
    assert result["tile"]["state"] == "failed" and "sha256" in result["tile"]["detail"]
    assert result["base"]["state"] == "present"
    assert await missing_models(store, ["tile", "base"]) == ["tile"]
    assert seen[-1] == (1.0, "verified")

    weights.unlink()  # a missing file: the cheap presence check sees it, and Download fetches it again
    await asyncio.to_thread(run, engine, keys=["tile"])
    assert weights.read_bytes() == WEIGHTS


async def test_url_source_with_published_hash(hf_hub, tmp_path, store, sleeps):
    data = CONFIG * 3
    registry = {"direct": ModelEntry("direct", "Direct", URLSource(f"{hf_hub.url}/files/direct.bin", "d.bin"), "direct",
                                     approx_bytes=10, published={"d.bin": PublishedFile(len(data), hashlib.sha256(data).hexdigest())})}
    engine = make_engine(tmp_path, store, registry=registry)
    await asyncio.to_thread(run, engine)
    assert (tmp_path / "models/direct/d.bin").read_bytes() == data
    bad = {"direct": ModelEntry("direct2", "Direct", URLSource(f"{hf_hub.url}/files/direct.bin", "e.bin"), "direct",
                                approx_bytes=10, published={"e.bin": PublishedFile(None, "0" * 64)})}
    with pytest.raises(ToolboxError) as caught:
        await asyncio.to_thread(run, make_engine(tmp_path, store, registry=bad))
    assert caught.value.code is ErrorCode.CHECKSUM_MISMATCH and not (tmp_path / "models/direct/e.bin").exists()


async def test_a_url_model_whose_server_never_finishes_its_headers_fails_at_the_header_deadline(
        tmp_path, store, sleeps, monkeypatch):
    """No Cancel, no job deadline: the stall time bounds each attempt's wait for the headers, and the retries end."""
    from modal_services.net.transfer import deadlines
    from tests.fakes.slow_answers import SlowAnswers

    monkeypatch.setenv("TOOLBOX_STALL_SECONDS", "0.3")
    monkeypatch.setattr(deadlines, "WATCH_INTERVAL", 0.05)
    with SlowAnswers(interval=0.05) as server:
        registry = {"direct": ModelEntry("direct", "Direct", URLSource(f"{server.url}/files/d.bin", "d.bin"), "direct",
                                         approx_bytes=10)}
        started = time.monotonic()
        with pytest.raises(ToolboxError) as caught:
            await asyncio.to_thread(run, make_engine(tmp_path, store, registry=registry))
        took = time.monotonic() - started
        assert server.wait_for_hang_ups(6)
    error = caught.value
    assert error.code is ErrorCode.DOWNLOAD_FAILED and "kept failing" in error.message and "after 5 retries" in error.message
    assert "stalled" in error.message or "timed out" in error.message, error.message
    assert server.accepted == 6 and len(sleeps) == 5 and took < 3.5, took  # the first try and five retries
    assert not list((tmp_path / "models").rglob("d.bin*"))


async def test_unknown_key_is_invalid_input(tmp_path, store):
    with pytest.raises(ToolboxError) as caught:
        await asyncio.to_thread(run, make_engine(tmp_path, store), keys=["nope"])
    assert caught.value.code is ErrorCode.INVALID_INPUT and "tile" in caught.value.message
