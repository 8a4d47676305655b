"""Caps and queue positions, cancel buttons, the 15-minute token, restarts and dead workers."""

from __future__ import annotations

import asyncio
import time
from unittest.mock import MagicMock

import pytest

from bot.backend import LocalBackend
from bot.guild_settings import GuildSettings, save_guild_settings
from bot.settings import Settings
from bot.tracker import INTERACTION_TOKEN_LIFETIME, CancelJobButton, ReplyTarget
from modal_services.jobs.records import DEAD_JOB_MESSAGE, STALE_AFTER, Job, JobStatus, create_job, load_job, new_job_id, update_job
from modal_services.jobs.requests import (
    CaptionRequest,
    FluxGenerateRequest,
    GenerateRequest,
    ModelDeleteRequest,
    ModelImportRequest,
    ModelScanRequest,
    ModelUploadRequest,
    UpscaleRequest,
)
from tests.fakes.discord_fakes import channel_spy, ephemeral_error, fake_attachment, fake_interaction, invoke
from tests.images import png_bytes
from tests.fakes.engines import GatedCaptionEngine, SlowCaptionEngine


@pytest.fixture(autouse=True)
def fast(fast_progress, monkeypatch):
    monkeypatch.setattr("bot.tracker.SNAPSHOT_MAX_AGE", 0.0)


@pytest.fixture
async def toolbox_bot(make_toolbox_bot):
    return await make_toolbox_bot("cogs.caption")


async def caption(toolbox_bot, interaction, data=None):
    await invoke(toolbox_bot, toolbox_bot.tree.get_command("caption"), interaction,
                 fake_attachment(data or png_bytes()), None, None)


