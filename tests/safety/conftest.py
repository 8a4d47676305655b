"""What the safety tests share: a state store of their own."""

from __future__ import annotations

import pytest

from modal_services.state.store import SqliteStore


@pytest.fixture
async def store(tmp_path):
    store = SqliteStore(tmp_path / "state.sqlite3")
    yield store
    await store.close()
