"""A job whose runner is gone, as the HTTP API finds it (`GET /jobs/{id}` says failed, at once), a `toolbox serve`
killed mid-job and started again, and the client's deadline (`toolbox generate --api` never polls forever)."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import bot.api.client
from bot.api import ApiClient, api_for_settings, create_app
from bot.api.dependencies import caller_id
from bot.backend import LocalBackend
from bot.cli import main
from bot.settings import Settings
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.records import DEAD_JOB_MESSAGE, JobStatus, create_job, load_job, update_job
from modal_services.jobs.requests import GenerateRequest
from modal_services.library.entries import Library
from modal_services.state.locks import holder_record
from modal_services.state.store import SqliteStore
from tests.fakes.engines import StandInImageEngine
from tests.images import png_bytes
from tests.processes import dead_pid
from tests.servers import LOOPBACK, running_uvicorn

TOKEN = "dead-jobs-token-3e1a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPOSITORY = Path(__file__).resolve().parents[2]


def killed_runner() -> dict:
    return {**holder_record(), "pid": dead_pid()}


async def test_get_job_fails_a_job_whose_process_was_killed(stand_in_engines):
    backend = LocalBackend(Settings.load(), engines=stand_in_engines)
    settings = Settings.load()
    app = create_app(backend, Library.for_backend(backend.store, True, settings.loras_dir, settings.models_dir), TOKEN,
                     settings.api_concurrency)
    job = await create_job(backend.store, "caption", owner={"api_caller": caller_id(TOKEN)}, runner=killed_runner())
    await update_job(backend.store, job.id, status=JobStatus.RUNNING, started_at=time.time(), heartbeat_at=time.time())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api", headers=AUTH) as client:
        view = (await client.get(f"/jobs/{job.id}")).json()
    await backend.close()
    assert view["status"] == "error" and view["finished_at"] is not None
    assert view["error"]["error_code"] == "INTERNAL" and view["error"]["error"] == DEAD_JOB_MESSAGE


@pytest.fixture
def held_generate(backends_from_settings, fast_progress, monkeypatch):
    """(API URL, gate): `api_for_settings` served on 127.0.0.1, every generate job held until the gate is set."""
    gate = threading.Event()
    backends_from_settings.use(GenerateRequest, StandInImageEngine(gate=gate))
    monkeypatch.setenv("TOOLBOX_API_TOKEN", TOKEN)
    monkeypatch.setattr(bot.api.client, "POLL_SECONDS", 0.02)
    try:
        with running_uvicorn(api_for_settings(Settings.load(), TOKEN), max_seconds=60) as url:
            yield url, gate
    finally:
        gate.set()


def test_toolbox_generate_api_gives_up_after_the_timeout_and_its_grace(held_generate, capsys, monkeypatch):
    url, _ = held_generate
    monkeypatch.setattr(bot.api.client, "DEADLINE_GRACE_SECONDS", 0.5)
    started = time.monotonic()
    assert main(["generate", "a cat", "--api", url, "--timeout", "0.5", "--seed", "3"]) == 1
    took = time.monotonic() - started
    # The last line (the server in this process logs its classifier's loading above it).
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: TIMEOUT: Job "), err
    assert "within 0.5 s (its timeout) plus 0.5 s" in err and 1.0 <= took < 10
    # Stopped on the server too: the held job ends cancelled.
    job_id = re.search(r"Job ([0-9a-f]+) ", err).group(1)
    for _ in range(250):
        view = httpx.get(f"{url}/jobs/{job_id}", headers=AUTH, timeout=5).json()
        if view["status"] != "running":
            break
        time.sleep(0.02)
    assert view["status"] == "cancelled"


async def test_the_api_client_ends_at_once_with_the_error_of_a_job_found_dead(held_generate):
    url, _ = held_generate
    store = SqliteStore(Settings.load().state_path)
    async with ApiClient(url, TOKEN, poll_seconds=0.02) as client:
        polling = asyncio.create_task(client.run({"kind": "generate", "prompt": "a cat", "timeout": 300},
                                                 lambda update: asyncio.sleep(0)))
        try:
            for _ in range(500):
                jobs = [job for job in (await store.items("job:")).values() if job["status"] == "running"]
                if jobs:
                    break
                await asyncio.sleep(0.01)
            # Its runner dies (as if killed): the next poll hears of it, not the 300 s deadline.
            await update_job(store, jobs[0]["id"], runner=killed_runner())
            with pytest.raises(ToolboxError) as caught:
                await asyncio.wait_for(polling, timeout=10)
        finally:
            polling.cancel()
            await store.close()
    assert caught.value.code is ErrorCode.INTERNAL and caught.value.message == DEAD_JOB_MESSAGE


# `toolbox serve` with a caption engine that never finishes (a stand-in: no model), as the CLI starts it.
SERVE_WITH_A_CAPTION_THAT_NEVER_ENDS = """
import sys
import bot.backend
from modal_services.jobs.requests import CaptionRequest
from tests.fakes.engines import GatedCaptionEngine, StandInEngines
engines = StandInEngines()
engines.use(CaptionRequest, GatedCaptionEngine())
bot.backend.make_backend = lambda settings: bot.backend.LocalBackend(settings, engines=engines)
from bot.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_serve(port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    env.pop("TOOLBOX_API_TOKEN", None)
    server = subprocess.Popen([sys.executable, "-c", SERVE_WITH_A_CAPTION_THAT_NEVER_ENDS, "serve", "--no-auth",
                               "--host", LOOPBACK, "--port", str(port)],
                              cwd=REPOSITORY, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://{LOOPBACK}:{port}/health", timeout=2)
            return server
        except httpx.TransportError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise AssertionError(f"toolbox serve did not start: {server.communicate()[1].decode()[-2000:]}")
            time.sleep(0.1)


def stop(server: subprocess.Popen | None) -> None:
    if server is not None and server.poll() is None:
        server.kill()
    if server is not None:
        server.communicate(timeout=10)


def test_a_toolbox_serve_killed_mid_job_and_started_again_reports_the_job_failed(capsys):
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
    api = f"http://{LOOPBACK}:{port}"
    first = second = None
    try:
        first = start_serve(port)
        image = base64.b64encode(png_bytes(16, 16)).decode()
        accepted = httpx.post(f"{api}/jobs", json={"kind": "caption", "images_base64": [image]}, timeout=10)
        job_id = accepted.json()["job_id"]
        for _ in range(500):
            view = httpx.get(f"{api}/jobs/{job_id}", timeout=5).json()
            if view["status"] == "running":
                break
            time.sleep(0.02)
        assert view["status"] == "running"
        first.kill()  # SIGKILL: no shutdown code runs
        first.communicate(timeout=10)  # reaped, as a shell reaps what it started

        second = start_serve(port)
        view = httpx.get(f"{api}/jobs/{job_id}", timeout=5).json()
        assert view["status"] == "error" and view["error"] == {"error": DEAD_JOB_MESSAGE, "error_code": "INTERNAL"}
    finally:
        stop(first)
        stop(second)
    assert main(["status", "--json"]) == 0
    assert '"caption"' not in capsys.readouterr().out  # counted neither running nor queued
    record = asyncio.run(_load(job_id))
    assert record.status is JobStatus.ERROR and record.error_message == DEAD_JOB_MESSAGE


async def _load(job_id: str):
    store = SqliteStore(Settings.load().state_path)
    try:
        return await load_job(store, job_id)
    finally:
        await store.close()
