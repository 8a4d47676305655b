"""/models with fake interactions, through the local backend, against the fake CivitAI."""

from __future__ import annotations

import time
from unittest.mock import MagicMock

import discord
import pytest

from bot.permissions import is_admin
from cogs.models import Models
from modal_services.net.transfer import retrying
from modal_services.library.entries import LibraryEntry
from tests.fakes.civitai_server import FakeCivitai
from tests.fakes.discord_fakes import channel_spy, ephemeral_error, fake_attachment, fake_interaction, invoke
from tests.fixtures import tiny_loras

pytest.importorskip("torch")

LORA = tiny_loras.to_bytes(tiny_loras.sdxl_kohya())
OPERATOR, OTHER = 1001, 2002


@pytest.fixture
def civitai():
    server = FakeCivitai().start()
    yield server
    server.stop()


@pytest.fixture
async def bot(civitai, monkeypatch, make_toolbox_bot):
    monkeypatch.setenv("CIVITAI_API_BASE", civitai.base)
    monkeypatch.setattr(retrying, "wait_before_retry", lambda seconds, interrupt=None: None)
    return await make_toolbox_bot("cogs.models")


def cog(bot) -> Models:
    return bot.get_cog("Models")


def command(bot, name):
    return bot.tree.get_command("models").get_command(name)


def interaction(user_id=OPERATOR, operator=True, nsfw_channel=False):
    """One of the bot's operators (and the server's admin), or with `operator=False` a member."""
    inter = fake_interaction(user_id=user_id, admin=operator, operator=operator)
    inter.channel = MagicMock()
    inter.channel.is_nsfw = lambda: nsfw_channel
    return inter


def last_edit(inter) -> dict:
    return inter.edit_original_response.await_args.kwargs


async def press(view, item, inter):
    """What discord.py does with a click: the view's check, then the button's callback."""
    if await view.interaction_check(inter):
        await item.callback(inter)


async def add_entry(bot, file="a.safetensors", kind="lora", **fields):
    library = cog(bot).library
    path = library.folder(kind) / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return await library.add(LibraryEntry(name=fields.pop("name", file[:-12]), file=file, type=kind, **fields))


def test_the_group_and_its_options(bot):
    group = bot.tree.get_command("models")
    assert {c.name for c in group.commands} == {"import", "list", "info", "edit", "delete", "checkpoint", "upload", "scan"}
    assert command(bot, "info").parameters[0].autocomplete
    assert not is_admin(fake_interaction(admin=False))


async def test_import_preview_download_and_entry(bot, civitai):
    civitai.add_model(1, 11, LORA, trained_words=["detailed"], image_levels=(1,))
    inter = interaction()
    await invoke(bot, command(bot, "import"), inter, source="<https://civitai.com/models/1>")
    inter.response.defer.assert_awaited_once()
    preview = last_edit(inter)
    embed, view = preview["embed"], preview["view"]
    fields = {field.name: field.value for field in embed.fields}
    assert embed.title == "Detail Tweaker XL · v1.0"
    assert fields["Base model"] == "SDXL 1.0" and fields["Trigger words"] == "detailed" and "SafeTensor" in fields["Format"]
    assert "detail_tweaker_xl.safetensors" in fields["File"] and embed.thumbnail.url.endswith("11-0.jpeg")
    assert not civitai.hits("/storage/")  # nothing fetched before Download

    # Someone else presses Download: refused privately, nothing starts.
    stranger = interaction(user_id=OTHER)
    await press(view, view.confirm, stranger)
    assert stranger.response.send_message.await_args.kwargs["ephemeral"] is True
    assert not civitai.hits("/storage/")

    clicker = interaction()
    await press(view, view.confirm, clicker)
    final = last_edit(clicker)
    assert final["content"] == "✅ Imported:" and final["embed"].title == "Detail Tweaker XL"
    assert (cog(bot).library.folder("lora") / "detail_tweaker_xl.safetensors").is_file()
    progress_texts = [c.kwargs.get("content") for c in clicker.edit_original_response.await_args_list]
    assert any(text and "Importing Detail Tweaker XL" in text for text in progress_texts)
    # While it runs, the progress carries the Cancel button every job has (bot/tracker.py).
    views = [c.kwargs.get("view") for c in clicker.edit_original_response.await_args_list if c.kwargs.get("view")]
    assert any(item.custom_id.startswith("toolbox:cancel:") for view in views for item in view.children)
    assert final["view"] is None


