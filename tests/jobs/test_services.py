"""run_service_job: the one path every worker (Modal class or local backend) runs a job through."""

from __future__ import annotations

import time

from typing import ClassVar

from modal_services.jobs.requests import JobRequest
from modal_services.jobs.records import JobStatus, create_job, load_job
from modal_services.state.keys import preview_key
from modal_services.engines.sdxl.previews import decode_preview
from modal_services.services import ServiceSpec, run_service_job
from modal_services.state.store import SqliteStore


class DemoRequest(JobRequest):
    kind: ClassVar[str] = "demo"
    size: int


class PlainRequest(JobRequest):
    kind: ClassVar[str] = "plain"
    value: int


class PreviewingEngine:
    loaded = False

    def __init__(self, store):
        self.store = store
        self.seen_while_running = []

    def load(self):
        self.loaded = True

    def work(self, request: DemoRequest, progress, preview):
        for step in range(3):
            progress(step / 3, "working")
            preview(bytes([step]) * request.size)
            time.sleep(0.05)
        return "finished"


async def test_previews_are_kept_while_the_job_runs_and_removed_after(tmp_path):
    store = SqliteStore(tmp_path / "state.sqlite3")
    engine = PreviewingEngine(store)
    spec = ServiceSpec(DemoRequest, "DemoService", lambda: PreviewingEngine, lambda: PreviewingEngine.work, previews=True)
    job = await create_job(store, "demo")
    seen = []
    original = store.put

    async def spying_put(key, value):
        if key == preview_key(job.id):
            seen.append(decode_preview(value))
        await original(key, value)

    store.put = spying_put
    assert await run_service_job(store, engine, spec, job.id, {"size": 10}) == "finished"
    assert engine.loaded and seen and all(len(jpeg) == 10 for jpeg in seen)
    assert not await store.contains(preview_key(job.id))  # nothing left behind
    assert (await load_job(store, job.id)).status is JobStatus.DONE
    await store.close()


async def test_engines_without_previews_get_no_preview_argument(tmp_path):
    store = SqliteStore(tmp_path / "state.sqlite3")

    class Plain:
        loaded = True

        def load(self):
            pass

        def work(self, request: PlainRequest, progress):
            return request.value * 2

    spec = ServiceSpec(PlainRequest, "PlainService", lambda: Plain, lambda: Plain.work)
    job = await create_job(store, "plain")
    assert await run_service_job(store, Plain(), spec, job.id, {"value": 21}) == 42
    await store.close()
