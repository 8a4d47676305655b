"""A sampler chosen on each front end reaches the worker as the one table's name: Discord's /generate, /upscale,
/settings defaults and /models edit, `toolbox generate/upscale --sampler` (`models edit --sampler`: test_cli_models), and the API's generate
and upscale bodies. Refusals of an unknown sampler go through `GENERATE_REFUSALS` (test_front_ends_agree)."""

from __future__ import annotations

import asyncio
import base64

import pytest
from discord import app_commands

from bot.api.schema import GenerateImageRequest, UpscaleJob
from bot.cli.generate import generate_choices
from bot.cli.parser import build_parser
from bot.core.build import check_generate_choices
from bot.guild_settings import GuildSettings, load_guild_settings
from cogs.settings import CHECKPOINT_SAMPLER
from modal_services.jobs.requests import UpscaleRequest
from modal_services.jobs.samplers import NO_SAMPLER, SAMPLER_NAMES, unknown_sampler
from modal_services.library.entries import ACTIVE_CHECKPOINT_KEY, LibraryEntry, entry_key
from tests.api.test_api import served  # noqa: F401 (a fixture)
from tests.bot.test_generate_cog import engine  # noqa: F401 (a fixture)
from tests.core.test_front_ends_agree import run_cli
from tests.fakes.discord_fakes import ephemeral_error, fake_attachment, fake_interaction, invoke
from tests.images import png_bytes

GUILD = 2002
CHECKPOINT = LibraryEntry(name="Anime XL", file="anime.safetensors", type="checkpoint")


def choice(name: str) -> app_commands.Choice[str]:
    return app_commands.Choice(name=name, value=name)


def command(bot, *path):
    found = bot.tree.get_command(path[0])
    for name in path[1:]:
        found = found.get_command(name)
    return found


@pytest.fixture
async def toolbox_bot(make_toolbox_bot):
    bot = await make_toolbox_bot("cogs.upscale", "cogs.generate", "cogs.settings", "cogs.models")
    bot.generations.previews.interval = 0.02
    return bot


# ---------------------------------------------------------------- every name, everywhere it is written


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_name_round_trips_through_the_settings_the_api_bodies_and_the_cli(name):
    kept = GuildSettings().changed(default_sampler=name.upper()).to_dict()
    assert GuildSettings.from_dict(kept).default_sampler == name
    assert GenerateImageRequest.model_validate({"prompt": "a fox", "sampler": name.lower()}).sampler == name
    assert UpscaleJob.model_validate({"kind": "upscale", "image_base64": "aW1n", "sampler": name}).sampler == name
    args = build_parser().parse_args(["generate", "a fox", "--sampler", name])
    assert check_generate_choices(asyncio.run(generate_choices(args))).request.sampler == name


def test_a_stored_server_default_that_is_no_longer_a_sampler_falls_back_to_the_checkpoint_s():
    assert GuildSettings.from_dict({"default_sampler": "Heun", "default_steps": 30}).default_sampler is None


# ---------------------------------------------------------------- Discord


async def test_discord_generate_takes_the_asked_then_the_server_s_then_the_checkpoint_s(toolbox_bot, engine,  # noqa: F811
                                                                                       fast_progress):
    store = toolbox_bot.backend.store

    async def generate(**options) -> str:
        interaction = fake_interaction()
        await invoke(toolbox_bot, command(toolbox_bot, "generate"), interaction, "a fox", **options)
        assert ephemeral_error(interaction) is None
        assert engine.generated[-1]["sampler"] in interaction.calls.edit_original_response.await_args.kwargs["content"]
        return engine.generated[-1]["sampler"]

    assert await generate() == "Euler a"  # the base checkpoint's
    await store.put(entry_key(CHECKPOINT.file), {**CHECKPOINT.to_dict(), "sampler": "DDIM"})
    await store.put(ACTIVE_CHECKPOINT_KEY, CHECKPOINT.file)
    assert await generate() == "DDIM"  # the active checkpoint's own
    admin = fake_interaction(admin=True)
    await invoke(toolbox_bot, command(toolbox_bot, "settings", "defaults"), admin, sampler=choice("DPM++ 2M Karras"))
    assert (await load_guild_settings(store, GUILD)).default_sampler == "DPM++ 2M Karras"
    assert "sampler DPM++ 2M Karras" in admin.calls.send_message.await_args.args[0]
    assert await generate() == "DPM++ 2M Karras"  # the server's
    assert await generate(sampler=choice("UniPC")) == "UniPC"  # the member's
    # Back to each checkpoint's own.
    await invoke(toolbox_bot, command(toolbox_bot, "settings", "defaults"), fake_interaction(admin=True),
                 sampler=CHECKPOINT_SAMPLER)
    assert (await load_guild_settings(store, GUILD)).default_sampler is None
    assert await generate() == "DDIM"


