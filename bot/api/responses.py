"""What the API answers: error bodies with their HTTP statuses, and finished jobs' results as JSON.

Errors are `{error, error_code, details?, retry_after?}`: 400 invalid input,
401 missing or wrong token, 404 unknown job, 409 cancelled, 413 body too
large, 422 every image withheld by the safety check, 429 (with `Retry-After`)
when the caller already has its cap of jobs in flight, 503 models missing or
backend down, 504 timeout, 500 otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel

from bot.api.schema import JOB_BODIES, ErrorResponse, GenerateImageRequest
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.records import Job
from modal_services.jobs.validation import describe_problem
from modal_services.remedies import FrontEnd, render
from modal_services.safety.judge import Reason, SafetyReport
from modal_services.safety.real_people import REAL_PERSON_WITHHELD

STATUS_FOR_CODE = {
    ErrorCode.INVALID_INPUT: 400,
    ErrorCode.INVALID_PROMPT: 400,
    # A LoRA of the other model's family: the request's mistake.
    ErrorCode.INCOMPATIBLE_MODEL: 400,
    # A remix of an image CivitAI does not show: the body names it.
    ErrorCode.CIVITAI_NOT_FOUND: 400,
    ErrorCode.PERMISSION_DENIED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CANCELLED: 409,
    # Understood and run, but nothing may be given back: not the request's form (400) nor the server's fault (5xx).
    ErrorCode.CONTENT_WITHHELD: 422,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.MODELS_MISSING: 503,
    ErrorCode.BACKEND_UNAVAILABLE: 503,
    # A remix's image could not be read: CivitAI is down, or refuses the deployment's token.
    ErrorCode.CIVITAI_UNAVAILABLE: 503,
    ErrorCode.CIVITAI_AUTH_REQUIRED: 503,
    ErrorCode.TIMEOUT: 504,
}
# The statuses every endpoint may answer with an ErrorResponse, as /openapi.json describes them.
ERROR_STATUSES = {
    400: "INVALID_INPUT, INVALID_PROMPT or INCOMPATIBLE_MODEL: the body breaks a limit or a rule (a body the schema "
         "refuses is answered here too, never with 422), before any job exists; CIVITAI_NOT_FOUND: no such image "
         "to remix",
    401: "PERMISSION_DENIED: no token, or the wrong one",
    404: "NOT_FOUND: no such job of yours, or no such path",
    413: "INVALID_INPUT: the body is larger than the limit",
    429: "RATE_LIMITED: you already have your cap of jobs in flight; Retry-After says when to try again",
    500: "The job failed (GENERATION_FAILED, CUDA_OOM, LORA_DOWNLOAD_FAILED, ...) or something went wrong",
    503: "MODELS_MISSING or BACKEND_UNAVAILABLE; CIVITAI_UNAVAILABLE or CIVITAI_AUTH_REQUIRED: a remix's image "
         "could not be read from CivitAI",
    504: "TIMEOUT",
}
# Only where a finished job's images are answered (POST /generate-image).
WITHHELD_STATUS = {422: "CONTENT_WITHHELD: the safety check withheld every image; `error` says why and how to get "
                        "them where one can, `details` the seeds and scores"}


def error_responses(statuses: dict[int, str]) -> dict[int, dict[str, Any]]:
    """Statuses answered with an ErrorResponse, as FastAPI's `responses=` publishes them in /openapi.json."""
    return {status: {"model": ErrorResponse, "description": description} for status, description in statuses.items()}


class ApiError(ToolboxError):
    """A ToolboxError with what an HTTP answer adds: details, and how long to wait before retrying."""

    def __init__(self, code: ErrorCode, message: str, details: str | None = None, retry_after: int | None = None):
        super().__init__(code, message)
        self.details = details
        self.retry_after = retry_after


def error_body(error: ToolboxError) -> ErrorResponse:
    """An error as a job view shows it: message, code and details (no HTTP status, no retry)."""
    return ErrorResponse(error=render(error.message, FrontEnd.API), error_code=error.code.value,
                         details=getattr(error, "details", None))


def error_response(error: ToolboxError, status: int | None = None) -> JSONResponse:
    """The error as an HTTP answer: the status its code maps to (unless given), `Retry-After` and
    `WWW-Authenticate` where they apply."""
    body = ErrorResponse(error=render(error.message, FrontEnd.API), error_code=error.code.value,
                         details=getattr(error, "details", None), retry_after=getattr(error, "retry_after", None))
    headers = {}
    if body.retry_after is not None:
        headers["Retry-After"] = str(body.retry_after)
    if error.code is ErrorCode.PERMISSION_DENIED:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body.model_dump(exclude_none=True), status or STATUS_FOR_CODE.get(error.code, 500), headers)


def _located(location: tuple) -> tuple[type[BaseModel], tuple]:
    """The body model a problem is in (a /jobs request's by its kind tag, else /generate-image's) and where
    in it, without FastAPI's "body"."""
    path = location[1:]
    if path[:1] and path[0] in JOB_BODIES:
        return JOB_BODIES[path[0]], path[1:]
    return GenerateImageRequest, path


def _problem_at(path: tuple, sentence: str) -> str:
    """A problem as a client reads it: the body field it is about (`loras.0.weight`), then what is wrong."""
    return f"{'.'.join(str(part) for part in path)}: {sentence}" if path else sentence


