"""`toolbox serve`'s start-up mistakes: each one line, `error: CODE: message`, with the usual exit status."""

from __future__ import annotations

import socket

import pytest

import bot.api.server
from bot.cli import main
from tests.servers import LOOPBACK


@pytest.fixture
def never_serves(monkeypatch):
    monkeypatch.setattr(bot.api.server, "run_api", lambda *args, **kwargs: pytest.fail("the server started"))
    monkeypatch.setenv("TOOLBOX_API_TOKEN", "serve-cli-token")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_a_port_out_of_range_is_invalid_input(port, never_serves, capsys):
    assert main(["serve", "--port", port]) == 2
    assert one_error_line(capsys) == f"error: INVALID_INPUT: --port must be from 1 to 65535, not {port}."


def test_a_port_in_use_names_the_address(never_serves, capsys):
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 1
    assert one_error_line(capsys) == (f"error: BACKEND_UNAVAILABLE: {LOOPBACK}:{port} is in use; "
                                      "choose another with --port.")


@pytest.mark.parametrize("host", ["192.0.2.1", "no-such-host.invalid"])  # TEST-NET-1: never this machine's
def test_a_host_that_is_not_this_machine_is_invalid_input(host, never_serves, capsys):
    assert main(["serve", "--host", host, "--port", "8000"]) == 2
    assert one_error_line(capsys).startswith(f"error: INVALID_INPUT: --host {host}: not an address of this machine")
