"""The recommended LoRAs: `toolbox setup --only lora-...` and /setup's Add buttons, through the CivitAI
importer's job against the fake CivitAI (public and gated models, already installed, a removed model)."""

from __future__ import annotations

import asyncio
import json
from unittest.mock import MagicMock

import pytest

from bot.cli import main
from modal_services.base_models.registry import STARTER_LORAS
from modal_services.state.store import SqliteStore
from modal_services.state.keys import secret_key
from tests.fakes.civitai_server import FakeCivitai
from tests.fakes.discord_fakes import fake_interaction
from tests.fixtures import tiny_loras

pytest.importorskip("torch")

LORA = tiny_loras.to_bytes(tiny_loras.sdxl_kohya())
AESTHETIC = STARTER_LORAS["lora-aesthetic-quality"]
DETAILER = STARTER_LORAS["lora-detailer-il"]


@pytest.fixture
def civitai(fake_civitai):
    return fake_civitai


def publish(civitai: FakeCivitai, starter, gated: bool = False) -> None:
    civitai.add_model(starter.civitai_model_id, starter.civitai_model_id * 10 + 7, LORA, name=starter.name,
                      base_model="Illustrious", file_name=f"{starter.key}.safetensors",
                      trained_words=["masterpiece", "best quality"], gated=gated)


def library(capsys) -> dict[str, dict]:
    assert main(["models", "list", "--json"]) == 0
    return {entry["file"]: entry for entry in json.loads(capsys.readouterr().out)}


def set_civitai_token(tmp_path, token: str) -> None:
    async def write():
        store = SqliteStore(tmp_path / "data" / "state.sqlite3")
        await store.put(secret_key("civitai"), {"token": token, "user": "admin", "set_at": 1.0})
        await store.close()

    asyncio.run(write())


def test_the_list_is_data_an_admin_can_read():
    assert {key: lora.civitai_model_id for key, lora in STARTER_LORAS.items()} == {
        "lora-aesthetic-quality": 929497, "lora-detailer-il": 1231943}
    assert AESTHETIC.page_url == "https://civitai.com/models/929497"


def test_setup_only_imports_a_public_starter_without_a_token(civitai, capsys):
    publish(civitai, AESTHETIC)
    assert main(["setup", "--only", "lora-aesthetic-quality"]) == 0
    assert "lora-aesthetic-quality: imported as lora-aesthetic-quality.safetensors" in capsys.readouterr().out
    entry = library(capsys)["lora-aesthetic-quality.safetensors"]
    assert (entry["civitai_model_id"], entry["source"], entry["type"]) == (929497, "civitai", "lora")
    assert entry["trigger_words"] == ["masterpiece", "best quality"] and entry["format"] == "kohya"
    assert entry["sha256"] and entry["base_model"] == "Illustrious"
    (download,) = civitai.hits("/api/download/models/")
    assert "authorization" not in download.headers  # no token was needed, none was sent
    assert main(["status", "--json"]) == 0
    starters = json.loads(capsys.readouterr().out)["starter_loras"]
    assert starters["lora-aesthetic-quality"]["installed"] == "lora-aesthetic-quality.safetensors"
    assert starters["lora-detailer-il"]["installed"] is None


def test_an_installed_starter_is_not_fetched_again(civitai, capsys):
    publish(civitai, AESTHETIC)
    assert main(["setup", "--only", "lora-aesthetic-quality"]) == 0
    assert main(["setup", "--only", "lora-aesthetic-quality"]) == 0
    assert "already in the library as lora-aesthetic-quality.safetensors" in capsys.readouterr().out
    assert len(civitai.hits("/storage/")) == 1 and len(library(capsys)) == 1


def test_a_gated_starter_says_it_needs_a_token_then_imports_with_one(civitai, capsys, tmp_path):
    publish(civitai, DETAILER, gated=True)
    assert main(["setup", "--only", "lora-detailer-il"]) == 1
    err = capsys.readouterr().err
    assert "error: CIVITAI_AUTH_REQUIRED:" in err and "set CIVITAI_TOKEN in the environment" in err and "/setup" not in err
    assert library(capsys) == {}
    set_civitai_token(tmp_path, civitai.token)
    assert main(["setup", "--only", "lora-detailer-il"]) == 0
    assert "lora-detailer-il: imported" in capsys.readouterr().out
    assert library(capsys)["lora-detailer-il.safetensors"]["civitai_model_id"] == 1231943
    authorized = [hit for hit in civitai.hits("/api/download/models/") if "authorization" in hit.headers]
    assert authorized and civitai.token not in capsys.readouterr().err