async def test_nsfw_thumbnail_only_in_age_restricted_channels(bot, civitai):
    civitai.add_model(1, 11, LORA, nsfw=True)
    sfw = interaction()
    await invoke(bot, command(bot, "import"), sfw, source="1")
    assert last_edit(sfw)["embed"].thumbnail.url is None
    nsfw = interaction(nsfw_channel=True)
    await invoke(bot, command(bot, "import"), nsfw, source="1")
    assert last_edit(nsfw)["embed"].thumbnail.url


async def test_dms_count_as_not_age_restricted_for_thumbnails(bot):
    # The rule /generate and /upscale follow too: a DM is never age-restricted, whatever its channel says.
    await add_entry(bot, "spicy.safetensors", name="Spicy", nsfw=True, thumbnail_url="https://example.invalid/t.jpeg")
    for guild_id, shown in ((None, False), (2002, True)):
        inter = interaction(nsfw_channel=True)
        inter.guild_id = guild_id
        await invoke(bot, command(bot, "info"), inter, name="Spicy")
        assert bool(inter.response.send_message.await_args.kwargs["embed"].thumbnail.url) is shown


async def test_cancel_and_already_installed(bot, civitai):
    civitai.add_model(1, 11, LORA)
    inter = interaction()
    await invoke(bot, command(bot, "import"), inter, source="v:11")
    view = last_edit(inter)["view"]
    clicker = interaction()
    await press(view, view.cancel, clicker)
    assert clicker.response.edit_message.await_args.kwargs["content"] == "Cancelled."
    await add_entry(bot, "x.safetensors", civitai_version_id=11)
    again = interaction()
    await invoke(bot, command(bot, "import"), again, source="v:11")
    assert last_edit(again)["content"] == "Already installed:" and "view" not in last_edit(again)


async def test_library_verbs_refuse_members(bot):
    await add_entry(bot)
    for name, kwargs in (("import", {"source": "1"}), ("edit", {"name": "a", "weight": 0.5}), ("delete", {"name": "a"}),
                         ("checkpoint", {"name": "illustrious-xl"}), ("scan", {})):
        inter = interaction(operator=False)
        await invoke(bot, command(bot, name), inter, **kwargs)
        assert "Only the bot's operators" in ephemeral_error(inter), name
        inter.response.defer.assert_not_awaited()


async def test_bad_source_is_refused_before_deferring(bot):
    inter = interaction()
    await invoke(bot, command(bot, "import"), inter, source="https://example.com/x")
    assert "not a CivitAI link" in ephemeral_error(inter)
    inter.response.defer.assert_not_awaited()


async def test_refused_model_says_why(bot, civitai):
    civitai.add_model(1, 11, LORA, base_model="SD 1.5")
    inter = interaction()
    await invoke(bot, command(bot, "import"), inter, source="1")
    assert "SD 1.5" in ephemeral_error(inter)


async def test_list_pages_and_filters(bot):
    for i in range(12):
        await add_entry(bot, f"m{i:02}.safetensors", name=f"Model {i:02}", trigger_words=["shiny"] if i == 3 else [])
    await add_entry(bot, "ck.safetensors", kind="checkpoint", name="Checkpoint")
    inter = interaction(operator=False)
    await invoke(bot, command(bot, "list"), inter)
    text = inter.response.send_message.await_args.args[0]
    view = inter.response.send_message.await_args.kwargs["view"]
    assert "13 models · page 1/2" in text and "Model 00" in text and "Model 08" not in text
    stranger = interaction(user_id=OTHER)
    await press(view, view.next, stranger)
    stranger.response.edit_message.assert_not_awaited()
    await press(view, view.next, inter)
    assert "page 2/2" in inter.response.edit_message.await_args.kwargs["content"]
    search = interaction(operator=False)
    await invoke(bot, command(bot, "list"), search, query="shiny")
    assert "1 model · page 1/1" in search.response.send_message.await_args.args[0]
    typed = interaction(operator=False)
    choice = discord.app_commands.Choice(name="Checkpoint", value="checkpoint")
    await invoke(bot, command(bot, "list"), typed, type=choice)
    assert "Checkpoint" in typed.response.send_message.await_args.args[0]


async def test_autocomplete_is_bounded_and_fast(bot):
    for i in range(40):
        await add_entry(bot, f"m{i:02}.safetensors", name=f"Model {i:02}")
    started = time.perf_counter()
    choices = await cog(bot).name_autocomplete(interaction(), "model")
    assert len(choices) == 25 and time.perf_counter() - started < 1.0
    assert choices[0].value == "m00.safetensors"


