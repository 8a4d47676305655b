"""Log lines of `toolbox bot` and `toolbox serve`: colour on a terminal only, plain in a file or a pipe."""

from __future__ import annotations

import io
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import bot.cli.common
import bot.runner
from bot.cli import main
from bot.logs import setup_logging

ESCAPE = "\x1b["


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def logged(stream) -> str:
    setup_logging(stream=stream)
    logging.getLogger("bot.test").warning("disk %s full", "nearly")
    return stream.getvalue()


def test_a_file_gets_plain_lines(tmp_path):
    with open(tmp_path / "bot.log", "w+") as file:
        setup_logging(stream=file)
        logging.getLogger("bot.test").warning("disk %s full", "nearly")
        file.flush()
    text = (tmp_path / "bot.log").read_text()
    assert ESCAPE not in text and text.endswith("] [WARNING ] bot.test: disk nearly full\n")


def test_a_terminal_gets_colour_unless_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    coloured = logged(Terminal())
    assert ESCAPE in coloured and "disk nearly full" in coloured
    monkeypatch.setenv("NO_COLOR", "1")
    assert ESCAPE not in logged(Terminal())


def test_set_up_twice_logs_each_line_once():
    stream = io.StringIO()
    setup_logging(stream=io.StringIO())
    assert logged(stream).count("disk nearly full") == 1


def test_toolbox_bot_logs_plain_lines_into_a_pipe(monkeypatch, capsys):
    """What `toolbox bot` sets up, in a container too (discord.py's own set-up colours there whatever the stream)."""
    class Supervisor:
        def run(self, stop):
            logging.getLogger("bot").info("the bot would run here")

    monkeypatch.setattr(bot.runner, "bot_supervisor", lambda settings: Supervisor())
    # Other tests' engine threads may still be winding down in this process: never exit it for them.
    monkeypatch.setattr(bot.cli.common, "leave_busy_engines", lambda status: None)
    monkeypatch.setenv("DISCORD_TOKEN", "fake-token")
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert main(["bot"]) == 0
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    err = capsys.readouterr().err
    assert "bot: the bot would run here" in err and ESCAPE not in err


@pytest.mark.slow
def test_toolbox_serve_logs_plain_lines_into_a_file(tmp_path):
    """Started, one request, stopped: every line plain (uvicorn's own set-up coloured by stdout's terminal)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log_file = tmp_path / "serve.log"
    repository = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TOOLBOX_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(repository)}
    with open(log_file, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "bot.cli", "serve", "--no-auth", "--port", str(port)],
                                  env=env, stderr=log, stdout=log)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=15)
    text = log_file.read_text()
    assert "GET /health" in text and "serving the API on http://127.0.0.1" in text and ESCAPE not in text
