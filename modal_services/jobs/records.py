"""Job records (`job:<id>`) and the worker-side progress reporter.

A job record is written by whoever runs the job (a Modal container or the
local backend's worker) and read by the bot, which turns it into a progress
reply. Only the worker writes a running job, so a read-modify-write of its own
record races with nobody; the one exception is a reader that finds the worker
gone (`Job.dead`) and marks the job failed, when nobody else will write it.
Readers therefore read through `found_job` / `found_jobs`, which do that.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Callable, TypeVar

from modal_services.env_numbers import env_number
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.state.keys import JOB_PREFIX, cancel_key, forget_job, job_key
from modal_services.state.locks import holder_alive, holder_record
from modal_services.state.store import StateStore

log = logging.getLogger(__name__)

# What an engine calls to say how far it is: (fraction 0..1, stage text).
ProgressFn = Callable[[float, str], None]

T = TypeVar("T")

# Progress reaches the job record at most this often (about 2 writes/s).
PROGRESS_WRITE_INTERVAL = 0.5
# A running job's record is touched at least this often, even with no progress
# (a model loading, a long step), so a silent record means a dead worker.
HEARTBEAT_INTERVAL = 10.0
STALE_AFTER = 90.0
# Finished jobs are removed this long after they end, with every key that belongs to them
# (TOOLBOX_JOB_RETENTION_HOURS): 7 days by default, as long as Modal's Dict keeps an idle entry.
JOB_RETENTION_SETTING = "TOOLBOX_JOB_RETENTION_HOURS"
DEFAULT_JOB_RETENTION_HOURS = 168
# What a job whose runner died reads as, wherever it is found.
DEAD_JOB_MESSAGE = "The process running this job stopped (killed, crashed or restarted); run it again."


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    ERROR = "error"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.ERROR, JobStatus.CANCELLED)


@dataclass
class Job:
    id: str
    kind: str
    status: JobStatus = JobStatus.QUEUED
    progress: float = 0.0
    stage: str = "queued"
    error_code: str | None = None
    error_message: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    updated_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = None
    runner: dict[str, Any] | None = None  # the process running it, or queuing it to run (locks.holder_record)
    # Who asked and where to report: user, guild, channel, message ids.
    owner: dict[str, Any] = field(default_factory=dict)
    # What the bot needs to present the result later (titles, file names), even after a restart.
    meta: dict[str, Any] = field(default_factory=dict)
    # Set by the bot once the result (or error) has been shown to the user.
    delivered: bool = False
    # For kinds whose images are judged: each image's NSFW score and decision (`SafetyReport.to_dict`).
    safety: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return job_key(self.id)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["status"] = self.status.value
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "Job":
        known = {name: record[name] for name in cls.__dataclass_fields__ if name in record}
        known["status"] = JobStatus(known.get("status", JobStatus.QUEUED))
        return cls(**known)

    def dead(self, now: float | None = None) -> bool:
        """An unfinished job nothing will ever finish: the process named as its runner is gone (checked by
        pid when it is on this machine), or, running, its record had no heartbeat for `STALE_AFTER` seconds
        (the only sign a runner elsewhere, a Modal container, can give). A job queued on Modal names no runner
        until a container picks it up: its wait in Modal's queue is no sign of death."""
        if self.status.finished:
            return False
        if self.runner and holder_alive(self.runner) is False:
            return True
        if self.status is not JobStatus.RUNNING:
            return False
        last_sign_of_life = self.heartbeat_at or self.started_at or self.created_at
        return (now or time.time()) - last_sign_of_life > STALE_AFTER

    def error(self) -> ToolboxError | None:
        """The failure a finished job ended with (a cancel counts), or None."""
        if self.status is JobStatus.CANCELLED:
            return ToolboxError(ErrorCode.CANCELLED, self.error_message or "This job was cancelled.")
        if self.status is not JobStatus.ERROR:
            return None
        return ToolboxError(self.error_code or ErrorCode.INTERNAL, self.error_message or "The job failed.")


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


async def create_job(
    store: StateStore,
    kind: str,
    owner: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    job_id: str | None = None,
    runner: dict[str, Any] | None = None,
) -> Job:
    """A queued `job:<id>`; `job_id` is one chosen in advance (slots are claimed under it before the job exists);
    `runner` is the process that will run it when that is known already (`holder_record()` of this one)."""
    job = Job(id=job_id or new_job_id(), kind=kind, owner=dict(owner or {}), meta=dict(meta or {}), runner=runner)
    await store.put(job.key, job.to_dict())
    return job


