"""The HTTP API: the bot's jobs over HTTP (FastAPI), on the same backend seam.

- `POST /generate-image`: the SDXL worker contract. Waits for the images and
  returns them base64-encoded; for work longer than one HTTP request may
  last (Modal cuts web requests at 150 s), use the job API instead.
- `POST /jobs` (any kind: generate, caption, upscale) → `{job_id}` at once;
  `GET /jobs/{id}` for status, progress and, when done, the result;
  `DELETE /jobs/{id}` cancels.
- `GET /health`: base models installed, services loaded, versions. No secrets,
  no token needed.

Errors are `{error, error_code, details?, retry_after?}`: 400 invalid input,
401 missing or wrong token, 404 unknown job, 413 body too large, 429 (with
`Retry-After`) when the caller already has its cap of jobs in flight, 503
models missing or backend down, 504 timeout, 500 otherwise.

Every request but /health carries `Authorization: Bearer <TOOLBOX_API_TOKEN>`;
the comparison takes constant time. A caller's jobs are its own: a job
started by the bot or by another token is "not found" here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import logging
import time
from collections import Counter
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from bot.api_schema import (
    JOB_KINDS,
    MAX_BODY_BYTES,
    CaptionJob,
    ErrorResponse,
    GenerateImageRequest,
    GenerateImageResponse,
    JobAccepted,
    JobBody,
    JobView,
    UpscaleJob,
)
from bot.backend import RESULT_KEEP_SECONDS, Backend
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.imaging import decode_image, encode_png, shrunk_png
from modal_services.jobs.requests import (
    REFERENCE_MAX_SIDE,
    CaptionRequest,
    FluxGenerateRequest,
    GenerateRequest,
    JobRequest,
    SafetyContext,
    UpscaleRequest,
)
from modal_services.jobs.records import Job, JobStatus, request_cancel
from modal_services.library.entries import Library
from modal_services.safety.judge import SafetyReport

log = logging.getLogger(__name__)

API_VERSION = "1"
# What a refused caller is told to wait: about one short job.
RETRY_AFTER_SECONDS = 10
# /generate-image waits this much past the request's own timeout, so that the
# worker's TIMEOUT (which says where it stopped) arrives before ours.
TIMEOUT_GRACE_SECONDS = 5
# /health is computed at most this often: load balancers and dashboards poll it.
HEALTH_TTL_SECONDS = 2.0

STATUS_FOR_CODE = {
    ErrorCode.INVALID_INPUT: 400,
    ErrorCode.INVALID_PROMPT: 400,
    # A LoRA of the other model's family: the request's mistake.
    ErrorCode.INCOMPATIBLE_MODEL: 400,
    ErrorCode.PERMISSION_DENIED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CANCELLED: 409,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.MODELS_MISSING: 503,
    ErrorCode.BACKEND_UNAVAILABLE: 503,
    ErrorCode.TIMEOUT: 504,
}


class ApiError(ToolboxError):
    """A ToolboxError with what an HTTP answer adds: details, and how long to wait before retrying."""

    def __init__(self, code: ErrorCode, message: str, details: str | None = None, retry_after: int | None = None):
        super().__init__(code, message)
        self.details = details
        self.retry_after = retry_after


def error_response(error: ToolboxError, status: int | None = None) -> JSONResponse:
    body = ErrorResponse(error=error.message, error_code=error.code.value,
                         details=getattr(error, "details", None), retry_after=getattr(error, "retry_after", None))
    headers = {}
    if body.retry_after is not None:
        headers["Retry-After"] = str(body.retry_after)
    if error.code is ErrorCode.PERMISSION_DENIED:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body.model_dump(exclude_none=True), status or STATUS_FOR_CODE.get(error.code, 500), headers)


class BodyLimit:
    """Refuses request bodies over `max_bytes` with the API's error body (413): at once when the
    Content-Length says so, else as soon as what arrives passes the limit. (Starlette's own limit
    answers in plain text, outside this API's error shape.)"""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def too_large(self) -> HTTPException:
        return HTTPException(413, f"The request body is larger than {self.max_bytes // 2**20} MB.")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(ToolboxError(ErrorCode.INVALID_INPUT, self.too_large().detail),
                                        status=413)(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException passes through FastAPI's body reading to the error handler.
                    raise self.too_large()
            return message

        await self.app(scope, counted_receive, send)


def _field_path(location: tuple) -> tuple:
    """Where in the body a problem is, without FastAPI's "body" and a /jobs request's kind tag."""
    path = location[1:]
    return path[1:] if path[:1] and path[0] in JOB_KINDS else path


def validation_error(exc: RequestValidationError) -> ApiError:
    """pydantic's complaints as one line for `error`, every one in `details`."""
    paths = [_field_path(problem["loc"]) for problem in exc.errors()]
    problems = [f"{'.'.join(str(part) for part in path) or 'body'}: {problem['msg']}"
                for path, problem in zip(paths, exc.errors())]
    about_prompt = any(path[:1] in (("prompt",), ("negative_prompt",)) for path in paths)
    code = ErrorCode.INVALID_PROMPT if about_prompt else ErrorCode.INVALID_INPUT
    return ApiError(code, f"Invalid request: {problems[0]}", details="; ".join(problems) if len(problems) > 1 else None)


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

    def held(self, caller: str) -> int:
        return self._held[caller]


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

    async def start(self, caller: str, request: JobRequest, meta: dict[str, Any]) -> Job:
        self.cap.reserve(caller)
        try:
            job = await self.backend.submit(request, owner={"api_caller": caller}, meta=meta)
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


def caller_id(token: str) -> str:
    """Who a token is, for job ownership and caps, without keeping the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def safety_body(report: SafetyReport) -> dict[str, Any]:
    """How the images were judged, with a note saying what was withheld and how to get it."""
    count, withheld = len(report.images), report.withheld
    if not report.checked:
        note = "Not checked: the request said safety_check: false."
    elif withheld:
        note = (f"{len(withheld)} of {count} image{'s' if count > 1 else ''} withheld as NSFW (score at or above "
                f"{report.threshold:g}); send safety_check: false to receive them unchecked.")
    else:
        note = "Checked: nothing was flagged."
    return {"checked": report.checked, "nsfw_scores": [image.nsfw_score for image in report.images],
            "withheld": withheld, "threshold": report.threshold, "note": note}


def api_safety(safety_check: bool) -> SafetyContext:
    """An API caller's images are judged as for a channel that is not age-restricted, unless it opts out."""
    return SafetyContext(policy="block" if safety_check else "off")


def generate_response(result: dict[str, Any], lora_scale: float | None) -> dict[str, Any]:
    """The generate job's result as the worker contract's response body (`images_base64` only when several),
    with each image's NSFW score; a withheld image is null."""
    report = SafetyReport.from_dict(result["safety"])
    images = [None if png is None else _b64(png) for png in result["images"]]
    body = {
        "image_base64": images[0],
        "image_size": [result["width"], result["height"]],
        "generation_time_seconds": round(result["generation_time_seconds"], 3),
        "model_info": {"base_model": result["checkpoint"],
                       "lora_applied": bool(result["loras"]),
                       # The contract names one LoRA's scale: the request's own LoRA's, else the first one's.
                       "lora_scale": lora_scale if lora_scale is not None else
                       (result["loras"][0]["weight"] if result["loras"] else None),
                       "loras": result["loras"]},
        "metadata": {"seed_used": result["seeds"][0], "actual_steps": result["steps"], "actual_cfg": result["cfg"],
                     "seeds_used": result["seeds"]},
        "nsfw_score": report.images[0].nsfw_score,
        "safety": safety_body(report),
    }
    if len(images) > 1:
        body["images_base64"] = images
    if result.get("face"):
        body["face"] = result["face"]
    return body


def _png_size(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as image:
        return image.size


async def render_result(job: Job, result: Any) -> dict[str, Any]:
    """A finished job's result as JSON; image encoding runs in a thread (an upscale is tens of MB)."""
    if job.kind in ("generate", "flux_generate"):
        return await asyncio.to_thread(generate_response, result, job.meta.get("lora_scale"))
    if job.kind == "caption":
        return {"captions": result}
    if job.kind == "upscale":
        report, png = SafetyReport.from_dict(result["safety"]), result["image"]
        return {"image_base64": None if png is None else await asyncio.to_thread(_b64, png),
                "image_size": None if png is None else await asyncio.to_thread(_png_size, png),
                "nsfw_score": report.images[0].nsfw_score, "safety": safety_body(report)}
    return result


def _clean_png(data: bytes, max_pixels: int | None = None) -> tuple[bytes, tuple[int, int]]:
    """An uploaded image decoded (bad files refused) and re-encoded as a plain PNG, as the bot does with attachments."""
    image = decode_image(data, **({"max_pixels": max_pixels} if max_pixels else {})).image
    return encode_png(image), image.size


class Payloads:
    """From API requests to checked job requests: images decoded, library names resolved."""

    def __init__(self, library: Library):
        self.library = library

    async def generate(self, request: GenerateImageRequest) -> GenerateRequest | FluxGenerateRequest:
        from bot.generate_requests import FACE_NEEDS_SDXL, flux_generate_request, generate_model, generate_request

        if generate_model(request.model) == "flux":
            if request.lora_url is not None:
                raise ToolboxError(ErrorCode.INVALID_INPUT, "lora_url is for SDXL: Flux takes LoRAs from the library (`loras`).")
            if request.reference_image_base64 is not None or request.pose_image_base64 is not None:
                raise ToolboxError(ErrorCode.INVALID_INPUT, FACE_NEEDS_SDXL)
            # Only what the client gave: Flux's own defaults (guidance 3.5) fill in the rest.
            choices = request.model_dump(exclude_unset=True, exclude={"kind", "model", "loras", "lora_scale", "lora_sha256",
                                                                      "safety_check"})
            choices["safety"] = api_safety(request.safety_check)
            job_request, _ = await flux_generate_request(self.library, choices, [lora.model_dump() for lora in request.loras])
            return job_request
        choices = request.model_dump(exclude={"kind", "model", "loras", "safety_check", "reference_image_base64",
                                               "pose_image_base64"})
        choices["safety"] = api_safety(request.safety_check)
        if request.lora_url is not None:
            choices["lora_url"] = str(request.lora_url)
        for field, photo, name in (("face_image", request.reference_image_base64, "reference_image_base64"),
                                   ("pose_image", request.pose_image_base64, "pose_image_base64")):
            if photo is not None:
                choices[field] = await asyncio.to_thread(shrunk_png, photo, REFERENCE_MAX_SIDE, name)
        job_request, _ = await generate_request(self.library, choices, [lora.model_dump() for lora in request.loras])
        return job_request

    async def caption(self, request: CaptionJob) -> CaptionRequest:
        images = [(await asyncio.to_thread(_clean_png, data))[0] for data in request.images_base64]
        return CaptionRequest.parse({"images": images, "style": request.style, "question": request.question})

    async def upscale(self, request: UpscaleJob) -> UpscaleRequest:
        from bot.upscale_requests import upscale_request
        from modal_services.engines.sdxl.limits import DEFAULT_MAX_INPUT_PIXELS, check_upscale_size

        png, size = await asyncio.to_thread(_clean_png, request.image_base64, DEFAULT_MAX_INPUT_PIXELS)
        choices = request.model_dump(exclude={"kind", "image_base64", "loras", "safety_check"})
        choices["safety"] = api_safety(request.safety_check)
        job_request, _ = await upscale_request(self.library, png, choices, [lora.model_dump() for lora in request.loras])
        check_upscale_size(*size, job_request.scale)
        return job_request


async def health_document(backend: Backend) -> dict[str, Any]:
    from modal_services.base_models.states import model_states
    from modal_services.base_models.registry import BASE_MODELS

    states = await model_states(backend.store, BASE_MODELS.values())
    return {
        "status": "ok",
        "api_version": API_VERSION,
        "versions": {name: metadata.version(name) for name in ("ai-toolbox", "fastapi", "pydantic")},
        "backend": type(backend).__name__,
        "models": {state.key: {"name": state.name, "installed": state.state == "present", "state": state.state}
                   for state in states},
        "services": await backend.service_status(),
    }


class HealthCache:
    """The /health document, encoded, refreshed at most every HEALTH_TTL_SECONDS in the background:
    probes get the last document at once and never wait on the store (only the very first does)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self._body: bytes | None = None
        self._at = float("-inf")
        self._refresh: asyncio.Task | None = None

    async def body(self) -> bytes:
        if time.monotonic() - self._at > HEALTH_TTL_SECONDS and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.create_task(self._compute(), name="api-health")
        if self._body is None:
            await asyncio.shield(self._refresh)
        return self._body

    async def _compute(self) -> None:
        try:
            self._body = json.dumps(await health_document(self.backend)).encode()
        except Exception:
            if self._body is None:
                raise
            log.warning("health refresh failed; serving the last document", exc_info=True)
        self._at = time.monotonic()


def create_app(
    backend: Backend,
    library: Library,
    token: str | None,
    concurrency: int,
    sync_limit_seconds: float | None = None,
) -> FastAPI:
    """The API over `backend`, with `concurrency` jobs in flight per token.

    `token=None` turns auth off (the caller checks that is allowed: `toolbox serve
    --no-auth` on 127.0.0.1 only). `sync_limit_seconds` bounds how long
    /generate-image may wait (the host's HTTP limit); longer requests are sent to /jobs."""
    jobs = ApiJobs(backend, ConcurrencyCap(concurrency))
    payloads = Payloads(library)
    health_cache = HealthCache(backend)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await jobs.close()
        await backend.close()

    app = FastAPI(title="AI Toolbox", version=API_VERSION, lifespan=lifespan,
                  responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503, 504)})
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    bearer = HTTPBearer(auto_error=False)
    expected = token.encode() if token else None

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        if expected is None:
            return "local"
        if credentials is None:
            raise ApiError(ErrorCode.PERMISSION_DENIED, "Missing token: send Authorization: Bearer <TOOLBOX_API_TOKEN>.")
        if not hmac.compare_digest(credentials.credentials.encode(), expected):
            raise ApiError(ErrorCode.PERMISSION_DENIED, "Wrong token.")
        return caller_id(credentials.credentials)

    @app.exception_handler(ToolboxError)
    async def on_toolbox_error(_: Request, exc: ToolboxError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(HTTPException)
    async def on_http_error(_: Request, exc: HTTPException) -> JSONResponse:
        code = {401: ErrorCode.PERMISSION_DENIED, 404: ErrorCode.NOT_FOUND, 429: ErrorCode.RATE_LIMITED}.get(
            exc.status_code, ErrorCode.INVALID_INPUT if exc.status_code < 500 else ErrorCode.INTERNAL)
        return error_response(ToolboxError(code, str(exc.detail)), status=exc.status_code)

    @app.exception_handler(Exception)
    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("API request failed", exc_info=exc)
        return error_response(ToolboxError(ErrorCode.INTERNAL, "Something went wrong on the server."))

    @app.get("/health")
    async def health() -> Response:
        return Response(await health_cache.body(), media_type="application/json")

    @app.post("/generate-image", response_model=GenerateImageResponse, response_model_exclude_unset=True)
    async def generate_image(request: GenerateImageRequest, caller: str = Depends(authorised)) -> dict[str, Any]:
        if sync_limit_seconds is not None and request.timeout > sync_limit_seconds:
            raise ApiError(ErrorCode.INVALID_INPUT,
                           f"A timeout above {sync_limit_seconds:g} s is longer than one HTTP request may last here: "
                           "use POST /jobs, then poll GET /jobs/{id}.")
        wait = request.timeout + TIMEOUT_GRACE_SECONDS
        if sync_limit_seconds is not None:
            wait = min(wait, sync_limit_seconds)
        job = await jobs.start(caller, await payloads.generate(request), _generate_meta(request))
        try:
            result = await asyncio.wait_for(asyncio.shield(jobs.outcome(job.id)), wait)
        except asyncio.TimeoutError:
            await jobs.cancel(job)
            raise ApiError(ErrorCode.TIMEOUT, f"No image within {wait:g} s; the job was cancelled.") from None
        return await render_result(job, result)

    @app.post("/jobs", status_code=202, response_model=JobAccepted)
    async def start_job(request: JobBody, caller: str = Depends(authorised)) -> JobAccepted:
        build = {"generate": payloads.generate, "caption": payloads.caption, "upscale": payloads.upscale}[request.kind]
        meta = _generate_meta(request) if request.kind == "generate" else {}
        job = await jobs.start(caller, await build(request), meta)
        return JobAccepted(job_id=job.id)

    @app.get("/jobs/{job_id}", response_model=JobView, response_model_exclude_none=True)
    async def job_status(job_id: str, caller: str = Depends(authorised)) -> JobView:
        job = await jobs.owned(caller, job_id)
        view = JobView(job_id=job.id, kind=job.kind, status=job.status.value, progress=job.progress, stage=job.stage,
                       created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at)
        if job.status is JobStatus.DONE:
            try:
                view.result = await render_result(job, await asyncio.shield(jobs.outcome(job.id)))
            except ToolboxError as error:  # e.g. the result is no longer kept
                view.error = ErrorResponse(error=error.message, error_code=error.code.value)
        elif job.error() is not None:
            view.error = ErrorResponse(error=job.error().message, error_code=job.error().code.value)
        return view

    @app.delete("/jobs/{job_id}", response_model=JobView, response_model_exclude_none=True)
    async def cancel_job(job_id: str, caller: str = Depends(authorised)) -> JobView:
        job = await jobs.owned(caller, job_id)
        if not job.status.finished:
            await jobs.cancel(job)
        return await job_status(job_id, caller)

    return app


def _generate_meta(request: GenerateImageRequest) -> dict[str, Any]:
    # Kept with the job so that a later GET /jobs/{id} reports the contract's model_info.lora_scale.
    return {"title": f"Generate {request.width}×{request.height}",
            "lora_scale": request.lora_scale if request.lora_url is not None else None}


def api_for_settings(settings, token: str | None, sync_limit_seconds: float | None = None) -> FastAPI:
    """The API on the backend and library the settings name (the local backend for `toolbox serve`, Modal's there)."""
    from bot.backend import make_backend

    backend = make_backend(settings)
    library = Library.for_backend(backend.store, settings.backend == "local", settings.loras_dir, settings.models_dir)
    return create_app(backend, library, token, settings.api_concurrency, sync_limit_seconds)
