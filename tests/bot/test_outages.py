"""Outages of Discord and Modal: one line with the cause (and the next try), never a traceback."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp

from bot.outages import OneLineOutages, describe_outage, quiet_discord_outages
from bot.runner import BotSupervisor
from modal_services.errors import ErrorCode, ToolboxError
from tests.bot.test_runner import FakeBot, run_in_thread

TOOLBOX = Path(sys.executable).with_name("toolbox")


def connector_error(os_error: OSError, host: str = "discord.com", port: int = 443) -> aiohttp.ClientConnectorError:
    key = aiohttp.client_reqrep.ConnectionKey(host, port, True, True, None, None, None)
    return aiohttp.ClientConnectorError(key, os_error)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_each_kind_of_outage_is_named():
    assert describe_outage(connector_error(socket.gaierror(-2, "Name or service not known"))) == \
        "DNS lookup of discord.com failed"
    assert describe_outage(connector_error(ConnectionRefusedError(111, "Connection refused"))) == \
        "cannot connect to discord.com:443 (Connection refused)"
    assert describe_outage(TimeoutError()) == "timed out"
    assert describe_outage(ValueError("a bug")) is None


class CrashingBot(FakeBot):
    def __init__(self, error: BaseException, log: list):
        super().__init__("healthy", log)
        self.error = error

    async def start(self, token: str) -> None:
        self.log.append(("start", token, time.monotonic()))
        raise self.error


def test_an_unreachable_discord_is_one_line_per_retry(caplog):
    log, stop = [], threading.Event()

    def make_bot():
        if len(log) >= 2:
            stop.set()
        return CrashingBot(connector_error(socket.gaierror(-2, "Name or service not known")), log)

    caplog.set_level(logging.INFO)
    run_in_thread(BotSupervisor(make_bot, "secret-token-abc", first_backoff=0.01), stop)
    retries = [record for record in caplog.records if "retrying" in record.getMessage()]
    assert retries and all(record.exc_info is None for record in caplog.records)
    assert "DNS lookup of discord.com failed; retrying in" in retries[0].getMessage()
    assert "secret-token-abc" not in caplog.text and "Traceback" not in caplog.text


def test_an_unexpected_crash_keeps_its_traceback(caplog):
    log, stop = [], threading.Event()

    def make_bot():
        if log:
            stop.set()
        return CrashingBot(ValueError("a real bug"), log)

    supervisor = BotSupervisor(make_bot, "t", first_backoff=0.01)
    run_in_thread(supervisor, stop)
    crashes = [record for record in caplog.records if record.exc_info]
    assert len(crashes) == supervisor.crashes >= 1 and "a real bug" in caplog.text  # one traceback per crash


def test_discord_py_reconnect_lines_lose_their_traceback(caplog):
    quiet_discord_outages()
    logger = logging.getLogger("discord.client")
    assert any(isinstance(existing, OneLineOutages) for existing in logger.filters)
    try:
        raise connector_error(ConnectionRefusedError(111, "Connection refused"), "gateway.discord.gg")
    except aiohttp.ClientError:
        logger.exception("Attempting a reconnect in %.2fs", 4.5)
    [record] = [record for record in caplog.records if record.name == "discord.client"]
    assert record.exc_info is None
    assert record.getMessage() == "Attempting a reconnect in 4.50s: cannot connect to gateway.discord.gg:443 (Connection refused)"


def run_toolbox(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MODAL_")}
    # Never anywhere but loopback, whatever the machine's Modal config says.
    environment.update(MODAL_CONFIG_PATH=str(Path.cwd() / "no-modal.toml"), MODAL_SERVER_URL=f"http://127.0.0.1:{free_port()}")
    environment.update(env)
    return subprocess.run([str(TOOLBOX), *args], capture_output=True, text=True, env=environment, timeout=60)


def test_modal_without_a_token_is_one_error_line():
    started = time.monotonic()
    result = run_toolbox("status", TOOLBOX_BACKEND="modal")
    assert time.monotonic() - started < 15
    assert result.returncode == 1
    assert result.stderr.startswith("error: PERMISSION_DENIED: Modal has no valid token")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_unreachable_modal_is_one_error_line(monkeypatch, capsys):
    from bot import backend, cli

    monkeypatch.setattr(backend, "MODAL_CONNECT_TIMEOUT", 1.0)
    monkeypatch.setenv("TOOLBOX_BACKEND", "modal")
    monkeypatch.setenv("MODAL_SERVER_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test-secret")
    started = time.monotonic()
    assert cli.main(["status"]) == 1
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert err.startswith("error: BACKEND_UNAVAILABLE: Modal could not be reached")
    assert err.count("\n") == 1 and "as-test-secret" not in err



def test_the_bot_container_ends_a_refused_token_in_one_line(app_module, caplog):
    class RefusedSupervisor:
        def run(self, stop):
            raise ToolboxError(ErrorCode.PERMISSION_DENIED, "Discord refused the bot token: check DISCORD_TOKEN.")

    app_module.run_until_stopped(RefusedSupervisor(), threading.Event())
    [record] = [record for record in caplog.records if record.name == "modal_services.app"]
    assert record.getMessage() == "the bot stopped: PERMISSION_DENIED: Discord refused the bot token: check DISCORD_TOKEN."
    assert record.exc_info is None
