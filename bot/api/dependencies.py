"""What the endpoints are given (FastAPI dependencies): the caller behind the token, the jobs with
their per-caller cap, the library, the /health cache, how long one HTTP request may last.

Every request but /health carries `Authorization: Bearer <TOOLBOX_API_TOKEN>`;
the comparison takes constant time. A caller is known by a hash of its token,
never by the token itself.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from bot.api.caller_jobs import ApiJobs
from bot.api.health import HealthCache
from bot.api.responses import ApiError
from modal_services.errors import ErrorCode
from modal_services.library.entries import Library

# The caller when auth is off (`toolbox serve --no-auth`, on loopback only).
LOCAL_CALLER = "local"


@dataclass(frozen=True)
class ApiContext:
    """What every request to one app shares; `create_app` keeps it in `app.state.api`."""

    jobs: ApiJobs
    library: Library
    health: HealthCache
    # The expected bearer token; None turns auth off.
    token: bytes | None = field(repr=False)
    # How long /generate-image may wait (the host's HTTP limit); None: as long as the request's timeout.
    sync_limit_seconds: float | None
    # Where a remixed image's generation data is read (CIVITAI_API_BASE).
    civitai_api_base: str = "https://civitai.com"


def get_context(request: Request) -> ApiContext:
    return request.app.state.api


Context = Annotated[ApiContext, Depends(get_context)]


def caller_id(token: str) -> str:
    """Who a token is, for job ownership and caps, without keeping the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


bearer = HTTPBearer(auto_error=False)


def authorised_caller(context: Context,
                      credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    """The caller a request's bearer token names; 401 when it is missing or wrong."""
    if context.token is None:
        return LOCAL_CALLER
    if credentials is None:
        raise ApiError(ErrorCode.PERMISSION_DENIED, "Missing token: send Authorization: Bearer <TOOLBOX_API_TOKEN>.")
    if not hmac.compare_digest(credentials.credentials.encode(), context.token):
        raise ApiError(ErrorCode.PERMISSION_DENIED, "Wrong token.")
    return caller_id(credentials.credentials)


def get_jobs(context: Context) -> ApiJobs:
    return context.jobs


def get_library(context: Context) -> Library:
    return context.library


def get_civitai_api_base(context: Context) -> str:
    return context.civitai_api_base


def get_health_cache(context: Context) -> HealthCache:
    return context.health


def get_sync_limit_seconds(context: Context) -> float | None:
    return context.sync_limit_seconds


# `caller: Caller` requires a valid token; FastAPI checks it before it validates the body.
Caller = Annotated[str, Depends(authorised_caller)]
# The jobs, with the per-caller cap on those in flight.
JobsDep = Annotated[ApiJobs, Depends(get_jobs)]
LibraryDep = Annotated[Library, Depends(get_library)]
HealthDep = Annotated[HealthCache, Depends(get_health_cache)]
SyncLimitDep = Annotated[float | None, Depends(get_sync_limit_seconds)]
CivitaiBaseDep = Annotated[str, Depends(get_civitai_api_base)]
