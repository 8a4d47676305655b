"""A job whose runner is gone is failed wherever it is found: the rule (`Job.dead`), the one mark
(`mark_dead`, through `found_job`/`found_jobs`), and the local backend's own places (`Backend.job`,
`recover` at start-up, `close`)."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from bot.backend import LocalBackend
from bot.settings import Settings
from modal_services.jobs.records import (DEAD_JOB_MESSAGE, STALE_AFTER, Job, JobStatus, create_job, found_job,
                                         found_jobs, load_job, update_job)
from modal_services.jobs.requests import CaptionRequest
from modal_services.state.locks import holder_record
from modal_services.state.store import ModalDictStore, SqliteStore
from tests.fakes.engines import GatedCaptionEngine
from tests.fakes.modal_fakes import FakeModalDict
from tests.images import png_bytes
from tests.processes import dead_pid

# A Modal container's process: its pid means another process there, whatever lives under it here.
MODAL_CONTAINER = {"host": "modal", "machine": "modal:ta-01HX:8c1f-boot:4026531836", "pid": os.getpid()}


def gone_here() -> dict:
    """The runner record of a process of this machine that was killed."""
    return {**holder_record(), "pid": dead_pid()}


def assert_failed_as_dead(job: Job | None) -> None:
    assert job is not None and job.status is JobStatus.ERROR and job.stage == "error"
    assert job.error_code == "INTERNAL" and job.error_message == DEAD_JOB_MESSAGE
    assert job.finished_at is not None and job.error().message == DEAD_JOB_MESSAGE


def test_a_runner_gone_from_this_machine_is_dead_at_once_queued_or_running():
    now = time.time()
    for status in (JobStatus.QUEUED, JobStatus.RUNNING):
        assert Job(id="1", kind="download", status=status, heartbeat_at=now, runner=gone_here()).dead(now)
    alive = Job(id="1", kind="download", status=JobStatus.RUNNING, heartbeat_at=now, runner=holder_record())
    assert not alive.dead(now)
    assert not Job(id="1", kind="download", status=JobStatus.DONE, runner=gone_here()).dead(now)
    assert not Job(id="1", kind="download", status=JobStatus.ERROR, runner=gone_here()).dead(now)
    # Waiting in Modal's queue names no runner yet, and no wait there is a sign of death.
    assert not Job(id="1", kind="generate", status=JobStatus.QUEUED, created_at=now - 10_000).dead(now)


@pytest.fixture(params=["sqlite", "modal"])
async def store(request, tmp_path):
    store = SqliteStore(tmp_path / "state.sqlite3") if request.param == "sqlite" else ModalDictStore(FakeModalDict())
    yield store
    await store.close()


async def test_a_runner_on_another_host_is_judged_by_its_heartbeat(store):
    """The Modal case: the container's pid is never checked here (this one is even alive here), only its
    heartbeat; a silent one is failed when found, and stored so."""
    job = await create_job(store, "generate")
    await update_job(store, job.id, status=JobStatus.RUNNING, started_at=time.time() - 600,
                     heartbeat_at=time.time() - 5, runner=MODAL_CONTAINER)
    assert (await found_job(store, job.id)).status is JobStatus.RUNNING
    await update_job(store, job.id, heartbeat_at=time.time() - STALE_AFTER - 1)
    assert_failed_as_dead(await found_job(store, job.id))
    assert_failed_as_dead(await load_job(store, job.id))


async def test_found_jobs_fails_the_dead_and_leaves_the_rest(store):
    live = await create_job(store, "caption", runner=holder_record())
    await update_job(store, live.id, status=JobStatus.RUNNING, started_at=time.time(), heartbeat_at=time.time())
    killed = await create_job(store, "download", runner=gone_here())
    await update_job(store, killed.id, status=JobStatus.RUNNING, started_at=time.time(), heartbeat_at=time.time())
    queued_on_modal = await create_job(store, "generate")
    queued_here_by_a_killed_process = await create_job(store, "caption", runner=gone_here())
    finished = await create_job(store, "upscale", runner=gone_here())
    await update_job(store, finished.id, status=JobStatus.DONE, finished_at=123.0)

    jobs = {job.id: job for job in await found_jobs(store)}
    assert jobs[live.id].status is JobStatus.RUNNING and jobs[queued_on_modal.id].status is JobStatus.QUEUED
    assert_failed_as_dead(jobs[killed.id])
    assert_failed_as_dead(jobs[queued_here_by_a_killed_process.id])
    assert jobs[finished.id].status is JobStatus.DONE and jobs[finished.id].finished_at == 123.0
    assert_failed_as_dead(await load_job(store, killed.id))
    assert await found_job(store, "no-such-job") is None


async def test_a_local_job_names_its_process_from_the_moment_it_is_queued(stand_in_engines, fast_progress):
    gate = threading.Event()
    stand_in_engines.use(CaptionRequest, GatedCaptionEngine(gate))
    backend = LocalBackend(Settings.load(), engines=stand_in_engines)
    try:
        jobs = [await backend.submit(CaptionRequest(images=[png_bytes(8, 8)])) for _ in range(2)]
        assert all(job.runner == holder_record() for job in jobs)
        assert (await backend.job(jobs[1].id)).status is JobStatus.QUEUED  # behind the first, alive
    finally:
        gate.set()
        await backend.close()


async def test_backend_job_fails_a_dead_one_as_it_reads_it(stand_in_engines):
    backend = LocalBackend(Settings.load(), engines=stand_in_engines)
    try:
        job = await create_job(backend.store, "download", runner=gone_here())
        await update_job(backend.store, job.id, status=JobStatus.RUNNING, heartbeat_at=time.time())
        assert_failed_as_dead(await backend.job(job.id))
    finally:
        await backend.close()


async def test_recover_at_start_up_fails_the_dead_and_spares_another_live_process(stand_in_engines):
    backend = LocalBackend(Settings.load(), engines=stand_in_engines)
    try:
        store = backend.store
        killed = await create_job(store, "caption", runner=gone_here())
        await update_job(store, killed.id, status=JobStatus.RUNNING, heartbeat_at=time.time())
        older_version = await create_job(store, "caption")  # queued by a version whose jobs named no runner
        beside = await create_job(store, "download", runner={**holder_record(), "pid": os.getppid()})
        await update_job(store, beside.id, status=JobStatus.RUNNING, heartbeat_at=time.time())  # a setup running
        await backend.recover()
        assert_failed_as_dead(await load_job(store, killed.id))
        assert_failed_as_dead(await load_job(store, older_version.id))
        assert (await load_job(store, beside.id)).status is JobStatus.RUNNING
    finally:
        await backend.close()


async def test_a_closing_local_backend_fails_what_it_was_running_and_queuing(stand_in_engines, fast_progress):
    """The bot's supervisor restarts the bot in the same process: its pid lives on, so the closing backend
    itself says its jobs will never finish."""
    gate = threading.Event()
    stand_in_engines.use(CaptionRequest, GatedCaptionEngine(gate))
    backend = LocalBackend(Settings.load(), engines=stand_in_engines)
    try:
        running, queued = [await backend.submit(CaptionRequest(images=[png_bytes(8, 8)])) for _ in range(2)]
        for _ in range(500):
            if (await load_job(backend.store, running.id)).status is JobStatus.RUNNING:
                break
            await asyncio.sleep(0.01)
        await backend.close()
    finally:
        gate.set()
    store = SqliteStore(Settings.load().state_path)
    try:
        assert_failed_as_dead(await load_job(store, running.id))
        assert_failed_as_dead(await load_job(store, queued.id))
    finally:
        await store.close()
