"""The job API, for any kind (generate, caption, upscale): `POST /jobs` answers `{job_id}` at once;
`GET /jobs/{id}` gives status, progress and, when done, the result; `DELETE /jobs/{id}` cancels."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from bot.api.caller_jobs import ApiJobs
from bot.api.dependencies import Caller, CivitaiBaseDep, JobsDep, LibraryDep
from bot.api.payloads import generate_meta, job_request
from bot.api.responses import error_body, render_result
from bot.api.schema import JobAccepted, JobBody, JobView
from modal_services.errors import ToolboxError
from modal_services.jobs.records import Job, JobStatus

router = APIRouter()


@router.post("/jobs", status_code=202, response_model=JobAccepted)
async def start_job(body: JobBody, caller: Caller, jobs: JobsDep, library: LibraryDep,
                    civitai_api_base: CivitaiBaseDep) -> JobAccepted:
    meta = generate_meta(body) if body.kind == "generate" else {}
    job = await jobs.start(caller, lambda: job_request(library, body, jobs.backend, {"api_caller": caller},
                                                       civitai_api_base, meta), meta)
    return JobAccepted(job_id=job.id)


async def job_view(jobs: ApiJobs, job: Job) -> JobView:
    """A job as its caller sees it: status and progress, its result when done, its error when it failed."""
    view = JobView(job_id=job.id, kind=job.kind, status=job.status.value, progress=job.progress, stage=job.stage,
                   created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at)
    if job.status is JobStatus.DONE:
        try:
            view.result = await render_result(job, await asyncio.shield(jobs.outcome(job.id)))
        except ToolboxError as error:  # e.g. the result is no longer kept
            view.error = error_body(error)
    elif job.error() is not None:
        view.error = error_body(job.error())
    return view


@router.get("/jobs/{job_id}", response_model=JobView, response_model_exclude_none=True)
async def job_status(job_id: str, caller: Caller, jobs: JobsDep) -> JobView:
    return await job_view(jobs, await jobs.owned(caller, job_id))


@router.delete("/jobs/{job_id}", response_model=JobView, response_model_exclude_none=True)
async def cancel_job(job_id: str, caller: Caller, jobs: JobsDep) -> JobView:
    job = await jobs.owned(caller, job_id)
    if not job.status.finished:
        await jobs.cancel(job)
    return await job_view(jobs, await jobs.owned(caller, job_id))
