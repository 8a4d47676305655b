"""The bot supervisor: rotation before time limits, crash restarts with backoff, clean stops."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import discord
import pytest

from bot.runner import BotSupervisor
from modal_services.errors import ErrorCode, ToolboxError


class FakeBot:
    def __init__(self, behaviour: str, log: list):
        self.behaviour = behaviour
        self.log = log
        self._closed: asyncio.Event | None = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def start(self, token: str) -> None:
        self.log.append(("start", token, time.monotonic()))
        if self.behaviour == "crash":
            raise RuntimeError("gateway lost")
        if self.behaviour == "bad token":
            raise discord.LoginFailure("Improper token has been passed.")
        self._closed = asyncio.Event()
        await self._closed.wait()

    async def close(self) -> None:
        if self._closed is not None and not self._closed.is_set():
            self.log.append(("close",))
            self._closed.set()


def run_in_thread(supervisor: BotSupervisor, stop: threading.Event, timeout: float = 10) -> None:
    thread = threading.Thread(target=supervisor.run, args=(stop,))
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the supervisor did not stop"


def test_sessions_rotate_cleanly_before_the_limit():
    log, stop = [], threading.Event()

    def make_bot():
        if len([entry for entry in log if entry[0] == "start"]) >= 3:
            stop.set()
        return FakeBot("healthy", log)

    supervisor = BotSupervisor(make_bot, "token-123", session_limit=0.05)
    run_in_thread(supervisor, stop)
    starts = [entry for entry in log if entry[0] == "start"]
    assert len(starts) >= 3 and supervisor.crashes == 0
    assert [entry[0] for entry in log[:4]] == ["start", "close", "start", "close"]
    gaps = [later[2] - earlier[2] for earlier, later in zip(starts, starts[1:])]
    assert all(gap < 1.0 for gap in gaps)  # reconnects at once, no backoff after a clean rotation


def test_crashes_restart_with_growing_backoff():
    log, stop = [], threading.Event()

    def make_bot():
        if len(log) >= 4:
            stop.set()
        return FakeBot("crash", log)

    supervisor = BotSupervisor(make_bot, "t", first_backoff=0.05, max_backoff=0.2)
    run_in_thread(supervisor, stop)
    starts = [entry[2] for entry in log]
    gaps = [later - earlier for earlier, later in zip(starts, starts[1:])]
    assert supervisor.crashes >= 4
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.2
    assert max(gaps) < 0.2 + 0.5  # capped


def test_a_bad_token_is_not_retried():
    log, stop = [], threading.Event()
    supervisor = BotSupervisor(lambda: FakeBot("bad token", log), "wrong", first_backoff=0.01)
    with pytest.raises(ToolboxError) as caught:
        supervisor.run(stop)
    assert caught.value.code is ErrorCode.PERMISSION_DENIED and "wrong" not in caught.value.message
    assert len(log) == 1 and supervisor.sessions == 1


def test_toolbox_bot_needs_a_token(capsys):
    from bot.cli import main

    assert main(["bot"]) == 2
    assert capsys.readouterr().err.startswith("error: INVALID_INPUT: DISCORD_TOKEN is not set")


def test_toolbox_bot_reports_a_refused_token(monkeypatch, capsys):
    from bot import cli, runner

    monkeypatch.setenv("DISCORD_TOKEN", "not-a-real-token-1234")
    monkeypatch.setattr(runner, "BotSupervisor",
                        lambda make_bot, token: BotSupervisor(lambda: FakeBot("bad token", []), token))
    assert cli.main(["bot"]) == 1
    err = capsys.readouterr().err
    assert "PERMISSION_DENIED" in err and "not-a-real-token" not in err


def test_stop_ends_a_running_session():
    log, stop = [], threading.Event()
    supervisor = BotSupervisor(lambda: FakeBot("healthy", log), "t")
    thread = threading.Thread(target=supervisor.run, args=(stop,))
    thread.start()
    while not log:
        time.sleep(0.01)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    assert log[-1] == ("close",) and supervisor.sessions == 1


# ------------------------------------------------------------------ start-up


def test_a_refused_modal_token_stops_the_bot_before_discord(monkeypatch, capsys):
    from bot.backend import ModalBackend
    from bot.cli import main

    async def refused(self):
        raise ToolboxError(ErrorCode.PERMISSION_DENIED, "Modal has no valid token for this machine.")

    async def discord_contacted(self, *args, **kwargs):
        raise AssertionError("Discord was contacted before the backend was checked")

    monkeypatch.setattr(ModalBackend, "check", refused)
    monkeypatch.setattr(discord.Client, "start", discord_contacted)
    monkeypatch.setenv("TOOLBOX_BACKEND", "modal")
    monkeypatch.setenv("DISCORD_TOKEN", "token-123")
    code = main(["bot"])
    out, err = capsys.readouterr()
    assert (code, out, err) == (1, "", "error: PERMISSION_DENIED: Modal has no valid token for this machine.\n")


def test_the_bot_starts_without_discord_s_voice_warnings_and_keeps_its_others(monkeypatch, caplog):
    from unittest.mock import MagicMock

    from bot.client import ToolboxBot
    from bot.settings import Settings

    monkeypatch.setattr(discord.VoiceClient, "warn_nacl", True)
    monkeypatch.setattr(discord.VoiceClient, "warn_dave", True)
    with caplog.at_level(logging.WARNING, logger="discord"):
        ToolboxBot(Settings.load(), MagicMock())
        logging.getLogger("discord.client").warning("another discord warning")
    messages = [record.getMessage() for record in caplog.records]
    assert not any("voice will NOT be supported" in message for message in messages), messages
    assert "another discord warning" in messages
    # What a plain discord.py client says in its place, so the check above can see it.
    monkeypatch.setattr(discord.VoiceClient, "warn_nacl", True)
    with caplog.at_level(logging.WARNING, logger="discord"):
        discord.Client(intents=discord.Intents.none())
    assert any("PyNaCl is not installed" in record.getMessage() for record in caplog.records)


async def test_a_local_backend_without_engines_says_so_everywhere(monkeypatch, caplog):
    """The base install: jobs that run models are refused before a job exists (the API answers 503, not 500),
    /health is degraded with the reason, the bot's and the API's start-up log it; the rest still works."""
    from bot import backend as backend_module
    from bot.api.health import health_document
    from bot.settings import Settings
    from modal_services.jobs.records import found_jobs
    from modal_services.jobs.requests import GenerateRequest, ModelScanRequest
    from modal_services.services import NO_ENGINES_MESSAGE

    monkeypatch.setattr(backend_module, "missing_engine_libraries", lambda: ["numpy", "torch"])
    backend = backend_module.LocalBackend(Settings.load())
    try:
        with pytest.raises(ToolboxError) as refused:
            await backend.submit(GenerateRequest.parse({"prompt": "a cat"}))
        assert (refused.value.code, refused.value.message) == (ErrorCode.BACKEND_UNAVAILABLE, NO_ENGINES_MESSAGE)
        assert await found_jobs(backend.store) == []
        health = await health_document(backend)
        assert health["status"] == "degraded" and health["problems"] == [NO_ENGINES_MESSAGE]
        with caplog.at_level(logging.WARNING, logger="bot.backend"):
            await backend.recover()
        assert [record.getMessage() for record in caplog.records] == [f"{NO_ENGINES_MESSAGE}; missing: numpy, torch"]
        scan = await backend.submit(ModelScanRequest.parse({}))
        assert (await backend.result(scan.id))["missing"] == []
    finally:
        await backend.close()
