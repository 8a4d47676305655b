"""One setup download at a time: the bot's /setup and `toolbox setup` start it, or follow the one running.

`lock:setup-download` holds the job id of the download in progress; a second
admin (or the CLI) finds it there and follows that job instead of starting
another.
"""

from __future__ import annotations

import asyncio
import time

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.locks import LOCK_STALE_SECONDS, lock_key
from modal_services.state import StateStore

SETUP_LOCK = "setup-download"
SUBMIT_GRACE_SECONDS = 30.0  # a lock without a job id yet is someone mid-submit
ATTACH_TIMEOUT = 15.0


async def _setup_job_live(store: StateStore, value: dict) -> bool:
    from modal_services.jobs import load_job

    job_id = value.get("job_id")
    if not job_id:
        return time.time() - value.get("heartbeat", 0) < SUBMIT_GRACE_SECONDS
    job = await load_job(store, job_id)
    if job is None or job.status.finished:
        return False
    # A running download writes its job record every second or so; silence means its worker died.
    return time.time() - (job.updated_at or job.created_at) < LOCK_STALE_SECONDS


async def active_download(store: StateStore) -> str | None:
    """The job id of the setup download in progress, if any."""
    value = await store.get(lock_key(SETUP_LOCK))
    if value and value.get("job_id") and await _setup_job_live(store, value):
        return value["job_id"]
    return None


async def start_or_attach_download(store: StateStore, submit) -> tuple[str, bool]:
    """(job id, started): the running setup download's id, or a new one from `await submit()`.

    Two admins pressing Download at once: one `put_if_absent` wins and
    submits; the other waits for that job id and follows the same job.
    """
    import uuid

    key = lock_key(SETUP_LOCK)
    deadline = time.monotonic() + ATTACH_TIMEOUT
    while True:
        mine = {"owner": uuid.uuid4().hex, "job_id": None, "heartbeat": time.time()}
        if await store.put_if_absent(key, mine):
            try:
                job = await submit()
            except BaseException:
                await store.pop(key)
                raise
            await store.put(key, {**mine, "job_id": job.id})
            return job.id, True
        current = await store.get(key)
        if current is not None:
            if not await _setup_job_live(store, current):
                await store.pop(key)  # finished or dead: the next round takes it
                continue
            if current.get("job_id"):
                return current["job_id"], False
        if time.monotonic() > deadline:
            raise ToolboxError(ErrorCode.INTERNAL, "Another download is starting but did not report its job; try again.")
        await asyncio.sleep(0.2)
