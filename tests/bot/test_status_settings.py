"""/status, /cancel and /settings with fake interactions."""

from __future__ import annotations

from types import SimpleNamespace
from unittest.mock import MagicMock

import modal
import pytest
from discord import app_commands

from bot.backend import ModalBackend
from bot.guild_settings import GuildSettings, load_guild_settings
from bot.settings import Settings
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.records import JobStatus, create_job, load_job, update_job
from tests.fakes.discord_fakes import ephemeral_error, fake_interaction, invoke
from tests.fakes.modal_fakes import FakeModalDict, fake_volumes


@pytest.fixture
async def toolbox_bot(make_toolbox_bot):
    return await make_toolbox_bot()


def command(toolbox_bot, path: str):
    return toolbox_bot.tree.get_command(path.split()[0]) if " " not in path else \
        toolbox_bot.tree.get_command(path.split()[0]).get_command(path.split()[1])


def reply(interaction) -> str:
    if interaction.calls.edit_original_response.await_count:
        return interaction.calls.edit_original_response.await_args.kwargs["content"]
    return interaction.calls.send_message.await_args.args[0]


async def test_every_cog_registers_its_commands(toolbox_bot):
    names = {cmd.name for cmd in toolbox_bot.tree.get_commands()}
    assert {"caption", "setup", "models", "status", "cancel", "settings", "Caption image"} <= names


async def test_status_shows_queue_checkpoint_and_own_jobs(toolbox_bot):
    store = toolbox_bot.backend.store
    running = await create_job(store, "caption", owner={"user_id": 1001, "guild_id": 2002})
    await update_job(store, running.id, status=JobStatus.RUNNING, progress=0.4)
    await create_job(store, "caption", owner={"user_id": 5, "guild_id": 2002})
    mine_queued = await create_job(store, "caption", owner={"user_id": 1001, "guild_id": 2002})
    interaction = fake_interaction(user_id=1001)
    await invoke(toolbox_bot, command(toolbox_bot, "status"), interaction)
    text = reply(interaction)
    assert interaction.calls.defer.await_args.kwargs["ephemeral"] is True
    assert "caption: 1 running, 2 queued" in text
    assert "Illustrious" in text and "backend: local" in text
    assert f"`{running.id[:8]}` caption · running 40%" in text
    assert f"`{mine_queued.id[:8]}` caption · #2 in line" in text


async def test_status_on_modal_reports_warm_and_cold_services(monkeypatch):
    state = FakeModalDict()
    monkeypatch.setattr(modal.Dict, "from_name", lambda name, create_if_missing=False: state)
    fake_volumes(monkeypatch)
    warm = {"CaptionService.*": SimpleNamespace(num_total_runners=2, backlog=1)}

    def function_from_name(app_name, name):
        function = MagicMock()

        async def stats():
            return warm.get(name, SimpleNamespace(num_total_runners=0, backlog=0))

        function.get_current_stats.aio = stats
        return function

    monkeypatch.setattr(modal.Function, "from_name", function_from_name)
    monkeypatch.setenv("TOOLBOX_BACKEND", "modal")
    statuses = await ModalBackend(Settings.load()).service_status()
    assert statuses["CaptionService"] == "warm (2 containers, 1 waiting)"
    assert statuses["DownloadService"] == "scaled to zero"


async def test_cancel_latest_job_and_nothing_to_cancel(toolbox_bot, monkeypatch):
    monkeypatch.setattr("bot.tracker.SNAPSHOT_MAX_AGE", 0.0)
    interaction = fake_interaction(user_id=9)
    await invoke(toolbox_bot, command(toolbox_bot, "cancel"), interaction, None)
    assert "no jobs" in ephemeral_error(interaction)

    store = toolbox_bot.backend.store
    older = await create_job(store, "caption", owner={"user_id": 9})
    newer = await create_job(store, "caption", owner={"user_id": 9})
    interaction = fake_interaction(user_id=9)
    await invoke(toolbox_bot, command(toolbox_bot, "cancel"), interaction, None)
    assert (await load_job(store, newer.id)).status is JobStatus.CANCELLED
    assert (await load_job(store, older.id)).status is JobStatus.QUEUED

    choices = await toolbox_bot.get_cog("Jobs").cancel_autocomplete(fake_interaction(user_id=9), "")
    assert [choice.value for choice in choices] == [older.id]


