from __future__ import annotations

import pytest

from bot.settings import Settings
from modal_services.errors import ErrorCode, ToolboxError


def test_defaults(monkeypatch):
    monkeypatch.delenv("TOOLBOX_DATA_DIR")
    settings = Settings.load(environ={})
    assert settings.backend == "local" and settings.modal_app == "ai-toolbox" and settings.guild_ids == ()
    assert settings.civitai_api_base == "https://civitai.com"
    assert settings.data_dir.name == "ai-toolbox"
    assert settings.state_dict == "ai-toolbox-state"


def test_env_file_and_environment(tmp_path):
    (tmp_path / ".env").write_text("DISCORD_TOKEN=from-file-token\nTOOLBOX_GUILD_IDS=1, 2\nTOOLBOX_MODAL_APP=file-app\n")
    settings = Settings.load(environ={"TOOLBOX_MODAL_APP": "env-app", "CIVITAI_API_BASE": "http://127.0.0.1:9/"})
    assert settings.discord_token == "from-file-token"
    assert settings.guild_ids == (1, 2)
    assert settings.modal_app == "env-app"  # the environment wins over .env
    assert settings.civitai_api_base == "http://127.0.0.1:9"


def test_data_dir_layout(tmp_path):
    settings = Settings.load(environ={"TOOLBOX_DATA_DIR": str(tmp_path / "d")})
    assert settings.models_dir == tmp_path / "d" / "models"
    assert settings.loras_dir == tmp_path / "d" / "loras"
    assert settings.state_path.parent == tmp_path / "d"


def test_secrets_stay_out_of_repr():
    settings = Settings.load(environ={"DISCORD_TOKEN": "discord-secret-1234", "CIVITAI_TOKEN": "civ-secret",
                                      "HF_TOKEN": "hf_secret"})
    text = repr(settings)
    assert "secret" not in text and "data_dir" in text


@pytest.mark.parametrize("environ", [{"TOOLBOX_BACKEND": "cloud"}, {"TOOLBOX_GUILD_IDS": "12,abc"}])
def test_bad_settings_are_clear(environ):
    with pytest.raises(ToolboxError) as caught:
        Settings.load(environ=environ)
    assert caught.value.code is ErrorCode.INVALID_INPUT


def test_env_file_reaches_the_libraries_environment(tmp_path, monkeypatch):
    import os

    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("TOOLBOX_MODAL_APP", "from-env")
    (tmp_path / ".env").write_text("HF_ENDPOINT=http://127.0.0.1:9\nTOOLBOX_MODAL_APP=from-file\n")
    try:
        settings = Settings.load()
        assert os.environ["HF_ENDPOINT"] == "http://127.0.0.1:9"  # huggingface_hub reads it from there
        assert settings.modal_app == "from-env"  # the environment still wins
    finally:
        os.environ.pop("HF_ENDPOINT", None)
