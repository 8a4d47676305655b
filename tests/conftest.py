"""Test-wide guards: nothing reaches a hub or Modal, and nothing writes outside tmp dirs."""

from __future__ import annotations

import os

import pytest

# Set before any test module imports huggingface_hub or transformers.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("MODAL_TOKEN_ID", None)
os.environ.pop("MODAL_TOKEN_SECRET", None)


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch, tmp_path):
    """Settings come from each test's own environment, never the developer's .env or data dir."""
    for name in ("DISCORD_TOKEN", "CIVITAI_TOKEN", "HF_TOKEN", "TOOLBOX_BACKEND", "TOOLBOX_GUILD_IDS",
                 "TOOLBOX_MODAL_APP", "CIVITAI_API_BASE", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TOOLBOX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
