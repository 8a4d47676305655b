"""Who may change what: the bot's operators (what every server shares), a server's admins (their
server, and imports where the operators allow them), members (neither). Each action is tried by each
role, and across two servers: an admin of server B reaches nothing of server A's, and a button's
custom id forged with a job id of server A's does nothing when pressed in server B."""

from __future__ import annotations

from unittest.mock import AsyncMock, MagicMock

import discord
import pytest

from bot.guild_settings import GuildSettings, load_guild_settings, save_guild_settings
from bot.permissions import is_operator
from bot.settings import Settings
from cogs.setup import SetupPanel, ToggleOptionalButton, TokensForm
from modal_services.base_models.optional_models import enabled_record
from modal_services.base_models.registry import optional_entries
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.records import create_job
from modal_services.jobs.requests import GenerateRequest
from modal_services.library.entries import DEFAULT_CHECKPOINT, LibraryEntry
from modal_services.state.keys import cancel_key
from tests.bot.buttons import press as press_button
from tests.fakes.discord_fakes import (
    APPLICATION_OWNER_ID,
    ephemeral_error,
    fake_attachment,
    fake_interaction,
    fake_message,
    invoke,
)
from tests.fakes.civitai_server import FakeCivitai
from tests.fakes.engines import StandInImageEngine

GUILD_A, GUILD_B = 2002, 5005
OPERATOR, ADMIN, MEMBER = 7001, 7002, 7003
ROLES = ("operator", "admin", "member")
CIVITAI_TOKEN = "civitai-token-0123456789a1b2"
OPERATORS_ONLY = "Only the bot's operators"
ADMINS_ONLY = "Only this server's admins"


@pytest.fixture
def civitai(monkeypatch):
    server = FakeCivitai().start()
    monkeypatch.setenv("CIVITAI_API_BASE", server.base)
    yield server
    server.stop()


@pytest.fixture
async def toolbox_bot(make_toolbox_bot, civitai):
    return await make_toolbox_bot("cogs.setup", "cogs.models", "cogs.settings", "cogs.caption", "cogs.upscale",
                                  "cogs.generate")


def person(role: str, guild_id: int | None = GUILD_A, user_id: int | None = None):
    """An operator (who is not an admin of this server), an admin of it, or a member."""
    default_id = {"operator": OPERATOR, "admin": ADMIN, "member": MEMBER}[role]
    inter = fake_interaction(user_id=user_id or default_id, guild_id=guild_id, admin=role == "admin",
                             operator=role == "operator")
    inter.channel = MagicMock()
    inter.channel.is_nsfw = lambda: False
    return inter


def models_command(bot, name: str):
    return bot.tree.get_command("models").get_command(name)


def settings_command(bot, name: str):
    return bot.tree.get_command("settings").get_command(name)


def library(bot):
    return bot.get_cog("Models").library


async def add_entry(bot, file: str, kind: str = "lora", **fields) -> LibraryEntry:
    path = library(bot).folder(kind) / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return await library(bot).add(LibraryEntry(name=file.removesuffix(".safetensors"), file=file, type=kind, **fields))


def said(inter) -> str:
    """Everything the person was answered, privately or not."""
    texts = [call.args[0] if call.args else call.kwargs.get("content") or ""
             for method in (inter.calls.send_message, inter.calls.followup_send, inter.calls.edit_original_response)
             for call in method.await_args_list]
    return "\n".join(text for text in texts if text)


# ------------------------------------------------------------ who is an operator


async def test_operators_are_the_applications_owner_and_the_configured_ids(toolbox_bot, monkeypatch):
    owner = fake_interaction(user_id=APPLICATION_OWNER_ID)
    owner.client = toolbox_bot
    assert await is_operator(owner)  # discord.py's owner (or team) check
    stranger = fake_interaction(user_id=OPERATOR, admin=True)
    stranger.client = toolbox_bot
    assert not await is_operator(stranger)  # a server's Administrator is not an operator

    monkeypatch.setenv("TOOLBOX_OPERATOR_IDS", f" {OPERATOR}, 1234 ")
    toolbox_bot.settings = Settings.load()
    assert toolbox_bot.settings.operator_ids == (OPERATOR, 1234)
    assert await is_operator(stranger)
    in_a_dm = fake_interaction(user_id=OPERATOR, guild_id=None)
    in_a_dm.client = toolbox_bot
    assert await is_operator(in_a_dm)


