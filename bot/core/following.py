"""Following a job by its record: every front end waits for results and shows progress through these.

The record is cheap to read (one state-store read), so front ends poll it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

from bot.backend import Backend
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.records import Job, JobStatus, update_job

POLL_INTERVAL = 0.5


async def follow_job(
    backend: Backend,
    job_id: str,
    on_update: Callable[[Job], Awaitable[Any]],
    poll_interval: float | None = None,
) -> Any:
    """Wait for the job's result, calling `on_update` with the record while it runs;
    a record that ends in an error (a cancel included) raises that error at once."""
    result = asyncio.ensure_future(backend.result(job_id))
    try:
        while not result.done():
            job = await backend.job(job_id)
            if job is not None and not job.status.finished:
                await on_update(job)
            elif job is not None and job.error() is not None:
                # Cancelled while queued, or failed: its result may never come (its worker may
                # still be busy with another job), but the verdict is in.
                raise job.error()
            await asyncio.wait({result}, timeout=POLL_INTERVAL if poll_interval is None else poll_interval)
        return result.result()
    finally:
        result.cancel()


async def end_if_stale(backend: Backend, job: Job) -> None:
    """A running job whose worker is gone is marked failed (nothing would ever finish it), and that error raised."""
    if job.stale():
        error = ToolboxError(ErrorCode.INTERNAL, "The worker running this job stopped responding; run it again.")
        await update_job(backend.store, job.id, status=JobStatus.ERROR, stage="error",
                         error_code=error.code.value, error_message=error.message, finished_at=time.time())
        raise error


async def watch_job(
    backend: Backend,
    job_id: str,
    on_update: Callable[[Job], Awaitable[Any]],
    poll_interval: float | None = None,
    timeout: float | None = None,
) -> Job:
    """Follow a job by its record alone (started here or by anyone else) until it ends; `on_update(job)` each poll.

    Returns the final record, or the running one when `timeout` runs out; a
    job whose worker died ends the watch with its error (`end_if_stale`).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job = await backend.job(job_id)
        if job is None:
            raise ToolboxError(ErrorCode.INTERNAL, "That job has disappeared.")
        await end_if_stale(backend, job)
        await on_update(job)
        if job.status.finished or (deadline is not None and time.monotonic() > deadline):
            return job
        await asyncio.sleep(POLL_INTERVAL if poll_interval is None else poll_interval)
