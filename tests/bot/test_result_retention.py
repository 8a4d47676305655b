"""Result buttons on old results: their parameters kept as durable records for the server's retention,
set by its admins; pressed after it, a button answers privately and starts nothing; the sweep deletes
what is past it. Fake interactions on the real LocalBackend (files in the data dir)."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest

import bot.guild_settings as guild_settings
import bot.result_params as result_params
from bot.guild_settings import (
    GuildSettings,
    load_guild_settings,
    result_retention_days,
    save_guild_settings,
    update_guild_settings,
)
from bot.result_params import (
    DAY_SECONDS,
    RERUN_COMMANDS,
    keep_result_params,
    read_result_params,
    sweep_result_params,
)
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.records import create_job
from modal_services.jobs.requests import GenerateRequest
from modal_services.layout import local_records_dir
from modal_services.state.keys import (
    RESULT_PARAMS_PREFIXES,
    caption_prompt_key,
    generate_faces_key,
    generate_params_key,
    settings_lock_name,
    upscale_params_key,
)
from modal_services.state.locks import try_lock
from tests.bot.buttons import press as press_button
from tests.fakes.discord_fakes import ephemeral_error, fake_attachment, fake_interaction, fake_message, invoke
from tests.fakes.engines import StandInImageEngine
from tests.images import png_bytes

GUILD, OTHER_GUILD = 2002, 4004
REAL_TIME = time.time


@pytest.fixture
def engine(stand_in_engines):
    """Generate and upscale jobs on a stand-in SDXL engine (small one-colour images)."""
    return stand_in_engines.use(GenerateRequest, StandInImageEngine(shrink=8, delay=0.02))


@pytest.fixture
async def toolbox_bot(make_toolbox_bot):
    bot = await make_toolbox_bot("cogs.caption", "cogs.upscale", "cogs.generate", "cogs.settings")
    bot.generations.previews.interval = 0.02
    return bot


@pytest.fixture
def clock(monkeypatch):
    """`clock.days_later(n)`: the result-params module's clock moved n days ahead of the real one."""
    def days_later(days: float) -> None:
        monkeypatch.setattr(result_params, "time", SimpleNamespace(time=lambda: REAL_TIME() + days * DAY_SECONDS))

    return SimpleNamespace(days_later=days_later)


def settings_command(bot, name: str):
    return bot.tree.get_command("settings").get_command(name)


def attachment_of(file) -> object:
    file.fp.seek(0)
    return fake_attachment(file.fp.read(), file.filename, "image/png")


async def job_ids(store) -> set[str]:
    return {key.split(":", 1)[1] for key in await store.keys("job:")}


async def forget_live_store(store) -> None:
    """What a Modal Dict that forgot everything leaves: nothing cached, only the files."""
    for key in await store.live.keys():
        await store.live.pop(key)


async def generated_result(bot, prompt: str = "a red fox"):
    """A /generate result: (job id, the message its buttons are under)."""
    interaction = fake_interaction()
    await invoke(bot, bot.tree.get_command("generate"), interaction, prompt, *([None] * 16))
    assert ephemeral_error(interaction) is None
    final = interaction.calls.edit_original_response.await_args.kwargs
    (job_id,) = await job_ids(bot.backend.store)
    return job_id, fake_message(*(attachment_of(file) for file in final["attachments"]))


async def press(bot, custom_id: str, message=None):
    click = fake_interaction()
    click.message, click.client = message or fake_message(), bot
    await press_button(custom_id, click)
    return click


async def test_generate_buttons_work_within_retention_and_answer_too_old_after(toolbox_bot, engine, fast_progress,
                                                                              clock):
    job_id, message = await generated_result(toolbox_bot)
    store = toolbox_bot.backend.store
    await forget_live_store(store)  # the buttons read their files

    clock.days_later(89)
    click = await press(toolbox_bot, f"toolbox:generate:reroll:{job_id}", message)
    assert ephemeral_error(click) is None and engine.generated[-1]["prompt"] == "a red fox"

    clock.days_later(91)  # past the default 90 days
    jobs, generated, upscaled = await job_ids(store), len(engine.generated), len(engine.upscaled)
    for action in ("u1", "v1", "reroll"):
        click = await press(toolbox_bot, f"toolbox:generate:{action}:{job_id}", message)
        assert ephemeral_error(click).endswith(
            "That result is too old to reuse (results are kept 90 days on this server); run /generate again.")
        assert click.calls.defer.await_count == 0
    assert await job_ids(store) == jobs and (len(engine.generated), len(engine.upscaled)) == (generated, upscaled)