async def test_discord_not_answering_lets_no_one_in_but_the_configured_ids():
    inter = fake_interaction(user_id=OPERATOR)
    inter.client.is_owner = AsyncMock(side_effect=discord.HTTPException(MagicMock(status=503), "unavailable"))
    assert not await is_operator(inter)
    inter.client.settings.operator_ids = (OPERATOR,)
    assert await is_operator(inter)


@pytest.mark.parametrize("value", ["12,abc", "-3", "1;2", "12 34"])
def test_a_bad_operator_id_is_a_clear_error(value):
    with pytest.raises(ToolboxError) as caught:
        Settings.load({"TOOLBOX_OPERATOR_IDS": value}, env_file="/nonexistent/.env")
    assert caught.value.code is ErrorCode.INVALID_INPUT and "TOOLBOX_OPERATOR_IDS" in caught.value.message


# ------------------------------------------------------------ /models: the shared library


async def test_shared_library_changes_are_the_operators(toolbox_bot):
    """Edit and delete a shared entry, switch the deployment's checkpoint, scan: operators only."""
    await add_entry(toolbox_bot, "armor.safetensors")
    await add_entry(toolbox_bot, "noob.safetensors", kind="checkpoint")
    actions = {
        "edit": {"name": "armor", "weight": 0.5},
        "delete": {"name": "armor"},
        "checkpoint": {"name": "noob.safetensors"},
        "scan": {},
    }
    for name, kwargs in actions.items():
        for role in ("admin", "member"):
            inter = person(role)
            await invoke(toolbox_bot, models_command(toolbox_bot, name), inter, **kwargs)
            assert OPERATORS_ONLY in ephemeral_error(inter), (name, role)
            inter.response.defer.assert_not_awaited()
    assert (await library(toolbox_bot).find("armor")).weight is None
    assert (await library(toolbox_bot).active_checkpoint())["key"] == DEFAULT_CHECKPOINT

    edit = person("operator")
    await invoke(toolbox_bot, models_command(toolbox_bot, "edit"), edit, **actions["edit"])
    assert said(edit) == "✅ Updated:" and (await library(toolbox_bot).find("armor")).weight == 0.5
    delete = person("operator")
    await invoke(toolbox_bot, models_command(toolbox_bot, "delete"), delete, **actions["delete"])
    assert "Delete **armor**" in delete.calls.send_message.await_args.args[0]
    switch = person("operator", guild_id=None)  # from a DM too
    await invoke(toolbox_bot, models_command(toolbox_bot, "checkpoint"), switch, **actions["checkpoint"])
    assert ephemeral_error(switch) is None and (await library(toolbox_bot).active_checkpoint())["file"] == "noob.safetensors"
    scan = person("operator")
    await invoke(toolbox_bot, models_command(toolbox_bot, "scan"), scan)
    assert "Library scan" in said(scan)


async def test_imports_need_an_operator_until_the_operators_allow_a_server(toolbox_bot, civitai):
    store = toolbox_bot.backend.store
    attachment = fake_attachment(b"not a model", filename="mine.safetensors", content_type="application/octet-stream")
    choice = discord.app_commands.Choice(name="LoRA", value="lora")
    for role in ("admin", "member"):
        for name, kwargs in (("import", {"source": "1"}), ("upload", {"file": attachment, "type": choice})):
            inter = person(role)
            await invoke(toolbox_bot, models_command(toolbox_bot, name), inter, **kwargs)
            assert f"{OPERATORS_ONLY} can add models here" in ephemeral_error(inter), (role, name)
            inter.response.defer.assert_not_awaited()

    # A server's admin cannot allow their own server; an operator can, from that server.
    admin = person("admin")
    await invoke(toolbox_bot, settings_command(toolbox_bot, "imports"), admin, True)
    assert f"{OPERATORS_ONLY} can let a server's admins import models" in ephemeral_error(admin)
    assert not (await load_guild_settings(store, GUILD_A)).imports_allowed
    operator = person("operator")
    await invoke(toolbox_bot, settings_command(toolbox_bot, "imports"), operator, True)
    assert "This server's admins may import" in operator.calls.send_message.await_args.args[0]
    assert (await load_guild_settings(store, GUILD_A)).imports_allowed
    assert not (await load_guild_settings(store, GUILD_B)).imports_allowed

    # Now server A's admins may (the preview of the import is shown), its members still may not, and
    # server B is as it was.
    civitai.add_model(1, 11, b"x")
    allowed = person("admin")
    await invoke(toolbox_bot, models_command(toolbox_bot, "import"), allowed, source="1")
    assert ephemeral_error(allowed) is None and "Import this lora" in said(allowed)
    member = person("member")
    await invoke(toolbox_bot, models_command(toolbox_bot, "import"), member, source="1")
    assert f"{ADMINS_ONLY} can add models" in ephemeral_error(member)
    other = person("admin", guild_id=GUILD_B)
    await invoke(toolbox_bot, models_command(toolbox_bot, "import"), other, source="1")
    assert f"{OPERATORS_ONLY} can add models here" in ephemeral_error(other)