async def load_job(store: StateStore, job_id: str) -> Job | None:
    """The record as stored (what its runner works on); readers use `found_job`."""
    record = await store.get(job_key(job_id))
    return None if record is None else Job.from_dict(record)


async def mark_dead(store: StateStore, job: Job) -> Job:
    """Fail a job whose runner is gone with `DEAD_JOB_MESSAGE`: nothing else would ever end it."""
    log.warning("job %s (%s): the process running it is gone; marking it failed", job.id, job.kind)
    return await update_job(store, job.id, status=JobStatus.ERROR, stage="error", error_code=ErrorCode.INTERNAL.value,
                            error_message=DEAD_JOB_MESSAGE, finished_at=time.time())


async def fail_if_dead(store: StateStore, job: Job) -> Job:
    """The job as it now stands: failed if it is `dead()`, else as given."""
    return await mark_dead(store, job) if job.dead() else job


async def found_job(store: StateStore, job_id: str) -> Job | None:
    """A job as anyone reading it should see it: one whose runner died reads (and is now stored) as failed."""
    job = await load_job(store, job_id)
    return None if job is None else await fail_if_dead(store, job)


async def found_jobs(store: StateStore) -> list[Job]:
    """Every job record, each as `found_job` gives it: no dead job is ever counted as queued or running."""
    return [await fail_if_dead(store, Job.from_dict(record)) for record in (await store.items(JOB_PREFIX)).values()]


def job_retention_seconds() -> float:
    """How long a finished job is kept: TOOLBOX_JOB_RETENTION_HOURS, at least an hour (a result waits ten minutes
    to be collected) and at most a year; a bad value is INVALID_INPUT naming the setting."""
    return env_number(JOB_RETENTION_SETTING, DEFAULT_JOB_RETENTION_HOURS, minimum=1, maximum=24 * 366) * 3600


async def sweep_finished_jobs(store: StateStore, retention_seconds: float, now: float | None = None) -> int:
    """Remove every job that finished more than `retention_seconds` ago (a dead one counts as finished when it
    is found), with the keys that belong to it; returns how many went. Unfinished jobs are never touched."""
    horizon = (now or time.time()) - retention_seconds
    old = [job for job in await found_jobs(store)
           if job.status.finished and (job.finished_at or job.updated_at or job.created_at) < horizon]
    for job in old:
        await forget_job(store, job.id)
    return len(old)


async def update_job(store: StateStore, job_id: str, **fields: Any) -> Job:
    job = await load_job(store, job_id) or Job(id=job_id, kind=fields.get("kind", "unknown"))
    for name, value in fields.items():
        setattr(job, name, value)
    job.updated_at = time.time()
    await store.put(job.key, job.to_dict())
    return job


async def request_cancel(store: StateStore, job_id: str) -> Job | None:
    """Ask a job to stop: a queued job never starts, a running one stops at its next progress report.

    Returns the job as it stood, or None if there is no such unfinished job.
    """
    job = await load_job(store, job_id)
    if job is None or job.status.finished:
        return None
    await store.put(cancel_key(job_id), time.time())
    if job.status is JobStatus.QUEUED:
        # Shown at once; a worker picking it up meanwhile sees the cancel key and stops.
        await update_job(store, job_id, status=JobStatus.CANCELLED, stage="cancelled",
                         error_code=ErrorCode.CANCELLED.value, error_message="Cancelled before it started.",
                         finished_at=time.time())
    return job


