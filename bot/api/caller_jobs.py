"""Each caller's jobs: how many it may have in flight, and the collectors that keep their results.

A caller's jobs are its own: a job started by the bot or by another token is
"not found" here.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, Awaitable, Callable

from bot.api.responses import ApiError
from bot.backend import RESULT_KEEP_SECONDS, Backend
from modal_services.errors import ErrorCode
from modal_services.jobs.records import Job, request_cancel
from modal_services.jobs.requests import JobRequest

# What a refused caller is told to wait: about one short job.
RETRY_AFTER_SECONDS = 10


class ConcurrencyCap:
    """Jobs in flight per caller.

    `reserve` checks and counts with no await in between: on one event loop no
    other request can run in that gap, so two requests cannot both take the
    last slot. (The API runs as one process: `toolbox serve`, or the single
    Modal web container.)
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._held: Counter[str] = Counter()

    def reserve(self, caller: str) -> None:
        if self._held[caller] >= self.limit:
            raise ApiError(ErrorCode.RATE_LIMITED,
                           f"You already have {self.limit} jobs queued or running; wait for one to finish.",
                           retry_after=RETRY_AFTER_SECONDS)
        self._held[caller] += 1

    def release(self, caller: str) -> None:
        self._held[caller] -= 1
        if self._held[caller] <= 0:
            del self._held[caller]


class ApiJobs:
    """Starts jobs for callers and collects their results.

    One collector task per job awaits the backend's result (the backend hands
    a local result out once), frees the caller's slot when the job ends, and
    keeps the outcome for `GET /jobs/{id}` for as long as the backend would.
    """

    def __init__(self, backend: Backend, cap: ConcurrencyCap):
        self.backend = backend
        self.cap = cap
        self._outcomes: dict[str, asyncio.Task] = {}

    async def start(self, caller: str, prepare: Callable[[], Awaitable[JobRequest]], meta: dict[str, Any]) -> Job:
        """A job of the request `prepare()` builds, started for `caller`. The caller's slot is taken first:
        a caller at its cap is refused before anything of its request is looked at (no image is read)."""
        self.cap.reserve(caller)
        try:
            job = await self.backend.submit(await prepare(), owner={"api_caller": caller}, meta=meta)
        except BaseException:
            self.cap.release(caller)
            raise
        self._collect(job.id, release=caller)
        return job

    def _collect(self, job_id: str, release: str | None = None) -> asyncio.Task:
        async def collect() -> Any:
            try:
                return await self.backend.result(job_id)
            finally:
                if release is not None:
                    self.cap.release(release)
                asyncio.get_running_loop().call_later(RESULT_KEEP_SECONDS, self._outcomes.pop, job_id, None)

        task = asyncio.create_task(collect(), name=f"api-result-{job_id}")
        # Read through `outcome`; this keeps an unread failure from being logged as never retrieved.
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._outcomes[job_id] = task
        return task

    def outcome(self, job_id: str) -> asyncio.Task:
        """The job's result to await; for a job started before this process (Modal keeps results), fetched anew."""
        return self._outcomes.get(job_id) or self._collect(job_id)

    async def owned(self, caller: str, job_id: str) -> Job:
        job = await self.backend.job(job_id)
        if job is None or job.owner.get("api_caller") != caller:
            raise ApiError(ErrorCode.NOT_FOUND, f"No job {job_id!r} of yours.")
        return job

    async def cancel(self, job: Job) -> None:
        await request_cancel(self.backend.store, job.id)
        await self.backend.cancel(job.id)

    async def close(self) -> None:
        for task in self._outcomes.values():
            task.cancel()
