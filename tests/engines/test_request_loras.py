"""A request's own LoRA (`lora_url`) against hostile and broken servers on 127.0.0.1: bounded by the job,
capped, never naming the link, leaving nothing behind. (Applying a fetched LoRA: test_generate_engine.py.)"""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modal_services.engines.sdxl import request_loras
from modal_services.engines.sdxl.generate import TextToImage
from modal_services.engines.sdxl.request_loras import SCRATCH_PREFIX, RequestLoras
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.requests import GenerateRequest
from modal_services.net.transfer import retrying
from tests.fakes.hf_server import FakeHub
from tests.fakes.slow_answers import SlowAnswers
from tests.fakes.cancelling import cancelled_after

BODY = os.urandom(256 * 1024)
SECRET_PATH = "/files/secret-name"


@pytest.fixture
def hub():
    with FakeHub() as server:
        server.add_plain("secret-name", BODY)
        yield server


@pytest.fixture(autouse=True)
def no_back_off(monkeypatch):
    monkeypatch.setattr(retrying, "wait_before_retry", lambda seconds, interrupt=None: None)


class ModelsUpToTheFetch:
    """SdxlModels as far as a generate job goes before its LoRA is fetched (these tests never get further)."""

    def lora_specs(self, loras):
        return []

    def checkpoint_path(self, name):
        return Path("base.safetensors")

    def use_checkpoint(self, path, progress):
        pass

    def model_layout(self):
        return None


def generate_with_lora(url: str, progress, timeout: float = 60.0, folder: Path | None = None):
    request = GenerateRequest.parse({"prompt": "a cat", "lora_url": url, "timeout": timeout})
    engine = TextToImage(ModelsUpToTheFetch(), RequestLoras(folder), instant_id=None)
    started = time.monotonic()
    with pytest.raises(ToolboxError) as caught:
        engine.generate(request, progress)
    return caught.value, time.monotonic() - started


# ---------------------------------------------------------------- bounded by the job


def test_cancel_ends_a_trickling_lora_fetch_within_seconds(hub, tmp_path):
    hub.fault(SECRET_PATH, "trickle", times=10, at=1000, interval=0.3)
    error, took = generate_with_lora(f"{hub.url}{SECRET_PATH}", cancelled_after(0.5), folder=tmp_path)
    assert error.code is ErrorCode.CANCELLED and took < 3


def test_the_request_timeout_ends_a_trickling_lora_fetch(hub, tmp_path):
    hub.fault(SECRET_PATH, "trickle", times=10, at=1000, interval=0.3)
    error, took = generate_with_lora(f"{hub.url}{SECRET_PATH}", lambda fraction, stage: None, timeout=1.0,
                                     folder=tmp_path)
    assert error.code is ErrorCode.TIMEOUT and "timeout" in error.message and took < 3


@pytest.fixture
def slow_answers():
    """A LoRA server that accepts, then trickles its status line and headers a byte at a time, never ending them."""
    with SlowAnswers(interval=0.05) as server:
        yield server


def test_cancel_ends_a_lora_fetch_whose_server_trickles_its_headers(slow_answers, tmp_path):
    error, took = generate_with_lora(f"{slow_answers.url}{SECRET_PATH}", cancelled_after(0.3), folder=tmp_path)
    assert error.code is ErrorCode.CANCELLED and took < 1.3, (error, took)
    assert slow_answers.wait_for_hang_ups(1)  # the connection is cut, not left to the server


def test_the_request_timeout_ends_a_lora_fetch_whose_headers_never_finish(slow_answers, tmp_path):
    error, took = generate_with_lora(f"{slow_answers.url}{SECRET_PATH}", lambda fraction, stage: None, timeout=1.0,
                                     folder=tmp_path)
    assert error.code is ErrorCode.TIMEOUT and "timeout" in error.message and took < 2, (error, took)
    assert slow_answers.accepted == 1


def test_the_fetch_reports_progress_to_the_job(hub, tmp_path):
    hub.fault(SECRET_PATH, "status", status=403)
    stages = []
    generate_with_lora(f"{hub.url}{SECRET_PATH}", lambda fraction, stage: stages.append(stage), folder=tmp_path)
    assert "fetching the LoRA" in stages