async def test_info_edit_and_checkpoint(bot):
    await add_entry(bot, "ck.safetensors", kind="checkpoint", name="NoobAI")
    await add_entry(bot, "a.safetensors", name="Armor")
    inter = interaction(operator=False)
    await invoke(bot, command(bot, "info"), inter, name="Armor")
    assert inter.response.send_message.await_args.kwargs["embed"].title == "Armor"
    edit = interaction()
    await invoke(bot, command(bot, "edit"), edit, name="Armor", trigger_words="shiny, metal", weight=0.6)
    assert (await cog(bot).library.find("Armor")).trigger_words == ["shiny", "metal"]
    show = interaction(operator=False)
    await invoke(bot, command(bot, "checkpoint"), show)
    assert "Illustrious-XL" in show.response.send_message.await_args.args[0]
    switch = interaction()
    await invoke(bot, command(bot, "checkpoint"), switch, name="ck.safetensors")
    assert "NoobAI" in switch.response.send_message.await_args.args[0]
    refuse = interaction()
    await invoke(bot, command(bot, "delete"), refuse, name="NoobAI")
    assert "active checkpoint" in ephemeral_error(refuse)


async def test_delete_asks_then_deletes(bot):
    entry = await add_entry(bot, "a.safetensors", name="Armor")
    inter = interaction()
    await invoke(bot, command(bot, "delete"), inter, name="Armor")
    view = inter.response.send_message.await_args.kwargs["view"]
    stranger = interaction(user_id=OTHER)
    await press(view, view.confirm, stranger)
    assert cog(bot).library.path_of(entry).exists()
    clicker = interaction()
    await press(view, view.confirm, clicker)
    assert "Deleted **Armor**" in last_edit(clicker)["content"]
    assert not cog(bot).library.path_of(entry).exists() and await cog(bot).library.get("a.safetensors") is None


async def test_upload_an_attachment(bot, civitai):
    civitai.add_model(1, 11, LORA, trained_words=["detailed"])
    civitai.files["mine.safetensors"] = LORA
    attachment = fake_attachment(LORA, filename="mine.safetensors", content_type="application/octet-stream")
    attachment.url = f"{civitai.base}/files/mine.safetensors"
    inter = interaction()
    choice = discord.app_commands.Choice(name="LoRA", value="lora")
    await invoke(bot, command(bot, "upload"), inter, file=attachment, type=choice)
    assert last_edit(inter)["content"] == "✅ Added:"
    assert (await cog(bot).library.find("mine")).trigger_words == ["detailed"]
    pickle = interaction()
    await invoke(bot, command(bot, "upload"), pickle, file=fake_attachment(b"x", filename="x.ckpt"), type=choice)
    assert ".safetensors" in ephemeral_error(pickle)


async def test_scan_reports_untracked(bot):
    folder = cog(bot).library.folder("lora")
    folder.mkdir(parents=True)
    (folder / "stray.safetensors").write_bytes(b"x")
    inter = interaction()
    await invoke(bot, command(bot, "scan"), inter)
    assert "stray.safetensors" in last_edit(inter)["content"] and "adopt:True" in last_edit(inter)["content"]


async def test_a_long_import_finishes_in_its_message_after_the_interaction_token_died(bot, civitai, monkeypatch):
    civitai.add_model(1, 11, LORA)
    inter = interaction()
    await invoke(bot, command(bot, "import"), inter, source="v:11")
    view = last_edit(inter)["view"]
    monkeypatch.setattr("bot.tracker.INTERACTION_TOKEN_LIFETIME", 0)  # every edit from now on is "after 15 min"
    channel, message = channel_spy(bot)
    clicker = interaction()
    await press(view, view.confirm, clicker)
    assert message.edit.await_args.kwargs["content"] == "✅ Imported:"
    assert message.edit.await_args.kwargs["view"] is None
    clicker.edit_original_response.assert_not_awaited()


async def test_model_jobs_are_picked_up_again_after_a_restart(bot):
    import asyncio
    from modal_services.jobs.records import JobStatus, create_job, load_job, update_job

    store = bot.backend.store
    job = await create_job(store, "model_import", owner={"user_id": OPERATOR, "channel_id": 5, "message_id": 6},
                           meta={"title": "Importing Detail Tweaker XL"})
    await update_job(store, job.id, status=JobStatus.RUNNING)  # the bot went down mid-import
    channel, message = channel_spy(bot)
    assert await bot.tracker.resume() == 1
    for _ in range(200):
        if message.edit.await_count:
            break
        await asyncio.sleep(0.02)
    channel.get_partial_message.assert_called_with(6)
    assert "restarted" in message.edit.await_args.kwargs["content"]
    assert (await load_job(store, job.id)).delivered