async def test_a_servers_admins_change_only_what_their_server_imported(toolbox_bot):
    await add_entry(toolbox_bot, "theirs.safetensors", imported_by_guild=GUILD_A)
    other_admin = person("admin", guild_id=GUILD_B)
    await invoke(toolbox_bot, models_command(toolbox_bot, "edit"), other_admin, name="theirs", weight=0.3)
    assert "operators (or the admins of the server that imported it) can edit theirs" in ephemeral_error(other_admin)
    other_admin = person("admin", guild_id=GUILD_B)
    await invoke(toolbox_bot, models_command(toolbox_bot, "delete"), other_admin, name="theirs")
    assert "operators (or the admins of the server that imported it) can delete theirs" in ephemeral_error(other_admin)
    member = person("member")
    await invoke(toolbox_bot, models_command(toolbox_bot, "delete"), member, name="theirs")
    assert f"{ADMINS_ONLY} can delete the models this server imported" in ephemeral_error(member)
    assert (await library(toolbox_bot).find("theirs")).weight is None  # no edit above went through

    admin = person("admin")
    await invoke(toolbox_bot, models_command(toolbox_bot, "edit"), admin, name="theirs", weight=0.3)
    assert said(admin) == "✅ Updated:" and (await library(toolbox_bot).find("theirs")).weight == 0.3
    delete = person("admin")
    await invoke(toolbox_bot, models_command(toolbox_bot, "delete"), delete, name="theirs")
    assert "Delete **theirs**" in delete.calls.send_message.await_args.args[0]


@pytest.mark.slow  # the LoRA is checked for real on the worker
async def test_an_upload_by_an_allowed_admin_is_recorded_as_their_servers(toolbox_bot, civitai):
    pytest.importorskip("torch")
    from tests.fixtures import tiny_loras

    await save_guild_settings(toolbox_bot.backend.store, GUILD_A, GuildSettings(imports_allowed=True))
    civitai.files["mine.safetensors"] = tiny_loras.to_bytes(tiny_loras.sdxl_kohya())
    attachment = fake_attachment(civitai.files["mine.safetensors"], filename="mine.safetensors",
                                 content_type="application/octet-stream")
    attachment.url = f"{civitai.base}/files/mine.safetensors"
    admin = person("admin")
    await invoke(toolbox_bot, models_command(toolbox_bot, "upload"), admin, file=attachment,
                 type=discord.app_commands.Choice(name="LoRA", value="lora"))
    assert "✅ Added:" in said(admin)
    assert (await library(toolbox_bot).find("mine")).imported_by_guild == GUILD_A


# ------------------------------------------------------------ /setup: tokens, base models, optional models


async def test_setup_is_the_operators_and_read_only_for_a_servers_admins(toolbox_bot):
    store = toolbox_bot.backend.store
    await store.put("secret:civitai", {"token": CIVITAI_TOKEN, "user": "tester", "set_at": 0})
    setup = toolbox_bot.get_cog("Setup")

    member = person("member")
    await setup.setup.callback(setup, member)
    assert f"{OPERATORS_ONLY} (and, to look, this server's admins) can use /setup" in ephemeral_error(member)
    member.response.defer.assert_not_awaited()

    admin = person("admin", guild_id=GUILD_B)
    await setup.setup.callback(setup, admin)
    shown = admin.edit_original_response.await_args.kwargs
    assert shown["view"] is None and "Read-only" in shown["content"]
    assert "CivitAI: set" in shown["content"] and "a1b2" not in shown["content"] and "tester" not in shown["content"]

    operator = person("operator")
    await setup.setup.callback(setup, operator)
    shown = operator.edit_original_response.await_args.kwargs
    assert "Set tokens" in [item.label for item in shown["view"].children]
    assert "CivitAI: ••••a1b2 (tester)" in shown["content"]
    assert CIVITAI_TOKEN not in shown["content"]