def test_a_removed_model_fails_alone_and_says_so(civitai, capsys):
    publish(civitai, AESTHETIC)  # Detailer IL is gone from CivitAI: its model id answers 404
    assert main(["setup", "--only", "lora-detailer-il", "lora-aesthetic-quality"]) == 1
    captured = capsys.readouterr()
    assert "lora-aesthetic-quality: imported" in captured.out
    assert "error: CIVITAI_NOT_FOUND: 1 of 2 LoRAs failed (lora-detailer-il)." in captured.err
    assert set(library(capsys)) == {"lora-aesthetic-quality.safetensors"}


def test_plain_setup_leaves_the_starters_alone_and_names_the_missing_ones(civitai, fake_hub, capsys):
    publish(civitai, AESTHETIC)
    assert main(["setup"]) == 0
    assert "toolbox setup --only lora-aesthetic-quality lora-detailer-il" in capsys.readouterr().out
    assert not civitai.hits("/api/")  # optional: nothing fetched unless named
    assert main(["setup", "--only", "lora-aesthetic-quality"]) == 0
    assert main(["setup"]) == 0
    out = capsys.readouterr().out
    assert "All requested base models are present." in out and out.rstrip().endswith("--only lora-detailer-il")


def test_unknown_keys_name_the_starters_too(capsys):
    assert main(["setup", "--only", "lora-nonsense"]) == 2
    assert "lora-aesthetic-quality" in capsys.readouterr().err


# ------------------------------------------------------------ /setup


@pytest.fixture
async def bot(civitai, make_toolbox_bot, fast_progress):
    return await make_toolbox_bot()


def admin():
    """One of the bot's operators, who alone add the recommended LoRAs (and an admin of this server)."""
    interaction = fake_interaction(admin=True, operator=True)
    interaction.channel = MagicMock()
    interaction.channel.is_nsfw = lambda: False
    return interaction


async def open_panel(bot) -> dict:
    interaction = admin()
    cog = bot.get_cog("Setup")
    await type(cog).setup.callback(cog, interaction)
    return interaction.edit_original_response.await_args.kwargs


def add_buttons(view) -> dict:
    # By attribute: loading the extension imports cogs.setup afresh, so its classes are not the ones imported here.
    return {item.starter.key: item for item in view.children if hasattr(item, "starter")}


async def test_the_panel_lists_the_starters_and_adds_one_with_live_progress(bot, civitai):
    publish(civitai, AESTHETIC)
    panel = await open_panel(bot)
    assert "**Recommended LoRAs** (optional" in panel["content"]
    assert "<https://civitai.com/models/929497>" in panel["content"] and "not installed" in panel["content"]
    buttons = add_buttons(panel["view"])
    assert set(buttons) == set(STARTER_LORAS)
    assert not civitai.hits("/api/")  # nothing asked of CivitAI before a button is pressed

    clicker = admin()
    await asyncio.wait_for(buttons["lora-aesthetic-quality"].callback(clicker), timeout=30)
    assert clicker.response.defer.await_args.kwargs == {"thinking": True}  # its own message, not the panel's
    texts = [call.kwargs.get("content") for call in clicker.edit_original_response.await_args_list]
    assert any(text and "Adding Aesthetic Quality" in text for text in texts)  # the tracker's live progress
    final = clicker.edit_original_response.await_args.kwargs
    assert final["content"] == "✅ Imported:" and final["embed"].title == "Aesthetic Quality"

    panel = await open_panel(bot)
    assert "installed as `lora-aesthetic-quality.safetensors`" in panel["content"]
    assert set(add_buttons(panel["view"])) == {"lora-detailer-il"}


async def test_a_gated_starter_shows_the_token_hint_in_its_message(bot, civitai):
    publish(civitai, DETAILER, gated=True)
    clicker = admin()
    button = add_buttons((await open_panel(bot))["view"])["lora-detailer-il"]
    await asyncio.wait_for(button.callback(clicker), timeout=30)
    text = clicker.edit_original_response.await_args.kwargs["content"]
    assert "the bot's operator sets a CivitAI token in /setup → Set tokens" in text and "[[" not in text


@pytest.mark.parametrize("server_admin", [False, True])
async def test_only_operators_can_add(bot, civitai, server_admin):
    publish(civitai, AESTHETIC)
    button = add_buttons((await open_panel(bot))["view"])["lora-aesthetic-quality"]
    stranger = fake_interaction(admin=server_admin)
    await button.callback(stranger)
    assert "Only the bot's operators can" in stranger.response.send_message.await_args.args[0]
    assert not civitai.hits("/api/download/")