async def test_a_retention_an_admin_sets_applies_to_upscale_buttons(toolbox_bot, engine, fast_progress, clock):
    admin = fake_interaction(admin=True)
    await invoke(toolbox_bot, settings_command(toolbox_bot, "results"), admin, 1)
    assert "Result buttons work for 1 day after the result" in admin.calls.send_message.await_args.args[0]
    assert admin.calls.send_message.await_args.kwargs["ephemeral"] is True

    interaction = fake_interaction()
    await invoke(toolbox_bot, toolbox_bot.tree.get_command("upscale"), interaction, fake_attachment(png_bytes(40, 30)),
                 2.0, "a fox", *([None] * 7), 0.4, 99)
    (job_id,) = await job_ids(toolbox_bot.backend.store)
    result, source = interaction.calls.edit_original_response.await_args.kwargs["attachments"]
    message = fake_message(attachment_of(result), attachment_of(source))

    clock.days_later(0.5)
    click = await press(toolbox_bot, f"toolbox:upscale:again:{job_id}", message)
    assert ephemeral_error(click) is None and engine.upscaled[-1]["seed"] == 99

    clock.days_later(1.5)
    upscaled = len(engine.upscaled)
    for action in ("again", "vary"):
        click = await press(toolbox_bot, f"toolbox:upscale:{action}:{job_id}", message)
        assert ephemeral_error(click).endswith(
            "That result is too old to reuse (results are kept 1 day on this server); run /upscale again.")
    assert len(engine.upscaled) == upscaled


async def test_a_caption_too_old_to_generate_from_names_caption(toolbox_bot, engine, clock):
    clock.days_later(-100)
    await keep_result_params(toolbox_bot.backend.store, caption_prompt_key("abc123"), "1girl, castle", GUILD)
    clock.days_later(0)
    click = await press(toolbox_bot, "toolbox:caption-generate:abc123")
    assert "run /caption again" in ephemeral_error(click) and engine.generated == []


async def test_only_admins_set_the_retention_and_bad_values_are_refused(toolbox_bot):
    store = toolbox_bot.backend.store
    member = fake_interaction(admin=False)
    await invoke(toolbox_bot, settings_command(toolbox_bot, "results"), member, 1)
    assert "Only this server's admins" in ephemeral_error(member)
    for days in (0, -3, 3651):
        admin = fake_interaction(admin=True)
        await invoke(toolbox_bot, settings_command(toolbox_bot, "results"), admin, days)
        assert ephemeral_error(admin).endswith(f"The result retention (days) must be between 1 and 3650 (got {days}).")
    assert (await load_guild_settings(store, GUILD)).result_retention_days == 90
    # A value stored out of bounds (by hand, or by an older version) reads as the default.
    await store.put("settings:2002", {"result_retention_days": 0, "user_cap": 3})
    settings = await load_guild_settings(store, GUILD)
    assert (settings.result_retention_days, settings.user_cap) == (90, 3)

    admin = fake_interaction(admin=True)
    await invoke(toolbox_bot, settings_command(toolbox_bot, "show"), admin)
    assert "Result buttons work for 90 days after the result" in admin.calls.send_message.await_args.args[0]


async def test_two_admins_changing_settings_at_once_both_keep_their_change(toolbox_bot):
    store = toolbox_bot.backend.store
    first, second = fake_interaction(admin=True, user_id=1), fake_interaction(admin=True, user_id=2)
    await asyncio.gather(
        invoke(toolbox_bot, settings_command(toolbox_bot, "results"), first, 7),
        invoke(toolbox_bot, settings_command(toolbox_bot, "defaults"), second, None, None, None, 4, 20),
    )
    saved = await load_guild_settings(store, GUILD)
    assert (saved.result_retention_days, saved.user_cap, saved.guild_cap) == (7, 4, 20)

    # Many at once, each a different change read from the settings as they are when it runs.
    await asyncio.gather(*(update_guild_settings(store, GUILD, lambda s, word=word: s.changed(
        refused_words=[*s.refused_words, word])) for word in ("a", "b", "c", "d", "e")))
    assert sorted((await load_guild_settings(store, GUILD)).refused_words) == ["a", "b", "c", "d", "e"]

    # A change that is refused saves nothing and leaves the lock free for the next.
    with pytest.raises(ToolboxError):
        await update_guild_settings(store, GUILD, lambda s: s.changed(user_cap=99))
    await update_guild_settings(store, GUILD, lambda s: s.changed(user_cap=5))
    assert (await load_guild_settings(store, GUILD)).user_cap == 5


