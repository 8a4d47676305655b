"""What the idle-deployment tests share: the ways a deployment's live store forgets, and the CLI in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bot.backend
from bot.cli import main
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
