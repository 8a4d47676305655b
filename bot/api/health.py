"""The /health document: base models installed, services loaded, versions; no secrets.

Load balancers and dashboards poll it, so it is computed in the background
at most every HEALTH_TTL_SECONDS and served from the last one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from importlib import metadata
from typing import Any

from bot.api.schema import API_VERSION
from bot.backend import Backend
from modal_services.base_models.states import model_states
from modal_services.base_models.registry import BASE_MODELS

log = logging.getLogger(__name__)

HEALTH_TTL_SECONDS = 2.0


async def health_document(backend: Backend) -> dict[str, Any]:
    states = await model_states(backend.store, BASE_MODELS.values())
    problem = backend.engine_problem()
    return {
        # "degraded": the API answers, but its jobs cannot run; `problems` says why and what to do.
        "status": "degraded" if problem else "ok",
        "problems": [problem] if problem else [],
        "api_version": API_VERSION,
        "versions": {name: metadata.version(name) for name in ("ai-toolbox", "fastapi", "pydantic")},
        "backend": backend.name,
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