async def test_discord_upscale_and_models_edit_take_a_sampler(toolbox_bot, engine, fast_progress):  # noqa: F811
    interaction = fake_interaction()
    await invoke(toolbox_bot, command(toolbox_bot, "upscale"), interaction, fake_attachment(png_bytes(64, 64), "a.png"),
                 sampler=choice("DPM++ SDE Karras"))
    assert ephemeral_error(interaction) is None and engine.upscaled[-1]["sampler"] == "DPM++ SDE Karras"

    library = toolbox_bot.get_cog("Models").library
    path = library.folder("checkpoint") / CHECKPOINT.file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    await library.add(LibraryEntry(**CHECKPOINT.to_dict()))
    operator = fake_interaction(admin=True, operator=True)
    await invoke(toolbox_bot, command(toolbox_bot, "models", "edit"), operator, "Anime XL",
                 sampler=choice("DPM++ 2M SDE Karras"))
    reply = operator.calls.send_message.await_args
    assert reply.args[0] == "✅ Updated:"
    assert {field.name: field.value for field in reply.kwargs["embed"].fields}["Sampler"] == "DPM++ 2M SDE Karras"
    assert (await library.get(CHECKPOINT.file)).sampler == "DPM++ 2M SDE Karras"
    await invoke(toolbox_bot, command(toolbox_bot, "models", "edit"), fake_interaction(admin=True, operator=True),
                 "Anime XL", sampler=choice(NO_SAMPLER))
    assert (await library.get(CHECKPOINT.file)).sampler is None


# ---------------------------------------------------------------- the CLI


def test_the_cli_generates_and_upscales_with_a_sampler(backends_from_settings, engine, tmp_path, capsys):  # noqa: F811
    status, err = run_cli(["generate", "a fox", "--sampler", "k_dpmpp_2m_ka", "-o", str(tmp_path / "fox.png")], capsys)
    assert status == 0, err
    assert engine.generated[-1]["sampler"] == "DPM++ 2M Karras"
    assert run_cli(["generate", "a fox", "-o", str(tmp_path / "fox.png")], capsys)[0] == 0
    assert engine.generated[-1]["sampler"] == "Euler a"

    picture = tmp_path / "in.png"
    picture.write_bytes(png_bytes(64, 64))
    status, err = run_cli(["upscale", str(picture), "--sampler", "ddim", "-o", str(tmp_path / "out.png")], capsys)
    assert status == 0, err
    assert engine.upscaled[-1]["sampler"] == "DDIM"

    assert run_cli(["upscale", str(picture), "--sampler", "Heun"], capsys) == (
        2, f"error: INVALID_INPUT: {unknown_sampler('Heun')}\n")


# ---------------------------------------------------------------- the HTTP API


async def test_the_api_generates_and_upscales_with_a_sampler(served, engine):  # noqa: F811
    client, backend = await served()
    response = await client.post("/generate-image", json={"prompt": "a fox", "sampler": "dpm++ sde karras"})
    assert response.status_code == 200, response.text
    assert response.json()["metadata"]["sampler"] == "DPM++ SDE Karras"
    assert engine.generated[-1]["sampler"] == "DPM++ SDE Karras"

    upscale = {"kind": "upscale", "image_base64": base64.b64encode(png_bytes(64, 64)).decode(), "sampler": "Euler a"}
    accepted = await client.post("/jobs", json=upscale)
    assert accepted.status_code in (200, 202), accepted.text
    for _ in range(200):
        if engine.upscaled:
            break
        await asyncio.sleep(0.02)
    assert UpscaleRequest.parse({**engine.upscaled[-1], "image": b"png"}).sampler == "Euler a"

    refused = await client.post("/jobs", json={**upscale, "sampler": "Heun"})
    assert refused.status_code == 400 and refused.json()["error"].endswith(unknown_sampler("Heun"))
    assert len(engine.upscaled) == 1
