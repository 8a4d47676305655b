"""Following a job and showing its progress in a Discord reply.

The bot polls the job record (cheap: one state-store read) and edits its reply
only when the text changes, and at most once per `min_interval`, so it stays
well inside Discord's per-message edit rate limit. The final text is always
shown.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

from bot.backend import Backend
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs import Job, JobStatus, update_job

BAR_WIDTH = 14
# About one edit per 1.5 s per message is safe under Discord's unpublished edit limits.
MIN_EDIT_INTERVAL = 1.5
POLL_INTERVAL = 0.5

STAGE_LABELS = {
    "queued": "Queued, waiting for a worker…",
    "starting": "Starting…",
    "loading model": "Loading the model…",
}


def progress_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = round(max(0.0, min(fraction, 1.0)) * width)
    return "▰" * filled + "▱" * (width - filled) + f" {fraction * 100:3.0f}%"


def render_job(job: Job, title: str) -> str:
    stage = STAGE_LABELS.get(job.stage, job.stage[:1].upper() + job.stage[1:] + "…")
    if job.status is JobStatus.QUEUED:
        return f"⏳ **{title}** · {stage}"
    return f"⚙️ **{title}** · {stage}\n`{progress_bar(job.progress)}`"


class ReplyEditor:
    """Edits one message, skipping repeats and spacing edits out."""

    def __init__(self, edit: Callable[[str], Awaitable[Any]], min_interval: float | None = None, clock=time.monotonic):
        self._edit = edit
        self._min_interval = MIN_EDIT_INTERVAL if min_interval is None else min_interval
        self._clock = clock
        self._shown: str | None = None
        self._last_edit = float("-inf")
        self.edits = 0

    async def show(self, text: str, final: bool = False) -> None:
        if text == self._shown:
            return
        if not final and self._clock() - self._last_edit < self._min_interval:
            return
        await self._edit(text)
        self._shown = text
        self._last_edit = self._clock()
        self.edits += 1


async def follow_job(
    backend: Backend,
    job_id: str,
    on_update: Callable[[Job], Awaitable[Any]],
    poll_interval: float | None = None,
) -> Any:
    """Wait for the job's result, calling `on_update` with the record while it runs."""
    result = asyncio.ensure_future(backend.result(job_id))
    try:
        while not result.done():
            job = await backend.job(job_id)
            if job is not None and not job.status.finished:
                await on_update(job)
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