class ProgressReporter:
    """Turns an engine's progress calls into throttled job-record writes.

    Engines run in worker threads and may report hundreds of times a second;
    the record is written at most once per `min_interval` (with the latest
    state), at least once per heartbeat interval, and the final state is
    always written. Each write also checks for a cancel request; the engine's
    next progress call then raises CANCELLED, which stops it between steps.
    """

    def __init__(self, store: StateStore, job_id: str, min_interval: float | None = None):
        self.store = store
        self.job_id = job_id
        self.min_interval = PROGRESS_WRITE_INTERVAL if min_interval is None else min_interval
        self.writes = 0
        self._loop = asyncio.get_running_loop()
        self._latest: tuple[float, str] | None = None
        self._dirty = asyncio.Event()
        self._closing = asyncio.Event()
        self._flusher: asyncio.Task | None = None
        self._cancelled = threading.Event()
        self._stop_message = "Stopped on request."

    def __call__(self, progress: float, stage: str) -> None:
        """Thread-safe: callable from the engine's worker thread."""
        if self._cancelled.is_set():
            raise ToolboxError(ErrorCode.CANCELLED, self._stop_message)
        self._loop.call_soon_threadsafe(self._set, progress, stage)

    def _set(self, progress: float, stage: str) -> None:
        self._latest = (min(max(float(progress), 0.0), 1.0), stage)
        self._dirty.set()

    def stop_engine(self, message: str) -> None:
        """Make the engine's next progress call raise CANCELLED, with no store round trip (the loop may be closing)."""
        self._stop_message = message
        self._cancelled.set()

    async def cancel_requested(self) -> bool:
        return await self.store.contains(cancel_key(self.job_id))

    async def start(self) -> None:
        now = time.time()
        await self._write(status=JobStatus.RUNNING, started_at=now, heartbeat_at=now, stage="starting",
                          runner=holder_record())
        self._flusher = asyncio.create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while not self._closing.is_set():
            try:
                await asyncio.wait_for(self._dirty.wait(), timeout=HEARTBEAT_INTERVAL)
            except asyncio.TimeoutError:
                pass  # nothing new: the write below is a heartbeat
            self._dirty.clear()
            if self._closing.is_set():
                return
            if await self.cancel_requested():
                self._cancelled.set()
            fields: dict[str, Any] = {"heartbeat_at": time.time()}
            if self._latest is not None:
                fields["progress"], fields["stage"] = self._latest
            await self._write(**fields)
            try:
                await asyncio.wait_for(self._closing.wait(), timeout=self.min_interval)
            except asyncio.TimeoutError:
                pass

    async def stop(self) -> None:
        """Stop writing. An in-flight write is let finish rather than cancelled,
        so that it cannot land after (and overwrite) a final state."""
        self._closing.set()
        self._dirty.set()
        if self._flusher is not None:
            await self._flusher

    async def _write(self, **fields: Any) -> None:
        self.writes += 1
        await update_job(self.store, self.job_id, **fields)

    async def succeed(self, **fields: Any) -> None:
        """The final write, with `fields` the job's record keeps of its result."""
        await self.stop()
        await self._write(status=JobStatus.DONE, progress=1.0, stage="done", finished_at=time.time(), **fields)
        await self.store.pop(cancel_key(self.job_id))

    async def fail(self, error: ToolboxError) -> None:
        await self.stop()
        await self.store.pop(cancel_key(self.job_id))
        status = JobStatus.CANCELLED if error.code is ErrorCode.CANCELLED else JobStatus.ERROR
        await self._write(
            status=status,
            stage=status.value,
            error_code=error.code.value,
            error_message=error.message,
            finished_at=time.time(),
        )


async def run_job(
    store: StateStore,
    job_id: str,
    work: Callable[[ProgressFn], T],
    executor=None,
    recorded: Callable[[T], dict[str, Any]] | None = None,
) -> T:
    """Run blocking `work(progress)` in a thread, keeping `job:<id>` up to date; `recorded(result)`
    is what the record keeps of the result, written with the final state (never after it).

    Any failure ends as a `ToolboxError` both in the record and raised to the
    caller; an unexpected exception is logged in full here and reported to the
    user without its internals.
    """
    reporter = ProgressReporter(store, job_id)
    if await reporter.cancel_requested():
        error = ToolboxError(ErrorCode.CANCELLED, "Cancelled before it started.")
        await reporter.fail(error)
        raise error
    await reporter.start()
    try:
        result = await asyncio.get_running_loop().run_in_executor(executor, work, reporter)
    except ToolboxError as error:
        await reporter.fail(error)
        raise
    except asyncio.CancelledError:
        # Our runner is going away (shutdown, Ctrl-C): the engine stops at its next progress call instead
        # of holding the process open; no more writes, the verdict is left to recovery.
        reporter.stop_engine("Stopped: the program running it is shutting down.")
        await reporter.stop()
        raise
    except Exception as exc:
        log.exception("job %s failed", job_id)
        error = ToolboxError(ErrorCode.INTERNAL, "Something went wrong while running this job.")
        await reporter.fail(error)
        raise error from exc
    await reporter.succeed(**(recorded(result) if recorded else {}))
    return result