async def test_a_change_waiting_on_a_held_settings_lock_gives_up_clearly(toolbox_bot, monkeypatch):
    store = toolbox_bot.backend.store
    monkeypatch.setattr(guild_settings, "SETTINGS_LOCK_WAIT_SECONDS", 0.2)
    assert await try_lock(store, settings_lock_name(GUILD), "another admin's change")
    admin = fake_interaction(admin=True)
    await invoke(toolbox_bot, settings_command(toolbox_bot, "results"), admin, 7)
    assert "Another change to this server's settings is being saved" in ephemeral_error(admin)
    assert (await load_guild_settings(store, GUILD)).result_retention_days == 90
    other = await update_guild_settings(store, OTHER_GUILD, lambda s: s.changed(result_retention_days=7))
    assert other.result_retention_days == 7  # the lock is one server's only


def _result_file(bot, key: str):
    prefix, name = key.split(":", 1)
    return local_records_dir(bot.settings.data_dir) / "results" / prefix / f"{name}.json"


async def test_the_sweep_deletes_records_past_their_servers_retention(toolbox_bot, clock):
    store = toolbox_bot.backend.store
    await save_guild_settings(store, OTHER_GUILD, GuildSettings(result_retention_days=1))
    clock.days_later(-2)
    two_days_old = {prefix + "0a0a": (GUILD, prefix) for prefix in RESULT_PARAMS_PREFIXES}
    two_days_old |= {prefix + "0b0b": (OTHER_GUILD, prefix) for prefix in RESULT_PARAMS_PREFIXES}
    for key, (guild, value) in two_days_old.items():
        await keep_result_params(store, key, value, guild)
    clock.days_later(-91)
    await keep_result_params(store, generate_params_key("0c0c"), {"prompt": "old"}, GUILD)
    clock.days_later(0)
    await keep_result_params(store, upscale_params_key("0d0d"), {"prompt": "new"}, OTHER_GUILD)
    assert _result_file(toolbox_bot, generate_params_key("0c0c")).exists()

    await toolbox_bot._sweep_old_results()  # what the bot does at its start

    gone = [key for key in two_days_old if key.endswith("0b0b")] + [generate_params_key("0c0c")]
    for key in gone:
        assert not _result_file(toolbox_bot, key).exists() and await store.get(key) is None
    await forget_live_store(store)
    assert sorted(await store.keys("upscale:")) == [upscale_params_key("0a0a"), upscale_params_key("0d0d")]
    kept = [key for key in two_days_old if key.endswith("0a0a")]
    assert [await read_result_params(store, key, GUILD, result_retention_days) for key in kept] == list(RESULT_PARAMS_PREFIXES)


async def test_params_kept_before_stamping_count_as_kept_now(toolbox_bot, clock):
    store = toolbox_bot.backend.store
    await save_guild_settings(store, GUILD, GuildSettings(result_retention_days=3))
    job = await create_job(store, "generate", owner={"user_id": 1001, "guild_id": GUILD})
    legacy = {generate_params_key(job.id): {"prompt": "a fox", "steps": 30}, generate_faces_key(job.id): {"face": None},
              upscale_params_key("0e0e"): {"scale": 2.0}, caption_prompt_key("0f0f"): "1girl"}
    for key, value in legacy.items():
        await store.put(key, value)  # as an earlier version wrote them: the bare parameters

    clock.days_later(1000)
    # Made on the job's server while its record is kept; no server's (a DM's) once it is gone.
    made_on = {generate_params_key(job.id): GUILD, generate_faces_key(job.id): GUILD}
    for key, value in legacy.items():
        assert await read_result_params(store, key, made_on.get(key), result_retention_days) == value  # never too old at once
    with pytest.raises(ToolboxError) as elsewhere:
        await read_result_params(store, generate_params_key(job.id), OTHER_GUILD, result_retention_days)
    assert elsewhere.value.code is ErrorCode.PERMISSION_DENIED
    assert await sweep_result_params(store, result_retention_days) == 0
    stamped = json.loads(_result_file(toolbox_bot, generate_params_key(job.id)).read_text())
    assert stamped["params"] == legacy[generate_params_key(job.id)] and stamped["guild_id"] == GUILD
    assert json.loads(_result_file(toolbox_bot, caption_prompt_key("0f0f")).read_text())["guild_id"] is None

    # From the sweep that stamped them, each counts its server's retention (the default where the job is gone).
    clock.days_later(1004)
    with pytest.raises(ToolboxError) as caught:
        await read_result_params(store, generate_params_key(job.id), GUILD, result_retention_days)
    assert caught.value.code is ErrorCode.INVALID_INPUT and "kept 3 days" in caught.value.message
    assert await sweep_result_params(store, result_retention_days) == 2
    assert [await store.get(key) is None for key in legacy] == [True, True, False, False]


def test_every_kind_of_result_names_the_command_that_makes_it_again():
    assert set(RERUN_COMMANDS) == set(RESULT_PARAMS_PREFIXES)
    assert "run /generate again" in result_params.too_old_message(generate_faces_key("ab"), 5)

