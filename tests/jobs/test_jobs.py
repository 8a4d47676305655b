"""Job records, the throttled progress reporter and run_job's error handling."""

from __future__ import annotations

import time

import pytest

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.records import JobStatus, ProgressReporter, create_job, load_job, run_job
from modal_services.state.store import SqliteStore


class CountingStore(SqliteStore):
    def __init__(self, path):
        super().__init__(path)
        self.job_writes: list[dict] = []

    async def put(self, key, value):
        if key.startswith("job:"):
            self.job_writes.append(value)
        await super().put(key, value)


@pytest.fixture
async def store(tmp_path):
    store = CountingStore(tmp_path / "state.sqlite3")
    yield store
    await store.close()


async def test_job_record_round_trip(store):
    job = await create_job(store, "caption", owner={"user_id": 42})
    loaded = await load_job(store, job.id)
    assert loaded == job
    assert loaded.status is JobStatus.QUEUED and loaded.owner == {"user_id": 42}
    assert await load_job(store, "missing") is None


async def test_reporter_throttles_and_always_writes_the_final_state(store):
    job = await create_job(store, "caption")
    calls = 2000

    def work(progress):
        started = time.monotonic()
        for i in range(calls):
            progress(i / calls, f"step {i}")
            time.sleep(0.0006)
        return time.monotonic() - started

    writes_before = len(store.job_writes)
    elapsed = await run_job(store, job.id, work)
    writes = store.job_writes[writes_before:]
    # start + throttled progress (at most ~2/s) + final; never one per report
    assert len(writes) <= 2 + elapsed / 0.5 + 2
    assert len(writes) >= 3
    assert writes[-1]["status"] == "done" and writes[-1]["progress"] == 1.0
    running = [w for w in writes if w["status"] == "running" and w["stage"].startswith("step")]
    assert running, "intermediate progress was never written"
    assert all(0.0 <= w["progress"] <= 1.0 for w in writes)
    final = await load_job(store, job.id)
    assert final.status is JobStatus.DONE and final.finished_at >= final.started_at


async def test_last_progress_before_finish_is_not_written_after_it(store):
    job = await create_job(store, "caption")

    def work(progress):
        progress(0.9, "almost")
        return "ok"

    assert await run_job(store, job.id, work) == "ok"
    assert store.job_writes[-1]["status"] == "done"


async def test_toolbox_error_is_recorded_and_raised(store):
    job = await create_job(store, "caption")

    def work(progress):
        raise ToolboxError(ErrorCode.MODELS_MISSING, "Run /setup.")

    with pytest.raises(ToolboxError) as caught:
        await run_job(store, job.id, work)
    assert caught.value.code is ErrorCode.MODELS_MISSING
    record = await load_job(store, job.id)
    assert record.status is JobStatus.ERROR
    assert (record.error_code, record.error_message) == ("MODELS_MISSING", "Run /setup.")
    assert record.error().code is ErrorCode.MODELS_MISSING


async def test_unexpected_exception_is_reported_without_its_text(store):
    job = await create_job(store, "caption")

    def work(progress):
        raise RuntimeError("secret-token-abc123 at /internal/path")

    with pytest.raises(ToolboxError) as caught:
        await run_job(store, job.id, work)
    record = await load_job(store, job.id)
    assert caught.value.code is ErrorCode.INTERNAL
    assert "secret-token" not in record.error_message and "secret-token" not in str(caught.value)


async def test_cancelled_error_marks_the_job_cancelled(store):
    job = await create_job(store, "caption")
    reporter = ProgressReporter(store, job.id)
    await reporter.start()
    await reporter.fail(ToolboxError(ErrorCode.CANCELLED, "Stopped by the user."))
    assert (await load_job(store, job.id)).status is JobStatus.CANCELLED


def test_errors_survive_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(ToolboxError(ErrorCode.CUDA_OOM, "too big")))
    assert (error.code, error.message) == (ErrorCode.CUDA_OOM, "too big")


async def test_a_running_job_stops_at_its_next_step_when_cancelled(store, monkeypatch):
    import asyncio

    import modal_services.jobs.records as jobs

    monkeypatch.setattr(jobs, "PROGRESS_WRITE_INTERVAL", 0.02)
    job = await create_job(store, "caption")
    steps_done = []

    def work(progress):
        for step in range(500):
            progress(step / 500, "working")
            steps_done.append(step)
            time.sleep(0.005)
        return "finished"

    running = asyncio.create_task(run_job(store, job.id, work))
    while (await load_job(store, job.id)).status is not JobStatus.RUNNING:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert await jobs.request_cancel(store, job.id) is not None
    with pytest.raises(ToolboxError) as caught:
        await running
    assert caught.value.code is ErrorCode.CANCELLED
    assert len(steps_done) < 400
    record = await load_job(store, job.id)
    assert record.status is JobStatus.CANCELLED
    assert not await store.contains(jobs.cancel_key(job.id))
    assert await jobs.request_cancel(store, job.id) is None  # already finished


async def test_a_queued_job_cancelled_never_runs(store):
    from modal_services.jobs.records import request_cancel

    job = await create_job(store, "caption")
    assert (await request_cancel(store, job.id)).status is JobStatus.QUEUED
    assert (await load_job(store, job.id)).status is JobStatus.CANCELLED
    ran = []
    with pytest.raises(ToolboxError) as caught:
        await run_job(store, job.id, lambda progress: ran.append(1))
    assert caught.value.code is ErrorCode.CANCELLED and ran == []
    assert (await load_job(store, job.id)).status is JobStatus.CANCELLED


async def test_heartbeats_while_the_engine_is_silent(store, monkeypatch):
    import modal_services.jobs.records as jobs

    monkeypatch.setattr(jobs, "HEARTBEAT_INTERVAL", 0.05)
    monkeypatch.setattr(jobs, "PROGRESS_WRITE_INTERVAL", 0.01)
    job = await create_job(store, "caption")
    await run_job(store, job.id, lambda progress: time.sleep(0.4))
    heartbeats = {write.get("heartbeat_at") for write in store.job_writes if write["status"] == "running"}
    assert len(heartbeats) >= 4


def test_silent_running_jobs_are_dead():
    from modal_services.jobs.records import STALE_AFTER, Job

    now = time.time()
    assert Job(id="1", kind="caption", status=JobStatus.RUNNING, heartbeat_at=now - STALE_AFTER - 1).dead(now)
    assert not Job(id="1", kind="caption", status=JobStatus.RUNNING, heartbeat_at=now - 5).dead(now)
    assert not Job(id="1", kind="caption", status=JobStatus.QUEUED, created_at=now - 10_000).dead(now)
    assert not Job(id="1", kind="caption", status=JobStatus.DONE, heartbeat_at=0).dead(now)
