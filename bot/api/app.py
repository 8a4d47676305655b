"""The FastAPI app: its routes, its error answers, its body limit, and what it closes on shutdown."""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from bot.api.body_limit import BodyLimit
from bot.api.caller_jobs import ApiJobs, ConcurrencyCap
from bot.api.dependencies import ApiContext
from bot.api.docs import add_docs
from bot.api.health import HealthCache
from bot.api.responses import ERROR_STATUSES, error_response, error_responses, validation_error
from bot.api.routes import health, images, jobs
from bot.api.schema import API_VERSION, MAX_BODY_BYTES
from bot import backend as backends
from bot.backend import Backend
from bot.core.library import library_for
from modal_services.library.entries import Library
from bot.settings import Settings
from modal_services.errors import ErrorCode, ToolboxError

log = logging.getLogger(__name__)


def create_app(
    backend: Backend,
    library: Library,
    token: str | None,
    concurrency: int,
    sync_limit_seconds: float | None = None,
    civitai_api_base: str = "https://civitai.com",
) -> FastAPI:
    """The API over `backend`, with `concurrency` jobs in flight per token.

    `token=None` turns auth off (the caller checks that is allowed: `toolbox serve
    --no-auth` on 127.0.0.1 only). `sync_limit_seconds` bounds how long
    /generate-image may wait (the host's HTTP limit); longer requests are sent to /jobs. `civitai_api_base`:
    where remixed images are read."""
    app = FastAPI(title="AI Toolbox", version=API_VERSION, lifespan=_lifespan, docs_url=None, redoc_url=None,
                  responses=error_responses(ERROR_STATUSES))
    app.state.api = ApiContext(jobs=ApiJobs(backend, ConcurrencyCap(concurrency)), library=library,
                               health=HealthCache(backend), token=token.encode() if token else None,
                               sync_limit_seconds=sync_limit_seconds, civitai_api_base=civitai_api_base)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    app.add_exception_handler(ToolboxError, _on_toolbox_error)
    app.add_exception_handler(RequestValidationError, _on_invalid)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
    for routes in (health, images, jobs):
        app.include_router(routes.router)
    app.openapi = lambda: _published_schema(app)
    add_docs(app)
    return app


def _published_schema(app: FastAPI) -> dict[str, Any]:
    """/openapi.json as the API answers: without the 422 "Validation Error" FastAPI documents for every
    route with a body or a path parameter (a body the schema refuses is answered 400 here)."""
    schema = FastAPI.openapi(app)  # built once, then kept by FastAPI
    for operation in (operation for path in schema["paths"].values() for operation in path.values()):
        answer = operation["responses"].get("422", {})
        if "HTTPValidationError" in json.dumps(answer):
            del operation["responses"]["422"]
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    return schema


def api_for_settings(settings: Settings, token: str | None, sync_limit_seconds: float | None = None) -> FastAPI:
    """The API on the backend and library the settings name (the local backend for `toolbox serve`, Modal's there)."""
    backend = backends.make_backend(settings)
    library = library_for(settings, backend.store)
    return create_app(backend, library, token, settings.api_concurrency, sync_limit_seconds, settings.civitai_api_base)


@asynccontextmanager
async def _lifespan(app: FastAPI):
    context: ApiContext = app.state.api
    await context.jobs.backend.recover()  # jobs a killed earlier run left behind read as failed, not running
    yield
    await context.jobs.close()
    await context.jobs.backend.close()


async def _on_toolbox_error(_: Request, exc: ToolboxError) -> JSONResponse:
    return error_response(exc)


async def _on_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(validation_error(exc))


async def _on_http_error(_: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own refusals (unknown path, wrong method, body too large) in the API's error shape."""
    code = {401: ErrorCode.PERMISSION_DENIED, 404: ErrorCode.NOT_FOUND, 429: ErrorCode.RATE_LIMITED}.get(
        exc.status_code, ErrorCode.INVALID_INPUT if exc.status_code < 500 else ErrorCode.INTERNAL)
    return error_response(ToolboxError(code, str(exc.detail)), status=exc.status_code)


async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.error("API request failed", exc_info=exc)
    return error_response(ToolboxError(ErrorCode.INTERNAL, "Something went wrong on the server."))