async def eventually(check, timeout: float = 10.0):
    """Poll an async or plain check until it is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.02)


async def job_in_line(toolbox_bot, user_id: int, guild_id: int = 2002):
    """A job someone already has, holding its slots as the job of an admitted command does."""
    tracker = toolbox_bot.tracker
    settings = await tracker.guild_settings(guild_id)
    job_id = new_job_id()
    slots, full = await tracker.slots.claim_all(job_id, tracker.scopes(fake_interaction(user_id, guild_id), settings))
    assert full is None
    owner = {"user_id": user_id, "guild_id": guild_id, "slots": slots}
    return await create_job(toolbox_bot.backend.store, "caption", owner=owner, job_id=job_id)


def edits(interaction) -> list[str]:
    return [call.kwargs.get("content") for call in interaction.calls.edit_original_response.await_args_list]


async def test_user_cap_refuses_with_places_in_line(toolbox_bot, stand_in_engines):
    stand_in_engines.use(CaptionRequest, SlowCaptionEngine())
    store = toolbox_bot.backend.store
    await job_in_line(toolbox_bot, 1)  # someone else's, ahead
    for _ in range(2):
        await job_in_line(toolbox_bot, 7)
    interaction = fake_interaction(user_id=7)
    await caption(toolbox_bot, interaction)
    error = ephemeral_error(interaction)
    assert "You already have 2 jobs going" in error and "#2 in line" in error and "#3 in line" in error
    assert len(await store.keys("job:")) == 3  # nothing new started


async def test_guild_and_global_caps(toolbox_bot, monkeypatch, stand_in_engines):
    stand_in_engines.use(CaptionRequest, SlowCaptionEngine())
    store = toolbox_bot.backend.store
    await save_guild_settings(store, 2002, GuildSettings(guild_cap=2))
    for user in (1, 2):
        await job_in_line(toolbox_bot, user)
    interaction = fake_interaction(user_id=3)
    await caption(toolbox_bot, interaction)
    assert "This server has 2 jobs in line" in ephemeral_error(interaction)

    monkeypatch.setenv("TOOLBOX_GLOBAL_CAP", "2")
    interaction = fake_interaction(user_id=3, guild_id=999)
    await caption(toolbox_bot, interaction)
    assert "The bot is busy" in ephemeral_error(interaction)


async def test_roles_and_channels_from_guild_settings(toolbox_bot, stand_in_engines):
    stand_in_engines.use(CaptionRequest, SlowCaptionEngine())
    store = toolbox_bot.backend.store
    await save_guild_settings(store, 2002, GuildSettings(allowed_channel_ids=[42]))
    interaction = fake_interaction()
    await caption(toolbox_bot, interaction)
    assert "only in <#42>" in ephemeral_error(interaction)

    await save_guild_settings(store, 2002, GuildSettings(allowed_role_ids=[77]))
    interaction = fake_interaction()
    await caption(toolbox_bot, interaction)
    assert "<@&77>" in ephemeral_error(interaction)
    interaction = fake_interaction()
    interaction.user.roles = [MagicMock(id=77)]
    await caption(toolbox_bot, interaction)
    assert ephemeral_error(interaction) is None


async def test_queue_position_is_shown_and_moves(toolbox_bot, stand_in_engines):
    engine = SlowCaptionEngine(steps=5, delay=0.06)
    stand_in_engines.use(CaptionRequest, engine)
    interactions = [fake_interaction(user_id=user) for user in (1, 2, 3)]
    runs = []
    for interaction in interactions:
        runs.append(asyncio.create_task(caption(toolbox_bot, interaction)))
        await asyncio.sleep(0.05)
    await asyncio.gather(*runs)
    last = edits(interactions[2])
    assert any("position 2 in line" in text for text in last if text), last
    assert any("position 1 in line" in text for text in last if text), last
    assert "descriptive 96x64" in last[-1]
    assert engine.batches == [1, 1, 1]


async def test_cancel_button_owner_only_then_stops_the_job(toolbox_bot, stand_in_engines):
    engine = SlowCaptionEngine(steps=200, delay=0.01)
    stand_in_engines.use(CaptionRequest, engine)
    interaction = fake_interaction(user_id=5)
    running = asyncio.create_task(caption(toolbox_bot, interaction))
    while True:
        await asyncio.sleep(0.02)
        views = [call.kwargs.get("view") for call in interaction.calls.edit_original_response.await_args_list]
        button = next((item for view in views if view for item in view.children), None)
        if button is not None:
            break
    job_id = button.custom_id.rsplit(":", 1)[1]

    stranger = fake_interaction(user_id=6)
    item = CancelJobButton(job_id)
    await item.callback(_bound(stranger, toolbox_bot))
    assert "Only the person who started" in ephemeral_error(stranger)
    assert (await load_job(toolbox_bot.backend.store, job_id)).status is JobStatus.RUNNING

    owner_press = _bound(fake_interaction(user_id=5), toolbox_bot)
    await item.callback(owner_press)
    await running
    assert (await load_job(toolbox_bot.backend.store, job_id)).status is JobStatus.CANCELLED
    assert "Cancelled" in ephemeral_error(interaction)
    assert sum(engine.batches) == 1


def _bound(interaction, toolbox_bot):
    interaction.client = toolbox_bot
    return interaction


async def test_reports_switch_to_the_bot_token_after_14_minutes(toolbox_bot):
    interaction = fake_interaction()
    channel, message = channel_spy(toolbox_bot)
    now = [time.time()]
    target = ReplyTarget(toolbox_bot, 3003, 555, interaction, clock=lambda: now[0])

    await target.edit(content="early")
    interaction.calls.edit_original_response.assert_awaited_once_with(content="early")
    now[0] += INTERACTION_TOKEN_LIFETIME + 1
    await target.edit(content="late")
    await target.send(content="more")
    toolbox_bot.get_partial_messageable.assert_called_with(3003)
    channel.get_partial_message.assert_called_with(555)
    message.edit.assert_awaited_once_with(content="late")
    channel.send.assert_awaited_once_with(content="more")
    assert interaction.calls.edit_original_response.await_count == 1


async def test_a_dead_worker_becomes_a_clear_failure(toolbox_bot):
    store = toolbox_bot.backend.store
    job = await create_job(store, "caption", owner={"user_id": 1})
    await update_job(store, job.id, status=JobStatus.RUNNING, started_at=time.time() - 500,
                     heartbeat_at=time.time() - STALE_AFTER - 5)
    never = asyncio.get_running_loop().create_future()
    toolbox_bot.backend.result = lambda job_id: never  # the worker vanished without a word
    interaction = fake_interaction()
    target = ReplyTarget(toolbox_bot, 3003, 1, interaction)
    with pytest.raises(Exception) as caught:
        await asyncio.wait_for(toolbox_bot.tracker.run(job, target), timeout=5)
    assert DEAD_JOB_MESSAGE in str(caught.value)
    assert (await load_job(store, job.id)).status is JobStatus.ERROR


@pytest.fixture
def deployment(modal_deployment):
    def slow_work(payload, progress):
        for step in range(30):
            progress(step / 30, "captioning")
            time.sleep(0.01)
        return ["a caption from modal"] * len(payload["images"])

    modal_deployment.work = slow_work
    return modal_deployment


async def test_a_restart_resumes_and_delivers_modal_jobs(deployment, make_toolbox_bot):
    first = await make_toolbox_bot("cogs.caption")
    interaction = fake_interaction()
    running = asyncio.create_task(caption(first, interaction))
    while not deployment.calls:
        await asyncio.sleep(0.01)
    running.cancel()  # the bot goes down mid-job
    await asyncio.gather(running, return_exceptions=True)
    [job_key] = await first.backend.store.keys("job:")

    second = await make_toolbox_bot("cogs.caption")
    _, message = channel_spy(second)
    assert await second.tracker.resume() == 1
    await asyncio.gather(*deployment.calls.values())

    async def delivered():
        record = await load_job(second.backend.store, job_key[4:])
        return record if record.delivered else None

    record = await eventually(delivered)
    assert record and record.status is JobStatus.DONE
    assert "a caption from modal" in message.edit.await_args.kwargs["content"]
    assert await second.tracker.resume() == 0  # delivered once


async def test_a_job_that_finished_while_the_bot_was_down_is_delivered(deployment, make_toolbox_bot):
    first = await make_toolbox_bot("cogs.caption")
    interaction = fake_interaction()
    running = asyncio.create_task(caption(first, interaction))
    while not deployment.calls:
        await asyncio.sleep(0.01)
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    await asyncio.gather(*deployment.calls.values())  # finishes with nobody watching

    second = await make_toolbox_bot("cogs.caption")
    _, message = channel_spy(second)
    await second.tracker.resume()
    await eventually(lambda: message.edit.await_count)
    assert "a caption from modal" in message.edit.await_args.kwargs["content"]


async def test_local_jobs_cut_by_a_restart_are_reported_as_such(stand_in_engines, make_toolbox_bot):
    stand_in_engines.use(CaptionRequest, SlowCaptionEngine(steps=100, delay=0.02))
    first = await make_toolbox_bot("cogs.caption")
    interaction = fake_interaction()
    running = asyncio.create_task(caption(first, interaction))
    while not await first.backend.store.keys("job:"):
        await asyncio.sleep(0.01)
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    await first.backend.close()

    second = await make_toolbox_bot("cogs.caption", backend=LocalBackend(Settings.load(), engines=stand_in_engines))
    _, message = channel_spy(second)
    await second.tracker.resume()
    await eventually(lambda: message.edit.await_count)
    assert "restarted" in message.edit.await_args.kwargs["content"]
    await second.backend.close()


async def test_long_finished_jobs_are_forgotten(toolbox_bot):
    from modal_services.jobs.records import job_retention_seconds
    from modal_services.state import keys

    store = toolbox_bot.backend.store
    old = await create_job(store, "caption")
    await update_job(store, old.id, status=JobStatus.DONE, finished_at=time.time() - job_retention_seconds() - 60)
    recent = await create_job(store, "caption")
    await update_job(store, recent.id, status=JobStatus.DONE, finished_at=time.time() - 60)
    per_job = (keys.call_key, keys.cancel_key, keys.preview_key, keys.upscale_params_key)
    for job in (old, recent):
        for key in per_job:
            await store.put(key(job.id), {"kept": True})
    waiting = await create_job(store, "caption", owner={"user_id": 1})
    snapshot = await toolbox_bot.tracker.snapshot(max_age=0)
    assert [job.id for job in snapshot.jobs] == [waiting.id]
    assert await load_job(store, old.id) is None
    assert await load_job(store, recent.id) is not None
    # Every key of a forgotten job goes with its record; a kept job keeps its own.
    assert [key for key in await store.keys() if old.id in key] == []
    assert all([await store.contains(key(recent.id)) for key in per_job])


class SlowLoadingCaptionEngine(SlowCaptionEngine):
    """A model that takes a while to load, with no progress to report meanwhile."""

    def load(self):
        time.sleep(1.5)
        super().load()


async def test_a_cancel_shows_at_the_next_edit_slot_even_while_the_model_loads(toolbox_bot, stand_in_engines, monkeypatch):
    monkeypatch.setattr("bot.progress.MIN_EDIT_INTERVAL", 0.3)
    stand_in_engines.use(CaptionRequest, SlowLoadingCaptionEngine(steps=50, delay=0.02))
    interaction = fake_interaction(user_id=5)
    landed: list[tuple[float, str]] = []

    async def edit(**fields):
        landed.append((time.monotonic(), fields.get("content") or ""))

    interaction.edit_original_response.side_effect = edit
    running = asyncio.create_task(caption(toolbox_bot, interaction))
    assert await eventually(lambda: any("Loading the model" in text for _, text in landed))
    [job_key] = await toolbox_bot.backend.store.keys("job:")
    pressed = time.monotonic()
    await CancelJobButton(job_key[4:]).callback(_bound(fake_interaction(user_id=5), toolbox_bot))
    await asyncio.wait_for(running, timeout=10)
    after = [(at, text) for at, text in landed if at >= pressed]
    # Within one edit slot (plus slack for a loaded machine), long before the model is done loading.
    assert after and "Stopping" in after[0][1] and after[0][0] - pressed < 0.3 + 0.5, after
    assert not any("Loading the model" in text for _, text in after)
    assert "Cancelled" in ephemeral_error(interaction)


async def test_a_queued_job_cancelled_behind_a_busy_engine_ends_at_once(toolbox_bot, stand_in_engines):
    engine = GatedCaptionEngine()
    stand_in_engines.use(CaptionRequest, engine)
    busy, waiting = fake_interaction(user_id=1), fake_interaction(user_id=2)
    first = asyncio.create_task(caption(toolbox_bot, busy))
    await eventually(lambda: busy.calls.edit_original_response.await_count)
    second = asyncio.create_task(caption(toolbox_bot, waiting))
    store = toolbox_bot.backend.store
    # The waiting member's job: the busy one's can still read as queued while its engine starts.
    queued = await eventually(lambda: _queued_job(store, user_id=2))
    await CancelJobButton(queued).callback(_bound(fake_interaction(user_id=2), toolbox_bot))
    await asyncio.wait_for(second, timeout=5)  # while the engine is still busy with the first job
    assert "Cancelled" in ephemeral_error(waiting) and not first.done()
    engine.gate.set()
    await asyncio.wait_for(first, timeout=10)
    assert "a caption" in edits(busy)[-1]


async def _queued_job(store, user_id: int) -> str | None:
    for record in (await store.items("job:")).values():
        if record["status"] == "queued" and record["owner"].get("user_id") == user_id:
            return record["id"]
    return None


async def test_a_job_is_shown_by_the_presenter_of_its_kinds_request_class(make_toolbox_bot):
    bot = await make_toolbox_bot()
    assert set(bot.tracker.presenters) == {CaptionRequest, UpscaleRequest, GenerateRequest, FluxGenerateRequest,
                                           ModelImportRequest, ModelUploadRequest, ModelDeleteRequest, ModelScanRequest}
    assert bot.tracker.presenter(Job(new_job_id(), "flux_generate")) == bot.generations.present
    assert bot.tracker.presenter(Job(new_job_id(), "caption")) == bot.captions.present
    # Downloads are followed by /setup itself, and a kind no longer known has no one to show it.
    assert bot.tracker.presenter(Job(new_job_id(), "download")) is None
    assert bot.tracker.presenter(Job(new_job_id(), "no_such_kind")) is None