@pytest.mark.parametrize("role", ["admin", "member"])
async def test_setups_buttons_refuse_everyone_but_operators(toolbox_bot, role):
    store = toolbox_bot.backend.store
    setup = toolbox_bot.get_cog("Setup")
    panel = SetupPanel(setup)
    for button in (panel.set_tokens, panel.download, panel.verify):
        inter = person(role)
        await button.callback(inter)
        assert OPERATORS_ONLY in ephemeral_error(inter), button
        inter.response.send_modal.assert_not_awaited()
        inter.response.defer.assert_not_awaited()
    form = TokensForm(setup)
    form.civitai._refresh_state(None, {"value": CIVITAI_TOKEN})
    submit = person(role)
    await form.on_submit(submit)
    assert f"{OPERATORS_ONLY} can set the API tokens" in ephemeral_error(submit)
    optional = optional_entries()[0]
    toggle = person(role)
    await ToggleOptionalButton(setup, optional, enabled=False).callback(toggle)
    assert f"{OPERATORS_ONLY} can enable optional models and accept their licences" in ephemeral_error(toggle)
    assert await store.get("secret:civitai") is None and await enabled_record(store, optional.key) is None
    assert await store.keys("job:") == []

    operator = person("operator")
    await ToggleOptionalButton(setup, optional, enabled=False).callback(operator)
    assert (await enabled_record(store, optional.key))["by"].endswith(f"({OPERATOR})")


# ------------------------------------------------------------ two servers


async def test_an_admin_of_another_server_neither_sees_nor_changes_this_ones_settings(toolbox_bot):
    store = toolbox_bot.backend.store
    await save_guild_settings(store, GUILD_A, GuildSettings(refused_words=["server-a-secret-word"], user_cap=3))
    other = person("admin", guild_id=GUILD_B)
    await invoke(toolbox_bot, settings_command(toolbox_bot, "show"), other)
    assert "server-a-secret-word" not in said(other) and "3 per member" not in said(other)
    other = person("admin", guild_id=GUILD_B)
    await invoke(toolbox_bot, settings_command(toolbox_bot, "safety"), other, None, None, None, "server-a-secret-word")
    assert "not on this server's list" in ephemeral_error(other)
    other = person("admin", guild_id=GUILD_B)
    await invoke(toolbox_bot, settings_command(toolbox_bot, "defaults"), other, user_cap=1)
    saved = await load_guild_settings(store, GUILD_A)
    assert saved.refused_words == ["server-a-secret-word"] and saved.user_cap == 3
    assert (await load_guild_settings(store, GUILD_B)).user_cap == 1


async def test_a_custom_id_forged_with_another_servers_job_does_nothing(toolbox_bot, stand_in_engines, fast_progress):
    engine = stand_in_engines.use(GenerateRequest, StandInImageEngine(shrink=8, delay=0.01))
    store = toolbox_bot.backend.store
    made = fake_interaction(guild_id=GUILD_A)
    await invoke(toolbox_bot, toolbox_bot.tree.get_command("generate"), made, "a red fox", *([None] * 16))
    (job_key,) = await store.keys("job:")
    job_id = job_key.split(":", 1)[1]
    generated = len(engine.generated)

    for action in ("reroll", "v1", "u1"):
        for guild_id in (GUILD_B, None):
            click = person("admin", guild_id=guild_id)
            click.message, click.client = fake_message(), toolbox_bot
            await press_button(f"toolbox:generate:{action}:{job_id}", click)
            assert ephemeral_error(click).endswith("That result's buttons work only where it was made.")
            click.response.defer.assert_not_awaited()
    assert await store.keys("job:") == [job_key] and len(engine.generated) == generated

    same_server = person("member", guild_id=GUILD_A)
    same_server.message, same_server.client = fake_message(), toolbox_bot
    await press_button(f"toolbox:generate:reroll:{job_id}", same_server)
    assert ephemeral_error(same_server) is None and len(await store.keys("job:")) == 2


async def test_cancel_refuses_another_servers_job(toolbox_bot):
    store = toolbox_bot.backend.store
    job = await create_job(store, "caption", owner={"user_id": MEMBER, "guild_id": GUILD_A})
    for stranger in (person("admin", guild_id=GUILD_B, user_id=ADMIN), person("member", user_id=MEMBER + 1)):
        stranger.client = toolbox_bot
        await press_button(f"toolbox:cancel:{job.id}", stranger)
        assert "Only the person who started this job (or this server's admins)" in ephemeral_error(stranger)
    assert await store.get(cancel_key(job.id)) is None

    admin = person("admin")
    admin.client = toolbox_bot
    await press_button(f"toolbox:cancel:{job.id}", admin)
    assert ephemeral_error(admin) == "Stopping the job at its next step…"
    assert await store.get(cancel_key(job.id)) is not None
