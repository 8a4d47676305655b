"""Following a job by its record: every front end waits for results and shows progress through these.

The record is cheap to read (one state-store read), so front ends poll it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

from bot.backend import Backend
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.records import Job

POLL_INTERVAL = 0.5


async def follow_job(
    backend: Backend,
    job_id: str,
    on_update: Callable[[Job], Awaitable[Any]],
    poll_interval: float | None = None,
) -> Any:
    """Wait for the job's result, calling `on_update` with the record while it runs;
    a record that ends in an error (a cancel, or its runner found dead, included) raises that error at once."""
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


async def watch_job(
    backend: Backend,
    job_id: str,
    on_update: Callable[[Job], Awaitable[Any]],
    poll_interval: float | None = None,
    timeout: float | None = None,
) -> Job:
    """Follow a job by its record alone (started here or by anyone else) until it ends; `on_update(job)` each poll.

    Returns the final record (a job whose runner died as failed: `Backend.job`
    finds it so), or the running one when `timeout` runs out.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job = await backend.job(job_id)
        if job is None:
            raise ToolboxError(ErrorCode.INTERNAL, "That job has disappeared.")
        await on_update(job)
        if job.status.finished or (deadline is not None and time.monotonic() > deadline):
            return job
        await asyncio.sleep(POLL_INTERVAL if poll_interval is None else poll_interval)
