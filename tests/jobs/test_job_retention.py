"""Finished jobs go after a retention (TOOLBOX_JOB_RETENTION_HOURS), with every key that belongs to them:
the rule (`sweep_finished_jobs`), the setting, and the local backend that applies it while the bot or
`toolbox serve` runs."""

from __future__ import annotations

import asyncio
import time

import pytest

import bot.backend
from bot.backend import LocalBackend
from bot.settings import Settings
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.records import (DEFAULT_JOB_RETENTION_HOURS, JobStatus, create_job, job_retention_seconds,
                                         load_job, sweep_finished_jobs, update_job)
from modal_services.state.keys import PER_JOB_PREFIXES, cancel_key, preview_key
from modal_services.state.locks import holder_record
from modal_services.state.store import SqliteStore

HOUR = 3600.0


async def finished_job(store, hours_ago: float, status: JobStatus = JobStatus.DONE) -> str:
    job = await create_job(store, "caption")
    ended = time.time() - hours_ago * HOUR
    await update_job(store, job.id, status=status, finished_at=ended, created_at=ended)
    await store.put(preview_key(job.id), "jpeg-base64")
    await store.put(cancel_key(job.id), ended)
    await store.put(f"call:{job.id}", "fc-1")
    return job.id


async def kept_keys(store, job_id: str) -> list[str]:
    return [prefix for prefix in PER_JOB_PREFIXES if await store.contains(prefix + job_id)]


async def test_jobs_finished_past_the_retention_go_with_everything_they_keep(tmp_path):
    store = SqliteStore(tmp_path / "state.db")
    old = [await finished_job(store, 25, status) for status in (JobStatus.DONE, JobStatus.ERROR, JobStatus.CANCELLED)]
    recent = await finished_job(store, 23)
    # Unfinished jobs stay whatever their age: a long queue is no reason to lose one.
    waiting = await create_job(store, "caption", runner=holder_record())
    await update_job(store, waiting.id, created_at=time.time() - 100 * HOUR)

    assert await sweep_finished_jobs(store, 24 * HOUR) == 3
    for job_id in old:
        assert await kept_keys(store, job_id) == []
    assert await kept_keys(store, recent) == list(PER_JOB_PREFIXES)
    assert (await load_job(store, waiting.id)).status is JobStatus.QUEUED
    assert await sweep_finished_jobs(store, 24 * HOUR) == 0
    await store.close()


def test_the_retention_is_a_setting_with_a_stated_default(monkeypatch):
    monkeypatch.delenv("TOOLBOX_JOB_RETENTION_HOURS", raising=False)
    assert job_retention_seconds() == DEFAULT_JOB_RETENTION_HOURS * HOUR == 7 * 24 * HOUR
    monkeypatch.setenv("TOOLBOX_JOB_RETENTION_HOURS", "2.5")
    assert job_retention_seconds() == 2.5 * HOUR
    for bad in ("soon", "0", "-3", "nan", "100000"):
        monkeypatch.setenv("TOOLBOX_JOB_RETENTION_HOURS", bad)
        with pytest.raises(ToolboxError) as refused:
            job_retention_seconds()
        assert refused.value.code is ErrorCode.INVALID_INPUT
        assert refused.value.message.startswith("TOOLBOX_JOB_RETENTION_HOURS must be a number from 1 to 8784")


def test_a_bad_retention_stops_the_local_backend_before_it_opens_anything(monkeypatch):
    monkeypatch.setenv("TOOLBOX_JOB_RETENTION_HOURS", "a week")
    with pytest.raises(ToolboxError, match="TOOLBOX_JOB_RETENTION_HOURS"):
        LocalBackend(Settings.load())


async def test_the_local_backend_sweeps_when_it_starts_serving_and_then_periodically(monkeypatch):
    monkeypatch.setenv("TOOLBOX_JOB_RETENTION_HOURS", "1")
    monkeypatch.setattr(bot.backend, "JOB_SWEEP_INTERVAL_SECONDS", 0.05)
    backend = LocalBackend(Settings.load())
    try:
        left_before = await finished_job(backend.store, 2)
        kept = await finished_job(backend.store, 0.5)
        # What the bot and `toolbox serve` call as they start.
        await backend.recover()
        await backend.recover()  # the bot's again after a reconnect: still one sweeper
        assert await kept_keys(backend.store, left_before) == []
        left_while_running = await finished_job(backend.store, 3)
        for _ in range(100):
            if not await backend.store.contains(f"job:{left_while_running}"):
                break
            await asyncio.sleep(0.02)
        assert await kept_keys(backend.store, left_while_running) == []
        assert await kept_keys(backend.store, kept) == list(PER_JOB_PREFIXES)
    finally:
        await backend.close()
    assert backend._sweeper.done()


async def test_a_job_that_could_only_fail_for_want_of_models_leaves_no_row():
    from modal_services.jobs.records import found_jobs
    from modal_services.jobs.requests import CaptionRequest
    from tests.images import png_bytes

    backend = LocalBackend(Settings.load())  # the real engines, on a data dir with no models
    try:
        request = CaptionRequest.parse({"images": [png_bytes()], "style": "descriptive"})
        with pytest.raises(ToolboxError) as refused:
            await backend.submit(request)
        assert refused.value.code is ErrorCode.MODELS_MISSING and "qwen3-vl-2b" in refused.value.message
        assert await found_jobs(backend.store) == []
    finally:
        await backend.close()
