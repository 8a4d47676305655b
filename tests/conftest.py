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


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """A tiny random Qwen3-VL snapshot, built once per test run."""
    from tests.fixtures.tiny_qwen import build_tiny_qwen3vl

    return build_tiny_qwen3vl(tmp_path_factory.mktemp("tiny-qwen") / "qwen3-vl-2b")


@pytest.fixture
def installed_caption_model(tiny_qwen_dir, tmp_path):
    """The tiny caption model placed where the local backend looks for it (the data dir's models/)."""
    from modal_services.layout import CAPTION_MODEL

    models_dir = tmp_path / "data" / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    (models_dir / CAPTION_MODEL).symlink_to(tiny_qwen_dir, target_is_directory=True)
    return models_dir
