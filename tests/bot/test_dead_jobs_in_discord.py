"""A job whose runner is gone, as Discord finds it: /status never counts it, and it holds no cap's slot."""

from __future__ import annotations

import time

import pytest

from modal_services.jobs.records import DEAD_JOB_MESSAGE, JobStatus, create_job, load_job, update_job
from modal_services.jobs.slots import Scope
from modal_services.state.keys import slot_key
from modal_services.state.locks import holder_record
from tests.fakes.discord_fakes import fake_interaction, invoke
from tests.processes import dead_pid


@pytest.fixture
async def toolbox_bot(make_toolbox_bot):
    return await make_toolbox_bot("cogs.jobs")


async def running_job(store, user_id: int, runner: dict) -> str:
    job = await create_job(store, "caption", owner={"user_id": user_id, "guild_id": 2002}, runner=runner)
    await update_job(store, job.id, status=JobStatus.RUNNING, progress=0.3, started_at=time.time(),
                     heartbeat_at=time.time())
    return job.id


async def test_status_counts_no_job_whose_process_was_killed(toolbox_bot):
    store = toolbox_bot.backend.store
    killed = await running_job(store, 1001, {**holder_record(), "pid": dead_pid()})
    live = await running_job(store, 1001, holder_record())
    interaction = fake_interaction(user_id=1001)
    await invoke(toolbox_bot, toolbox_bot.tree.get_command("status"), interaction)
    text = interaction.calls.edit_original_response.await_args.kwargs["content"]
    assert "caption: 1 running, 0 queued" in text
    assert f"`{live[:8]}` caption · running 30%" in text and killed[:8] not in text
    dead = await load_job(store, killed)
    assert dead.status is JobStatus.ERROR and dead.error_message == DEAD_JOB_MESSAGE


async def test_a_dead_job_of_a_gone_bot_session_holds_no_slot(toolbox_bot):
    """Both of a member's slots held by jobs a killed bot was running: the member may start another at once."""
    store = toolbox_bot.backend.store
    scope = Scope("user:1001", 2)
    for number in range(scope.cap):
        holder = await running_job(store, 1001, {**holder_record(), "pid": dead_pid()})
        await store.put(slot_key(scope.name, number), {"holder": holder, "session": "a-killed-bot",
                                                       "claimed_at": time.time()})
    claimed, full = await toolbox_bot.tracker.slots.claim_all("a-new-job", [scope])
    assert full is None and claimed == [slot_key(scope.name, 0)]


async def test_a_live_job_of_a_gone_bot_session_keeps_its_slot(toolbox_bot):
    """The other side of the rule: a job still running (elsewhere, heartbeating) is not let go."""
    store = toolbox_bot.backend.store
    scope = Scope("user:1001", 1)
    holder = await running_job(store, 1001, {"host": "modal", "machine": "modal:ta-1:boot:1", "pid": 7})
    await store.put(slot_key(scope.name, 0), {"holder": holder, "session": "a-killed-bot", "claimed_at": time.time()})
    claimed, full = await toolbox_bot.tracker.slots.claim_all("a-new-job", [scope])
    assert claimed == [] and full == scope
