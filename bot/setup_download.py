"""One setup download at a time: the bot's /setup and `toolbox setup` start it, or follow the one running.

`lock:setup-download` holds the job id of the download in progress; a second
admin (or the CLI) finds it there and follows that job instead of starting
another.
"""

from __future__ import annotations

import asyncio
import time

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.records import found_job
from modal_services.state.keys import SETUP_DOWNLOAD_LOCK, lock_key
from modal_services.state.locks import holder_alive, holder_record
from modal_services.state.store import StateStore

SUBMIT_GRACE_SECONDS = 30.0  # a lock without a job id yet is someone mid-submit
ATTACH_TIMEOUT = 15.0


async def _setup_job_live(store: StateStore, value: dict) -> bool:
    """Whether the download the lock names can still finish: a dead one (`Job.dead`) is failed and let go
    at once, for the next setup to take over."""
    job_id = value.get("job_id")
    if not job_id:
        return time.time() - value.get("heartbeat", 0) < SUBMIT_GRACE_SECONDS and holder_alive(value) is not False
    job = await found_job(store, job_id)
    return job is not None and not job.status.finished


async def checked_states(settings, store: StateStore, entries, hashes: bool = False) -> list:
    """Each base model's state, a manifest believed only with its files: the local backend sees the volume
    (files and sizes; with `hashes`, the registry's published sha256 too), the Modal one trusts what the
    worker verified."""
    import asyncio

    from modal_services.base_models.manifests import check_files
    from modal_services.base_models.states import describe_state
    from modal_services.state.keys import download_key, manifest_key

    states = []
    for entry in entries:
        manifest = await store.get(manifest_key(entry.key))
        problems = None
        if manifest and settings.backend == "local":
            problems = await asyncio.to_thread(check_files, settings.models_dir / entry.folder, manifest,
                                               published=entry.published if hashes else None)
        states.append(describe_state(entry, manifest, await store.get(download_key(entry.key)), problems or None))
    return states


async def active_download(store: StateStore) -> str | None:
    """The job id of the setup download in progress, if any."""
    value = await store.get(lock_key(SETUP_DOWNLOAD_LOCK))
    if value and value.get("job_id") and await _setup_job_live(store, value):
        return value["job_id"]
    return None


async def start_or_attach_download(store: StateStore, submit) -> tuple[str, bool]:
    """(job id, started): the running setup download's id, or a new one from `await submit()`.

    Two admins pressing Download at once: one `put_if_absent` wins and
    submits; the other waits for that job id and follows the same job.
    """
    import uuid

    key = lock_key(SETUP_DOWNLOAD_LOCK)
    deadline = time.monotonic() + ATTACH_TIMEOUT
    while True:
        mine = {"owner": uuid.uuid4().hex, "job_id": None, "heartbeat": time.time(), **holder_record()}
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
