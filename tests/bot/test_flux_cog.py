"""/generate model:flux, with fake interactions on the real LocalBackend: Flux's defaults and refusals, the
server's default model, LoRAs of the chosen family only, and the U / V / Reroll buttons of a Flux image."""

from __future__ import annotations

from types import SimpleNamespace

import discord
import pytest

from bot.guild_settings import GuildSettings, save_guild_settings
from bot.library_options import model_lora_autocomplete
from modal_services.state.keys import manifest_key
from modal_services.library.entries import LibraryEntry, entry_key
from modal_services.base_models.optional_models import set_enabled
from tests.bot.buttons import press as press_button
from modal_services.jobs.requests import FluxGenerateRequest
from tests.fakes.discord_fakes import ephemeral_error, fake_attachment, fake_interaction, fake_message
from tests.images import png_bytes
from tests.fakes.engines import StandInImageEngine
from tests.bot.test_generate_cog import attachment_from, engine, final_edit, generate  # noqa: F401 (engine: a fixture)

FLUX = discord.app_commands.Choice(name="FLUX.1-dev", value="flux")


async def enable_flux(store) -> None:
    """FLUX.1-dev enabled by an admin and downloaded, as /setup leaves it."""
    await set_enabled(store, "flux1-dev", True, by="Ada (1)")
    await store.put(manifest_key("flux1-dev"), {"complete": True})


@pytest.fixture
def flux(stand_in_engines):
    """Flux's job kind: images a sixteenth of the requested size, one colour per seed, with the result's Flux fields."""
    return stand_in_engines.use(FluxGenerateRequest, StandInImageEngine(shrink=16))


@pytest.fixture
def sdxl(engine):
    """The SDXL stand-in serving generate and upscale jobs."""
    return engine


@pytest.fixture
async def toolbox_bot(make_toolbox_bot):
    bot = await make_toolbox_bot("cogs.caption", "cogs.upscale", "cogs.generate")
    store = bot.backend.store
    for name, family in (("Flux Detail", "flux"), ("SDXL Detail", "sdxl")):
        file = name.lower().replace(" ", "_") + ".safetensors"
        await store.put(entry_key(file), LibraryEntry(name=name, file=file, type="lora", family=family, weight=0.8,
                                                      trigger_words=["detailed"]).to_dict())
    await enable_flux(store)
    return bot


async def test_flux_gets_its_own_defaults_sizes_and_loras(toolbox_bot, flux, sdxl, fast_progress):
    await save_guild_settings(toolbox_bot.backend.store, 2002, GuildSettings(default_negative="lowres", default_cfg=7.0))
    interaction = fake_interaction()
    wide = discord.app_commands.Choice(name="16:9 2MP", value="16:9 2MP")
    await generate(toolbox_bot, interaction, "a lighthouse at dusk", model=FLUX, aspect=wide, count=2, seed=9,
                   lora1="Flux Detail")
    assert ephemeral_error(interaction) is None and sdxl.generated == []
    (request,) = flux.generated
    assert (request["width"], request["height"], request["count"], request["seed"]) == (1920, 1088, 2, 9)
    # Flux's guidance default, not the server's SDXL CFG; the server's SDXL negative prompt is not sent.
    assert request["guidance"] == 3.5 and request["negative_prompt"] == "" and request["steps"] == 28
    assert request["loras"] == [{"name": "Flux Detail", "file": "flux_detail.safetensors", "weight": 0.8,
                                 "trigger_words": ["detailed"]}]
    final = final_edit(interaction)
    assert "Flux" in final["content"] and "FLUX.1-dev" in final["content"] and "guidance 3.5" in final["content"]
    assert [file.filename for file in final["attachments"]] == ["image1.png", "image2.png"]
    assert len(final["view"].children) == 5  # U1 U2 V1 V2 Reroll


async def test_flux_refusals_come_before_a_job(toolbox_bot, flux, sdxl, fast_progress):
    interaction = fake_interaction()
    await generate(toolbox_bot, interaction, "a fox", model=FLUX, negative="blurry")
    assert "Flux has no negative prompt" in ephemeral_error(interaction)
    interaction = fake_interaction()
    await generate(toolbox_bot, interaction, "a fox", model=FLUX, lora1="SDXL Detail")
    assert "made for SDXL" in ephemeral_error(interaction)
    interaction = fake_interaction()
    await generate(toolbox_bot, interaction, "a fox", model=FLUX, cfg=12.0)
    assert "guidance must be between 1 and 10" in ephemeral_error(interaction)
    interaction = fake_interaction()
    await generate(toolbox_bot, interaction, "a fox", lora1="Flux Detail")  # SDXL, the default
    assert "made for Flux" in ephemeral_error(interaction)
    interaction = fake_interaction()
    await generate(toolbox_bot, interaction, "a fox", aspect=discord.app_commands.Choice(name="1:1 2MP", value="1:1 2MP"))
    assert "made by Flux only" in ephemeral_error(interaction)
    interaction = fake_interaction()
    await generate(toolbox_bot, interaction, "a fox", model=FLUX, face=fake_attachment(png_bytes(64, 64), "me.png"))
    assert "A face photo works with SDXL only" in ephemeral_error(interaction)
    assert flux.generated == [] and sdxl.generated == [] and await toolbox_bot.backend.store.keys("job:") == []