def validation_error(exc: RequestValidationError) -> ApiError:
    """pydantic's complaints about a body, each in the words every front end uses for that field (the
    first as `error`, all of them in `details`)."""
    located = [_located(problem["loc"]) for problem in exc.errors()]
    problems = [_problem_at(path, describe_problem({**problem, "loc": path}, model))
                for (model, path), problem in zip(located, exc.errors())]
    # As the request classes tell them: a generate request's prompts are INVALID_PROMPT, an upscale's words INVALID_INPUT.
    about_prompt = any(issubclass(model, GenerateImageRequest) and path[:1] in (("prompt",), ("negative_prompt",))
                       for model, path in located)
    code = ErrorCode.INVALID_PROMPT if about_prompt else ErrorCode.INVALID_INPUT
    return ApiError(code, problems[0], details=" ".join(problems) if len(problems) > 1 else None)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def safety_body(report: SafetyReport) -> dict[str, Any]:
    """How the images were judged, with a note saying what was withheld and how to get it."""
    count, withheld = len(report.images), report.withheld_for(Reason.NSFW)
    minors, real = report.withheld_for(Reason.DRAWN_MINOR), report.withheld_for(Reason.REAL_PHOTO)
    if minors:
        note = (f"{len(minors)} of {count} image{'s' if count > 1 else ''} withheld: drawn minors in a sexual "
                "context are withheld whatever safety_check says.")
    elif real:
        note = f"{len(real)} of {count} {REAL_PERSON_WITHHELD}"
    elif not report.checked:
        note = "Not checked: the request said safety_check: false."
    elif withheld:
        note = (f"{len(withheld)} of {count} image{'s' if count > 1 else ''} withheld as NSFW (score at or above "
                f"{report.threshold:g}, or rated explicit); send safety_check: false to receive them unchecked.")
    else:
        note = "Checked: nothing was flagged."
    return {"checked": report.checked, "nsfw_scores": [image.nsfw_score for image in report.images],
            "withheld": report.withheld, "threshold": report.threshold, "note": note}


def all_withheld(report: SafetyReport, seeds: list[int] = ()) -> ApiError:
    """CONTENT_WITHHELD for a result with no image left: the note says why and how to get them (where one
    can), the details what was judged, with the seeds (of generated images) to make them again."""
    scores = ", ".join("unchecked" if image.nsfw_score is None else f"{image.nsfw_score:.3f}" for image in report.images)
    details = f"nsfw_scores: {scores}; threshold: {report.threshold:g}"
    if seeds:
        details = f"seeds_used: {', '.join(map(str, seeds))}; {details}"
    return ApiError(ErrorCode.CONTENT_WITHHELD, safety_body(report)["note"], details=details)


def generate_response(result: dict[str, Any], lora_scale: float | None, notes: list[str] = ()) -> dict[str, Any]:
    """The generate job's result as the worker contract's response body (`images_base64` only when several),
    with each image's NSFW score; a withheld image is null in `images_base64`. `image_base64` is the first
    image kept, and `seed_used` and `nsfw_score` are that image's; with none kept, CONTENT_WITHHELD. `notes`:
    the job's own (a remix's differences), before the result's."""
    report = SafetyReport.from_dict(result["safety"])
    images = [None if png is None else _b64(png) for png in result["images"]]
    shown = next((index for index, image in enumerate(images) if image is not None), None)
    if shown is None:
        raise all_withheld(report, result["seeds"])
    body = {
        "image_base64": images[shown],
        "image_size": [result["width"], result["height"]],
        "generation_time_seconds": round(result["generation_time_seconds"], 3),
        "model_info": {"base_model": result["checkpoint"],
                       "lora_applied": bool(result["loras"]),
                       # The contract names one LoRA's scale: the request's own LoRA's, else the first one's.
                       "lora_scale": lora_scale if lora_scale is not None else
                       (result["loras"][0]["weight"] if result["loras"] else None),
                       "loras": result["loras"]},
        "metadata": {"seed_used": result["seeds"][shown], "actual_steps": result["steps"],
                     "actual_cfg": result["cfg"], "seeds_used": result["seeds"],
                     # SDXL's: Flux has no sampler choice.
                     **({"sampler": result["sampler"]} if "sampler" in result else {})},
        "nsfw_score": report.images[shown].nsfw_score,
        "safety": safety_body(report),
    }
    if len(images) > 1:
        body["images_base64"] = images
    if result.get("face"):
        body["face"] = result["face"]
    if notes or result.get("notes"):
        body["notes"] = [*notes, *(result.get("notes") or [])]
    return body


def _png_size(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as image:
        return image.size


async def render_result(job: Job, result: Any) -> dict[str, Any]:
    """A finished job's result as JSON; image encoding runs in a thread (an upscale is tens of MB)."""
    if job.kind in ("generate", "flux_generate"):
        return await asyncio.to_thread(generate_response, result, job.meta.get("lora_scale"), job.meta.get("notes") or [])
    if job.kind == "caption":
        return {"captions": result}
    if job.kind == "upscale":
        report, png = SafetyReport.from_dict(result["safety"]), result["image"]
        if png is None:
            raise all_withheld(report)
        return {"image_base64": await asyncio.to_thread(_b64, png), "image_size": await asyncio.to_thread(_png_size, png),
                "nsfw_score": report.images[0].nsfw_score, "safety": safety_body(report)}
    return result
