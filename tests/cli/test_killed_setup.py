"""A `toolbox setup` killed with SIGKILL mid-download, then run again: no download is left counted as running,
and the killed one reads as failed with a message."""

from __future__ import annotations

import asyncio
import json

from bot.cli import main
from bot.settings import Settings
from modal_services.jobs.records import DEAD_JOB_MESSAGE, Job, JobStatus
from modal_services.state.store import SqliteStore
from tests.processes import setup_mid_download


def status_document(capsys) -> dict:
    assert main(["status", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


async def stored_jobs() -> list[Job]:
    """The job records as stored, read without settling anything."""
    store = SqliteStore(Settings.load().state_path)
    try:
        return [Job.from_dict(record) for record in (await store.items("job:")).values()]
    finally:
        await store.close()


def test_a_setup_killed_mid_download_and_run_again_leaves_no_download_running(hub, capsys, tmp_path):
    process = setup_mid_download(hub, tmp_path)
    try:
        assert status_document(capsys)["jobs"] == {"download": {"queued": 0, "running": 1}}  # alive: counted
        process.kill()
    finally:
        process.kill()
        process.communicate(timeout=10)  # reaped, as a shell reaps what it started
    [killed] = asyncio.run(stored_jobs())
    assert killed.kind == "download" and killed.status is JobStatus.RUNNING  # what the kill left

    assert main(["setup", "--only", "sdxl-vae"]) == 0
    out, err = capsys.readouterr()
    assert "already running" not in err and "Downloaded: sdxl-vae." in out
    jobs = {job.id: job for job in asyncio.run(stored_jobs())}
    assert jobs[killed.id].status is JobStatus.ERROR and jobs[killed.id].error_message == DEAD_JOB_MESSAGE
    assert jobs[killed.id].finished_at is not None
    assert [job.status for job_id, job in jobs.items() if job_id != killed.id] == [JobStatus.DONE]

    document = status_document(capsys)
    assert document["jobs"] == {} and document["active_download"] is None
    assert {model["key"]: model["state"] for model in document["models"]}["sdxl-vae"] == "present"
