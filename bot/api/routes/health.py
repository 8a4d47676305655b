"""`GET /health`: base models installed, services loaded, versions. No secrets, no token needed."""

from __future__ import annotations

from fastapi import APIRouter, Response

from bot.api.dependencies import HealthDep

router = APIRouter()


@router.get("/health")
async def health(cache: HealthDep) -> Response:
    return Response(await cache.body(), media_type="application/json")
