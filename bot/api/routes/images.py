"""`POST /generate-image`: the SDXL worker contract, answered with the images themselves.

It waits for the images and returns them base64-encoded; for work longer
than one HTTP request may last (Modal cuts web requests at 150 s), callers
use the job API instead.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter

from bot.api.dependencies import Caller, CivitaiBaseDep, JobsDep, LibraryDep, SyncLimitDep
from bot.api.payloads import generate_job_request, generate_meta
from bot.api.responses import WITHHELD_STATUS, ApiError, error_responses, render_result
from bot.api.schema import GenerateImageRequest, GenerateImageResponse
from modal_services.errors import ErrorCode

# The wait lasts this much past the request's own timeout, so that the
# worker's TIMEOUT (which says where it stopped) arrives before ours.
TIMEOUT_GRACE_SECONDS = 5

router = APIRouter()


def _wait_seconds(body: GenerateImageRequest, sync_limit_seconds: float | None) -> float:
    """How long the call waits for its images: refused at once when the request's timeout is longer than
    one HTTP request may last here."""
    if sync_limit_seconds is not None and body.timeout > sync_limit_seconds:
        raise ApiError(ErrorCode.INVALID_INPUT,
                       f"A timeout above {sync_limit_seconds:g} s is longer than one HTTP request may last here: "
                       "use POST /jobs, then poll GET /jobs/{id}.")
    wait = body.timeout + TIMEOUT_GRACE_SECONDS
    return wait if sync_limit_seconds is None else min(wait, sync_limit_seconds)


@router.post("/generate-image", response_model=GenerateImageResponse, response_model_exclude_unset=True,
             responses=error_responses(WITHHELD_STATUS))
async def generate_image(body: GenerateImageRequest, caller: Caller, jobs: JobsDep, library: LibraryDep,
                         sync_limit_seconds: SyncLimitDep, civitai_api_base: CivitaiBaseDep) -> dict[str, Any]:
    wait = _wait_seconds(body, sync_limit_seconds)
    meta = generate_meta(body)
    job = await jobs.start(caller, lambda: generate_job_request(library, body, civitai_api_base, meta), meta)
    try:
        result = await asyncio.wait_for(asyncio.shield(jobs.outcome(job.id)), wait)
    except asyncio.TimeoutError:
        await jobs.cancel(job)
        raise ApiError(ErrorCode.TIMEOUT, f"No image within {wait:g} s; the job was cancelled.") from None
    return await render_result(job, result)