async def test_flux_not_enabled_or_not_downloaded_says_what_the_admin_does(toolbox_bot, flux, fast_progress):
    store = toolbox_bot.backend.store
    await store.put(manifest_key("flux1-dev"), {"complete": False})
    interaction = fake_interaction()
    await generate(toolbox_bot, interaction, "a fox", model=FLUX)
    assert "enabled but not downloaded yet" in ephemeral_error(interaction)
    await set_enabled(store, "flux1-dev", False, by="Ada (1)")
    interaction = fake_interaction()
    await generate(toolbox_bot, interaction, "a fox", model=FLUX)
    assert "FLUX.1-dev is not enabled: the bot's operator enables it in /setup" in ephemeral_error(interaction)
    assert flux.generated == [] and await store.keys("job:") == []


async def test_the_servers_default_model_is_used_when_none_is_chosen(toolbox_bot, flux, sdxl, fast_progress):
    await save_guild_settings(toolbox_bot.backend.store, 2002, GuildSettings(default_model="flux"))
    await generate(toolbox_bot, fake_interaction(), "a fox")
    assert len(flux.generated) == 1 and sdxl.generated == []
    sdxl_choice = discord.app_commands.Choice(name="SDXL", value="sdxl")
    await generate(toolbox_bot, fake_interaction(), "a fox", model=sdxl_choice)
    assert len(sdxl.generated) == 1


async def test_lora_autocomplete_follows_the_chosen_model(toolbox_bot):
    interaction = fake_interaction()
    interaction.client = toolbox_bot
    interaction.namespace = SimpleNamespace(model="flux")
    assert [choice.value for choice in await model_lora_autocomplete(interaction, "detail")] == ["flux_detail.safetensors"]
    interaction.namespace = SimpleNamespace()  # no model chosen yet: the server's default (SDXL)
    assert [choice.value for choice in await model_lora_autocomplete(interaction, "")] == ["sdxl_detail.safetensors"]
    await save_guild_settings(toolbox_bot.backend.store, 2002, GuildSettings(default_model="flux"))
    assert [choice.value for choice in await model_lora_autocomplete(interaction, "")] == ["flux_detail.safetensors"]


async def test_v_and_reroll_of_a_flux_image_stay_on_flux_and_u_upscales_without_its_loras(
        toolbox_bot, make_toolbox_bot, flux, sdxl, fast_progress):
    interaction = fake_interaction()
    await generate(toolbox_bot, interaction, "a red fox", model=FLUX, count=2, seed=7, cfg=2.5, lora1="Flux Detail")
    job_id = (await toolbox_bot.backend.store.keys("job:"))[0].split(":", 1)[1]
    message = fake_message(*(attachment_from(file) for file in final_edit(interaction)["attachments"]))
    restarted = await make_toolbox_bot("cogs.caption", "cogs.upscale", "cogs.generate")

    async def press(action):
        click = fake_interaction()
        click.message, click.client = message, restarted
        await press_button(f"toolbox:generate:{action}:{job_id}", click)
        return click

    assert ephemeral_error(await press("v2")) is None
    variation = flux.generated[-1]
    assert variation["image"].startswith(b"\x89PNG") and variation["guidance"] == 2.5 and variation["seed"] != 7
    assert variation["loras"][0]["file"] == "flux_detail.safetensors"
    await press("reroll")
    assert len(flux.generated) == 3 and flux.generated[-1]["image"] is None
    assert ephemeral_error(await press("u1")) is None
    upscale = sdxl.upscaled[-1]
    assert upscale["scale"] == 2.0 and upscale["prompt"] == "a red fox" and upscale["loras"] == []


async def test_a_flagged_flux_image_is_withheld_like_an_sdxl_one(toolbox_bot, flux, install_nsfw_classifier,
                                                                 fast_progress):
    install_nsfw_classifier("flags")
    interaction = fake_interaction()
    await generate(toolbox_bot, interaction, "a fox", model=FLUX)
    assert len(flux.generated) == 1
    final = final_edit(interaction)
    assert "flagged by this server's safety check" in final["content"] and not final["attachments"]
