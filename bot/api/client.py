"""A client of the HTTP API (`toolbox generate --api URL`): start a job, follow it, fetch the result.

It uses the job API rather than the synchronous /generate-image, so a job may
take longer than one HTTP request may last (Modal's 150 s) and shows progress.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, Awaitable, Callable

import httpx

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.requests import GenerateRequest
from modal_services.jobs.validation import field_bounds

POLL_SECONDS = 1.0
REQUEST_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
# How long past a job's own timeout the client still waits for it: the queue, a cold start, loading the model.
DEADLINE_GRACE_SECONDS = 600.0


class ApiClient:
    def __init__(self, base_url: str, token: str | None, poll_seconds: float | None = None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self.poll_seconds = POLL_SECONDS if poll_seconds is None else poll_seconds
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=REQUEST_TIMEOUT)

    async def __aenter__(self) -> "ApiClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs) -> dict[str, Any]:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ToolboxError(ErrorCode.BACKEND_UNAVAILABLE,
                               f"Could not reach the API at {self.base_url} ({type(exc).__name__}).") from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.is_error:
            raise api_error(response.status_code, body)
        return body

    async def run(self, request: dict[str, Any], on_update: Callable[[Any], Awaitable[Any]]) -> dict[str, Any]:
        """Start a job and wait for its result; Ctrl-C cancels it on the server too.

        The wait ends: with the error of a job the server reports failed (one whose runner died included),
        or with TIMEOUT (the job cancelled on the server) once the request's own timeout, which counts
        generating only, and `DEADLINE_GRACE_SECONDS` for the queue and a model load have passed.
        """
        job_id = (await self._call("POST", "/jobs", json=request))["job_id"]
        timeout = float(request.get("timeout") or field_bounds(GenerateRequest, "timeout")[1])
        try:
            async with asyncio.timeout(timeout + DEADLINE_GRACE_SECONDS):
                return await self._follow(job_id, on_update)
        except TimeoutError:
            await self._cancel_if_reachable(job_id)
            raise ToolboxError(ErrorCode.TIMEOUT, f"Job {job_id} did not finish within {timeout:g} s (its timeout) "
                               f"plus {DEADLINE_GRACE_SECONDS:g} s for the queue and loading; stopped waiting and "
                               "asked the server to cancel it.") from None
        except (KeyboardInterrupt, asyncio.CancelledError):
            await self._call("DELETE", f"/jobs/{job_id}")
            raise

    async def _follow(self, job_id: str, on_update: Callable[[Any], Awaitable[Any]]) -> dict[str, Any]:
        while True:
            view = await self._call("GET", f"/jobs/{job_id}")
            if "error" in view:  # failed (its runner dead included), cancelled, or done with its result no longer kept
                raise api_error(200, view["error"])
            if view["status"] == "done":
                return view["result"]
            await on_update(SimpleNamespace(progress=view["progress"], stage=view["stage"]))
            await asyncio.sleep(self.poll_seconds)

    async def _cancel_if_reachable(self, job_id: str) -> None:
        try:
            await self._call("DELETE", f"/jobs/{job_id}")
        except ToolboxError:
            pass  # the server is gone or the job already ended: nothing left to stop


def api_error(status: int, body: dict[str, Any]) -> ToolboxError:
    """An error body of the API as a ToolboxError (its code when the API gave a known one)."""
    try:
        code = ErrorCode(body.get("error_code"))
    except ValueError:
        code = ErrorCode.INTERNAL
    message = body.get("error") or f"The API answered HTTP {status}."
    if body.get("retry_after") is not None:
        message += f" Retry in {body['retry_after']} s."
    return ToolboxError(code, message)
