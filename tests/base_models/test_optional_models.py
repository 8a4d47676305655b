"""Optional base models: enabled by an admin (accepting their terms) before any setup downloads them.

The engine against the fake hub (a gated repo answering 401/403), the /setup
panel's Enable/Disable buttons with fake interactions, and `toolbox setup --enable`.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from bot.cli import main
from cogs.setup import Setup, SetupPanel, ToggleOptionalButton
from modal_services.base_models import downloads
from modal_services.net.transfer import retrying
from modal_services.base_models.downloads import DownloadEngine
from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.state.keys import manifest_key
from modal_services.jobs.requests import DownloadRequest
from modal_services.layout import Layout
from modal_services.base_models.optional_models import enabled_models, require_enabled, set_enabled, setup_entries
from modal_services.base_models.registry import BASE_MODELS, HFSource, ModelEntry, Terms, resolve_keys
from modal_services.state.store import SqliteStore
from tests.fakes.discord_fakes import fake_interaction
from tests.fakes.hf_server import serve_registry
from tests.bot.test_setup_cog import bot  # noqa: F401 (a fixture: /setup's bot, on this module's hub)

GATED = ModelEntry(
    "big-gated", "Big Gated Model", HFSource("lab/big-gated", include=("config.json", "model.safetensors")),
    "big-gated", approx_bytes=5_000, needed_by=("big",),
    optional=Terms("Lab Non-Commercial Licence: research and personal use only", "https://hub.example/lab/big-gated",
                   gated=True),
)
HF_TOKEN = "hf_optionaltoken_5566778899"


@pytest.fixture
def hub(fake_hub, monkeypatch):
    """The fake hub serving the base set and the gated model, which `BASE_MODELS` now lists."""
    monkeypatch.setitem(BASE_MODELS, GATED.key, GATED)
    serve_registry(fake_hub, {GATED.key: GATED})
    monkeypatch.setattr(downloads, "TICK_SECONDS", 0.05)
    monkeypatch.setattr(retrying, "wait_before_retry", lambda seconds, interrupt=None: None)
    return fake_hub


@pytest.fixture
async def store(tmp_path):
    state = SqliteStore(tmp_path / "state.sqlite3")
    yield state
    await state.close()


def download(tmp_path, store, keys=()):
    engine = DownloadEngine(Layout(tmp_path / "models", tmp_path / "loras", store))
    engine.load()
    return asyncio.to_thread(engine.download, DownloadRequest(keys=list(keys)), lambda fraction, stage: None)


def gated_bodies(hub) -> list:
    return hub.body_requests("lab/big-gated")


async def test_the_base_set_leaves_optional_models_out_until_enabled(hub, store):
    assert GATED.key not in {entry.key for entry in resolve_keys(())}
    assert GATED.key not in {entry.key for entry in await setup_entries(store)}
    await set_enabled(store, GATED.key, True, by="Ada (1)")
    assert await enabled_models(store) == {GATED.key}
    assert GATED.key in {entry.key for entry in await setup_entries(store)}
    await set_enabled(store, GATED.key, False, by="Ada (1)")
    assert await enabled_models(store) == set()


async def test_only_optional_models_can_be_enabled(hub, store):
    with pytest.raises(ToolboxError) as caught:
        await set_enabled(store, "illustrious-xl", True, by="Ada (1)")
    assert caught.value.code is ErrorCode.INVALID_INPUT and "base set" in caught.value.message
    with pytest.raises(ToolboxError) as caught:
        await set_enabled(store, "no-such-model", True, by="Ada (1)")
    assert caught.value.code is ErrorCode.INVALID_INPUT and "Unknown model" in caught.value.message
    assert await enabled_models(store) == set()


async def test_download_missing_skips_a_model_nobody_enabled(hub, tmp_path, store):
    result = await download(tmp_path, store)
    assert GATED.key not in result and "illustrious-xl" in result
    assert gated_bodies(hub) == []


async def test_asking_for_a_model_nobody_enabled_is_refused_before_any_transfer(hub, tmp_path, store):
    with pytest.raises(ToolboxError) as caught:
        await download(tmp_path, store, [GATED.key])
    assert caught.value.code is ErrorCode.INVALID_INPUT and "not enabled" in caught.value.message
    assert hub.requests == [] and not (tmp_path / "models" / "big-gated").exists()


async def test_an_enabled_model_is_downloaded_and_then_required_models_pass(hub, tmp_path, store):
    await set_enabled(store, GATED.key, True, by="Ada (1)")
    with pytest.raises(ToolboxError) as caught:
        await require_enabled(store, GATED.key)
    assert caught.value.code is ErrorCode.MODELS_MISSING and "not downloaded yet" in caught.value.message
    result = await download(tmp_path, store)
    assert result[GATED.key] == "downloaded"
    assert (tmp_path / "models" / "big-gated" / "model.safetensors").is_file()
    await require_enabled(store, GATED.key)


async def test_require_enabled_names_the_admin_step(hub, store):
    with pytest.raises(ToolboxError) as caught:
        await require_enabled(store, GATED.key)
    assert caught.value.code is ErrorCode.MODELS_MISSING
    assert caught.value.message == f"Big Gated Model is not enabled: {remedies.enable(GATED.key)}."


@pytest.mark.parametrize("token, status", [(None, 401), (HF_TOKEN, 403)])
async def test_a_gated_refusal_says_to_accept_the_licence(hub, tmp_path, store, token, status):
    if token:
        await store.put("secret:hf", {"token": token, "user": "tester"})
    await set_enabled(store, GATED.key, True, by="Ada (1)")
    # As the hub answers for a gated repo: the model info is refused, with its error code.
    hub.fault("/api/models/lab/big-gated", "status", times=5, status=status, headers={"X-Error-Code": "GatedRepo"})
    with pytest.raises(ToolboxError) as caught:
        await download(tmp_path, store, [GATED.key])
    message = caught.value.message
    assert caught.value.code is ErrorCode.DOWNLOAD_FAILED
    assert "gated on Hugging Face" in message and "https://hub.example/lab/big-gated" in message
    assert ("no Hugging Face token is set" in message) == (token is None)
    assert ("refused the token" in message) == (token is not None)
    assert HF_TOKEN not in message
    record = await store.get("download:big-gated")
    assert record["status"] == "failed" and "accept its licence" in record["error"]


# -- /setup -------------------------------------------------------------------------

def toggle(view: SetupPanel) -> ToggleOptionalButton:
    """The big gated model's button (the registry's own optional models have theirs too)."""
    [button] = [item for item in view.children if isinstance(item, ToggleOptionalButton) and GATED.name in item.label]
    return button


async def test_panel_shows_the_terms_and_enabling_records_who(bot):
    cog = Setup(bot)
    panel = await cog.panel()
    text = panel["content"]
    assert "**Optional models**" in text and "Big Gated Model" in text and "not enabled" in text
    assert "Lab Non-Commercial Licence" in text and "<https://hub.example/lab/big-gated>" in text
    button = toggle(panel["view"])
    assert button.label == "Enable Big Gated Model"

    stranger = fake_interaction(admin=False)
    await button.callback(stranger)
    assert "Only the bot's operators can" in stranger.response.send_message.await_args.args[0]
    assert await enabled_models(bot.backend.store) == set()

    admin = fake_interaction(admin=True, operator=True, user_id=4242)
    await button.callback(admin)
    after = admin.edit_original_response.await_args.kwargs
    assert "Enabled **Big Gated Model**, accepting its terms" in after["content"]
    assert "(4242)" in after["content"] and "Download missing" in after["content"]
    assert toggle(after["view"]).label == "Disable Big Gated Model"
    record = await bot.backend.store.get("optional:big-gated")
    assert record["by"].endswith("(4242)") and record["at"] > 0


async def test_download_missing_includes_an_enabled_model_and_disable_leaves_files(bot):
    cog = Setup(bot)
    await toggle((await cog.panel())["view"]).callback(fake_interaction(admin=True, operator=True))
    interaction = fake_interaction(admin=True, operator=True)
    await asyncio.wait_for(SetupPanel(cog).download.callback(interaction), timeout=30)
    final = interaction.edit_original_response.await_args.kwargs["content"]
    count = len([entry for entry in BASE_MODELS.values() if entry.optional is None]) + 1  # the base set and GATED
    assert "All base models are ready" in final and f"{count}/{count} present" in final
    assert (await bot.backend.store.get(manifest_key(GATED.key)))["complete"]

    disabler = fake_interaction(admin=True, operator=True)
    await toggle((await cog.panel())["view"]).callback(disabler)
    assert "Disabled **Big Gated Model**" in disabler.edit_original_response.await_args.kwargs["content"]
    assert f"{count - 1}/{count - 1} present" in (await cog.panel())["content"]
    assert (bot.settings.models_dir / "big-gated" / "model.safetensors").is_file()


# -- toolbox setup ------------------------------------------------------------------

def test_cli_enable_downloads_and_status_shows_it(hub, tmp_path, capsys):
    assert main(["setup", "--enable", GATED.key]) == 0
    out = capsys.readouterr().out
    assert "Enabled Big Gated Model, accepting its terms: Lab Non-Commercial Licence" in out
    assert (tmp_path / "data" / "models" / "big-gated" / "model.safetensors").is_file()

    assert main(["status", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["optional_models"][GATED.key]["enabled"]["by"] == "`toolbox setup` on the command line"
    assert {model["key"]: model["state"] for model in document["models"]}[GATED.key] == "present"

    assert main(["setup", "--disable", GATED.key]) == 0
    assert "Disabled Big Gated Model" in capsys.readouterr().out
    assert main(["status"]) == 0
    assert "not enabled (toolbox setup --enable big-gated)" in capsys.readouterr().out


def test_cli_refuses_to_enable_a_base_model(hub, capsys):
    assert main(["setup", "--enable", "illustrious-xl"]) == 2
    assert "part of the base set" in capsys.readouterr().err
