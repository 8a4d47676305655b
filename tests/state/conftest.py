"""What the idle-deployment tests share: the ways a deployment's live store forgets, and the CLI and the HTTP API
in-process."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import AsyncIterator

import httpx
import pytest

import bot.backend
from bot.api import create_app
from bot.backend import LocalBackend
from bot.cli import main
from bot.core.library import library_for
from bot.settings import Settings
from tests.fakes.expiring_store import ExpiringStore

GOOD_HF = "hf_AbCdEfGhIjKlMnOp1234"
GOOD_CIVITAI = "0123456789abcdef0123456789abcd99"

IDLE_SPELLS = {
    "8 idle days": lambda live: live.advance(days=8),
    "40 idle days": lambda live: live.advance(days=40),
    "Dict emptied": ExpiringStore.forget_everything,
}
LOCAL_STATE_DELETED = "state.sqlite3 deleted"
FRONT_END_SPELLS = [*IDLE_SPELLS, LOCAL_STATE_DELETED]


@pytest.fixture
def hub(fake_hub):
    """The fake hub checking tokens too: Hugging Face's whoami and CivitAI's /api/v1/me (user "tester")."""
    fake_hub.valid_tokens = {GOOD_HF, GOOD_CIVITAI}
    return fake_hub


@pytest.fixture
def forget(request, monkeypatch):
    """forget(): the local backend's live store loses everything it held, as `request.param` says.

    For an idle spell, every LocalBackend of the test shares one ExpiringStore (as every container
    of a deployment shares its Dict); for `LOCAL_STATE_DELETED`, the backends keep their SQLite
    file, which is deleted (every backend on it closed first)."""
    state_path = Settings.load().state_path
    if request.param == LOCAL_STATE_DELETED:
        def delete_state() -> None:
            assert state_path.exists()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{state_path}{suffix}").unlink(missing_ok=True)

        return delete_state
    live = ExpiringStore()
    monkeypatch.setattr(bot.backend, "SqliteStore", lambda path: live)

    def idle() -> None:
        IDLE_SPELLS[request.param](live)
        assert live.remembered() == []

    return idle


def cli(capsys, *argv) -> dict | list | str:
    """`toolbox <argv>` in-process: its JSON with --json, else its stdout; a failure fails the test."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out) if "--json" in argv else out


API_TOKEN = "api-token-7c21"


@contextlib.asynccontextmanager
async def api_client(settings: Settings, engines) -> AsyncIterator[httpx.AsyncClient]:
    """The HTTP API on a local backend of its own (`engines` its engine factory), lifespan run, token sent."""
    backend = LocalBackend(settings, engines=engines)
    app = create_app(backend, library_for(settings, backend.store), API_TOKEN, settings.api_concurrency)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api",
                                     headers={"Authorization": f"Bearer {API_TOKEN}"}) as client:
            yield client
    finally:
        await lifespan.__aexit__(None, None, None)
        await backend.close()


async def finished_job(client: httpx.AsyncClient, job: dict) -> dict:
    """POST /jobs `job`, then GET /jobs/{id} until it is done: its view."""
    accepted = await client.post("/jobs", json=job)
    assert accepted.status_code == 202, accepted.text
    while (view := (await client.get(f"/jobs/{accepted.json()['job_id']}")).json())["status"] != "done":
        assert view["status"] in ("queued", "running"), view
        await asyncio.sleep(0.02)
    return view
