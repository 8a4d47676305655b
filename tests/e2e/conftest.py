"""The end-to-end tests' models: the tiny caption model and the tiny SDXL volume, where the local backend looks."""

from __future__ import annotations

import pytest


@pytest.fixture
def installed_caption_model(tiny_qwen_dir, tmp_path):
    """The tiny caption model placed where the local backend looks for it (the data dir's models/)."""
    from modal_services.layout import CAPTION_MODEL

    models_dir = tmp_path / "data" / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    (models_dir / CAPTION_MODEL).symlink_to(tiny_qwen_dir, target_is_directory=True)
    return models_dir


@pytest.fixture(scope="module")
def tiny_sdxl_data_dir(tmp_path_factory):
    """A data dir whose models/ and loras/ are the tiny SDXL volume, with one LoRA in the library."""
    import asyncio

    from modal_services.library.entries import LibraryEntry, entry_key
    from modal_services.state.store import SqliteStore
    from tests.fixtures.tiny_sdxl_checkpoint import build_tiny_volume

    root = tmp_path_factory.mktemp("data")
    build_tiny_volume(root)

    async def add_entry():
        store = SqliteStore(root / "state.sqlite3")
        entry = LibraryEntry(name="Detail Tweaker", file="detail.safetensors", type="lora", weight=0.8,
                             trigger_words=["shiny"])
        await store.put(entry_key(entry.file), entry.to_dict())
        await store.close()

    asyncio.run(add_entry())
    return root
