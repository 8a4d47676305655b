"""A library on a real state store (SQLite in tmp), with LoRAs of both families and a checkpoint."""

from __future__ import annotations

import pytest

from modal_services.library.entries import Library, LibraryEntry, entry_key
from modal_services.state.store import SqliteStore

LORAS = (
    LibraryEntry(name="Detail", file="detail.safetensors", type="lora", weight=0.6, trigger_words=["shiny"]),
    LibraryEntry(name="Flux Detail", file="flux_detail.safetensors", type="lora", family="flux", weight=0.8),
)
CHECKPOINT = LibraryEntry(name="Pony Mix", file="pony_mix.safetensors", type="checkpoint")


@pytest.fixture
async def store(tmp_path):
    store = SqliteStore(tmp_path / "state.sqlite3")
    yield store
    await store.close()


@pytest.fixture
async def library(store, tmp_path):
    """No optional model enabled: a test enables what it needs."""
    for entry in (*LORAS, CHECKPOINT):
        await store.put(entry_key(entry.file), entry.to_dict())
    return Library(store, tmp_path / "loras", tmp_path / "models", files_visible=False)