def test_a_lora_declaring_more_than_the_cap_is_refused_before_its_body(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(request_loras, "LORA_MAX_BYTES", 64 * 1024)
    hub.pace = 32 * 1024  # reading the body would take eight seconds
    error, took = generate_with_lora(f"{hub.url}{SECRET_PATH}", lambda fraction, stage: None, folder=tmp_path)
    assert error.code is ErrorCode.LORA_DOWNLOAD_FAILED and "more than the 0.1 MiB allowed" in error.message
    assert took < 2


# ---------------------------------------------------------------- the link is never shown


def failing_links(hub, monkeypatch):
    """(label, URL, environment change, what the hub answers): each fails a different way."""
    signed = f"{SECRET_PATH}?X-Amz-Signature=secret-query"
    return [
        ("refused by the server", f"{hub.url}{signed}", None, ("status", {"status": 403})),
        ("server busy", f"{hub.url}{signed}", None, ("status", {"status": 503, "times": 5})),
        ("plain http, not allowed", f"{hub.url}{signed}", "", None),
        ("a loopback address", f"https://127.0.0.1:{hub.url.rsplit(':', 1)[1]}{signed}", "", None),
        ("a name that does not resolve", f"https://secret-host.invalid{signed}", None, None),
        ("a user in the link", f"https://secret-user:pw@example.com{signed}", None, None),
        ("a redirect to a private address", f"{hub.url}{signed}", None,
         ("status", {"status": 302, "headers": {"Location": "http://10.0.0.1/secret-target"}})),
        ("a redirect without a target", f"{hub.url}{signed}", None, ("status", {"status": 302, "headers": {}})),
    ]


def test_no_message_or_log_line_shows_any_part_of_the_link(hub, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    port = hub.url.rsplit(":", 1)[1]
    codes = set()
    for label, url, allowed, answer in failing_links(hub, monkeypatch):
        if allowed is not None:
            monkeypatch.setenv("TOOLBOX_ALLOWED_HOSTS", allowed)
        if answer is not None:
            kind, options = answer
            hub.fault(SECRET_PATH, kind, **options)
        error, _ = generate_with_lora(url, lambda fraction, stage: None, folder=tmp_path)
        shown = [error.message, str(error), *(record.getMessage() for record in caplog.records)]
        for text in shown:
            for part in ("secret", "127.0.0.1", port, "example.com", "10.0.0.1", "/files"):
                assert part not in text, (label, text)
        assert "the LoRA URL" in error.message, (label, error.message)
        codes.add(error.code)
        monkeypatch.setenv("TOOLBOX_ALLOWED_HOSTS", "127.0.0.1")
        hub.faults.clear()
        caplog.clear()
    assert codes == {ErrorCode.LORA_DOWNLOAD_FAILED, ErrorCode.INVALID_INPUT}


def test_an_allowed_lan_host_over_plain_http_is_asked(hub, tmp_path):
    """TOOLBOX_ALLOWED_HOSTS is how a self-hoster's plain-http bucket is admitted: the request reaches it."""
    hub.fault(SECRET_PATH, "status", status=403)
    with pytest.raises(ToolboxError) as caught:
        RequestLoras(tmp_path).fetch(f"{hub.url}{SECRET_PATH}", None, None)
    assert caught.value.code is ErrorCode.LORA_DOWNLOAD_FAILED and "HTTP 403" in caught.value.message
    assert len(hub.body_requests(SECRET_PATH)) == 1


# ---------------------------------------------------------------- nothing left behind


def scratch_folders(parent: Path) -> list[Path]:
    return list(parent.glob(f"{SCRATCH_PREFIX}*"))


def test_the_scratch_folder_is_made_at_the_first_fetch_and_goes_with_the_worker(hub, tmp_path):
    hub.fault(SECRET_PATH, "status", status=403)
    loras = RequestLoras(tmp_path)
    assert scratch_folders(tmp_path) == [] and loras.cached("ab" * 32) is None  # a start leaves nothing
    with pytest.raises(ToolboxError):
        loras.fetch(f"{hub.url}{SECRET_PATH}", None, None)
    (folder,) = scratch_folders(tmp_path)
    assert list(folder.iterdir()) == [folder / ".incoming"] and not list((folder / ".incoming").iterdir())
    del loras
    gc.collect()
    assert scratch_folders(tmp_path) == []


def test_a_worker_process_that_exits_leaves_no_scratch_folder(hub, tmp_path):
    """In the system's temporary folder, as the engine makes it: gone when the process ends."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    script = (
        "import sys\n"
        "from modal_services.engines.sdxl.request_loras import RequestLoras\n"
        "loras = RequestLoras()\n"
        "try:\n"
        "    loras.fetch(sys.argv[1], None, None)\n"
        "except Exception as error:\n"
        "    print(type(error).__name__, getattr(error, 'code', ''))\n"
        "import os, tempfile\n"
        "print(sorted(os.listdir(tempfile.gettempdir())))\n"
    )
    hub.fault(SECRET_PATH, "status", status=403)
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(Path(request_loras.__file__).parents[3])}
    done = subprocess.run([sys.executable, "-c", script, f"{hub.url}{SECRET_PATH}"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert "LORA_DOWNLOAD_FAILED" in done.stdout and SCRATCH_PREFIX in done.stdout, done.stdout + done.stderr
    assert list(tmp.iterdir()) == []
