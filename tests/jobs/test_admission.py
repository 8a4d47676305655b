"""Caps under bursts: many /caption commands at once, with slow attachment downloads, on both stores."""

from __future__ import annotations

import asyncio
import collections
import threading
import time

import pytest

from modal_services.jobs.records import Job
from modal_services.state.keys import SLOT_PREFIX
from modal_services.jobs.requests import CaptionRequest
from tests.fakes.engines import GatedCaptionEngine
from tests.fakes.discord_fakes import ephemeral_error, fake_attachment, fake_interaction, invoke
from tests.images import png_bytes

DOWNLOAD_SECONDS = 0.3
GLOBAL_CAP = 30


@pytest.fixture(params=["sqlite", "modal"])
async def burst_bot(request, make_toolbox_bot, stand_in_engines, fast_progress, monkeypatch):
    """(bot, gate) on the local backend (SQLite) or the Modal one (the Dict), jobs held until the gate opens."""
    monkeypatch.setattr("bot.tracker.SNAPSHOT_MAX_AGE", 0.0)
    monkeypatch.setenv("TOOLBOX_GLOBAL_CAP", str(GLOBAL_CAP))
    gate = threading.Event()
    if request.param == "modal":
        deployment = request.getfixturevalue("modal_deployment")

        def work(payload, progress):
            while not gate.wait(0.01):
                progress(0.5, "captioning")
            return ["a caption"] * len(payload["images"])

        deployment.work = work
    else:
        stand_in_engines.use(CaptionRequest, GatedCaptionEngine(gate))
    toolbox_bot = await make_toolbox_bot("cogs.caption")
    yield toolbox_bot, gate
    gate.set()


def slow_attachment(index: int):
    # The CDN's wait is the window in which a read-then-create check races.
    return fake_attachment(png_bytes(32, 32, seed=index), delay=DOWNLOAD_SECONDS)


async def burst(toolbox_bot, gate, senders: list[tuple[int, int]]):
    """Send one /caption per (user, guild) at once; returns (jobs by owner, refusals) once every command
    has either started its job or been refused, then lets the jobs finish."""
    command = toolbox_bot.tree.get_command("caption")
    interactions = [fake_interaction(user_id=user, guild_id=guild) for user, guild in senders]
    runs = [asyncio.create_task(invoke(toolbox_bot, command, interaction, slow_attachment(i), None, None))
            for i, interaction in enumerate(interactions)]
    store = toolbox_bot.backend.store
    deadline = time.monotonic() + 60
    while True:
        jobs = [Job.from_dict(record) for record in (await store.items("job:")).values()]
        refused = [interaction for interaction in interactions if ephemeral_error(interaction)]
        if len(jobs) + len(refused) >= len(senders) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(DOWNLOAD_SECONDS * 2)  # any late admission would have created its job by now
    jobs = [Job.from_dict(record) for record in (await store.items("job:")).values()]
    gate.set()
    await asyncio.wait_for(asyncio.gather(*runs), timeout=60)
    return jobs, [ephemeral_error(interaction) for interaction in interactions if ephemeral_error(interaction)]


@pytest.mark.slow
async def test_200_commands_from_50_users_stay_within_every_cap(burst_bot):
    toolbox_bot, gate = burst_bot
    users = [(user, 2000 + user % 10) for user in range(50)]  # 5 users in each of 10 servers
    jobs, refusals = await burst(toolbox_bot, gate, users * 4)

    per_user = collections.Counter(job.owner["user_id"] for job in jobs)
    per_guild = collections.Counter(job.owner["guild_id"] for job in jobs)
    assert max(per_user.values()) <= 2, per_user
    assert max(per_guild.values()) <= 10, per_guild
    assert 0 < len(jobs) <= GLOBAL_CAP
    assert len(jobs) + len(refusals) == 200
    assert all("Slow down" in text for text in refusals)
    # Every slot was let go when its job ended (or its command was refused).
    assert await toolbox_bot.backend.store.keys(SLOT_PREFIX) == []


async def test_20_commands_from_one_user_start_2_jobs(burst_bot):
    toolbox_bot, gate = burst_bot
    jobs, refusals = await burst(toolbox_bot, gate, [(7, 2002)] * 20)
    assert len(jobs) == 2
    assert len(refusals) == 18 and all("You already have" in text for text in refusals)
    assert await toolbox_bot.backend.store.keys(SLOT_PREFIX) == []


async def test_a_command_that_fails_before_its_job_gives_its_slot_back(burst_bot):
    toolbox_bot, gate = burst_bot
    gate.set()
    command = toolbox_bot.tree.get_command("caption")
    for _ in range(3):  # more than the cap of 2: each failure must have let its slot go
        interaction = fake_interaction(user_id=9)
        await invoke(toolbox_bot, command, interaction, fake_attachment(b"not an image at all"), None, None)
        assert "not an image" in ephemeral_error(interaction)
    interaction = fake_interaction(user_id=9)
    await invoke(toolbox_bot, command, interaction, fake_attachment(png_bytes()), None, None)
    assert ephemeral_error(interaction) is None
    assert await toolbox_bot.backend.store.keys(SLOT_PREFIX) == []