async def test_settings_are_admin_only(toolbox_bot):
    interaction = fake_interaction(admin=False)
    await invoke(toolbox_bot, command(toolbox_bot, "settings defaults"), interaction, None, None, None, 5, None)
    assert "Only this server's admins" in ephemeral_error(interaction)
    assert (await load_guild_settings(toolbox_bot.backend.store, 2002)).user_cap == 2


async def test_admin_changes_defaults_and_caption_uses_them(toolbox_bot, monkeypatch):
    interaction = fake_interaction(admin=True)
    tags = app_commands.Choice(name="tags", value="tags")
    await invoke(toolbox_bot, command(toolbox_bot, "settings defaults"), interaction, tags, 3.0, 0.5, 3, 20)
    saved = await load_guild_settings(toolbox_bot.backend.store, 2002)
    assert (saved.default_caption_style, saved.default_upscale_scale, saved.user_cap, saved.guild_cap) == \
        ("tags", 3.0, 3, 20)
    assert "3 per member" in reply(interaction)

    interaction = fake_interaction(admin=True)
    await invoke(toolbox_bot, command(toolbox_bot, "settings defaults"), interaction, None, None, None, 20, 10)
    assert "cannot be above" in ephemeral_error(interaction)


async def test_admin_sets_the_generate_defaults(toolbox_bot):
    interaction = fake_interaction(admin=True)
    portrait = app_commands.Choice(name="2:3", value="2:3")
    await invoke(toolbox_bot, command(toolbox_bot, "settings defaults"), interaction,
                 None, None, None, None, None, portrait, 35, 7.5, "lowres, bad hands")
    saved = await load_guild_settings(toolbox_bot.backend.store, 2002)
    assert (saved.default_aspect, saved.default_steps, saved.default_cfg, saved.default_negative) == \
        ("2:3", 35, 7.5, "lowres, bad hands")
    assert "Generate: 2:3, 35 steps, CFG 7.5" in reply(interaction)
    interaction = fake_interaction(admin=True)
    await invoke(toolbox_bot, command(toolbox_bot, "settings defaults"), interaction,
                 None, None, None, None, None, None, None, None, "none")
    assert (await load_guild_settings(toolbox_bot.backend.store, 2002)).default_negative == ""


async def test_admin_makes_flux_the_servers_generate_model(toolbox_bot):
    interaction = fake_interaction(admin=True)
    flux = app_commands.Choice(name="FLUX.1-dev", value="flux")
    await invoke(toolbox_bot, command(toolbox_bot, "settings defaults"), interaction,
                 None, None, None, None, None, None, None, None, None, flux)
    assert (await load_guild_settings(toolbox_bot.backend.store, 2002)).default_model == "flux"
    assert "model FLUX.1-dev" in reply(interaction)
    with pytest.raises(ToolboxError) as caught:
        GuildSettings().changed(default_model="sd3")
    assert caught.value.code is ErrorCode.INVALID_INPUT and "sdxl" in caught.value.message


async def test_admin_restricts_roles_and_channels(toolbox_bot):
    role, channel = MagicMock(id=77), MagicMock(id=42)
    interaction = fake_interaction(admin=True)
    await invoke(toolbox_bot, command(toolbox_bot, "settings access"), interaction, role, None, channel, None, False)
    saved = await load_guild_settings(toolbox_bot.backend.store, 2002)
    assert saved.allowed_role_ids == [77] and saved.allowed_channel_ids == [42]

    interaction = fake_interaction(admin=True)
    await invoke(toolbox_bot, command(toolbox_bot, "settings access"), interaction, None, role, None, None, False)
    assert (await load_guild_settings(toolbox_bot.backend.store, 2002)).allowed_role_ids == []

    interaction = fake_interaction(admin=True)
    await invoke(toolbox_bot, command(toolbox_bot, "settings access"), interaction, None, None, None, None, True)
    assert (await load_guild_settings(toolbox_bot.backend.store, 2002)).allowed_channel_ids == []
