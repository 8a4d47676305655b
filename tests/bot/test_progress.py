"""Progress rendering and the per-message edit scheduler."""

from __future__ import annotations

import asyncio
import time
from unittest.mock import MagicMock

import discord
import pytest

from bot.progress import MessageEdits, progress_bar, render_job
from modal_services.jobs.records import Job, JobStatus


class RecordingMessage:
    """An edit endpoint that records when each edit arrived and what it carried."""

    def __init__(self, delay: float = 0.0):
        self.edits: list[tuple[float, dict]] = []
        self.delay = delay

    async def edit(self, **fields):
        self.edits.append((time.monotonic(), fields))
        await asyncio.sleep(self.delay)

    def gaps(self) -> list[float]:
        times = [at for at, _ in self.edits]
        return [later - earlier for earlier, later in zip(times, times[1:])]


async def test_edits_are_spaced_merged_and_skip_repeats():
    message = RecordingMessage()
    edits = MessageEdits(message.edit, min_interval=0.2)
    edits.post(content="a")
    await asyncio.sleep(0.05)
    edits.post(content="a")  # unchanged: nothing to send
    edits.post(content="b")
    edits.post(attachments=["preview-1"])
    edits.post(content="c")
    edits.post(attachments=["preview-2"])
    await edits.edit(content="result", attachments=["final"])  # waits for the next slot, then goes out
    await edits.close()
    assert [fields for _, fields in message.edits] == [
        {"content": "a"},
        {"content": "result", "attachments": ["final"]},  # the pending text and preview were overtaken
    ]
    assert min(message.gaps()) >= 0.2
    assert edits.edits == 2


async def test_latest_text_and_preview_go_out_in_one_edit():
    message = RecordingMessage()
    edits = MessageEdits(message.edit, min_interval=0.15)
    edits.post(content="loading")
    await asyncio.sleep(0.01)
    edits.post(content="step 1")
    edits.post(attachments=["preview"])
    edits.post(content="step 2")
    await asyncio.sleep(0.3)
    assert [fields for _, fields in message.edits] == [
        {"content": "loading"}, {"content": "step 2", "attachments": ["preview"]},
    ]
    await edits.close()


async def test_nothing_lands_after_close_and_an_edit_in_flight_is_waited_for():
    message = RecordingMessage(delay=0.1)
    edits = MessageEdits(message.edit, min_interval=0.05)
    edits.post(content="in flight")
    await asyncio.sleep(0.02)
    edits.post(content="pending")
    await edits.close()
    closed_at = time.monotonic()
    edits.post(content="too late")
    await asyncio.sleep(0.2)
    assert [fields["content"] for _, fields in message.edits] == ["in flight"]
    assert message.edits[-1][0] < closed_at


async def test_a_refused_result_edit_raises_and_progress_carries_on():
    calls = []

    async def flaky(**fields):
        calls.append(fields)
        if fields.get("content") in ("progress 1", "result"):
            raise discord.HTTPException(MagicMock(status=400, reason="Bad Request"), "refused")

    edits = MessageEdits(flaky, min_interval=0.01)
    edits.post(content="progress 1")  # refused: logged, the next one tries again
    await asyncio.sleep(0.05)
    edits.post(content="progress 2")
    await asyncio.sleep(0.05)
    with pytest.raises(discord.HTTPException):
        await edits.edit(content="result")
    await edits.close()
    assert [fields["content"] for fields in calls] == ["progress 1", "progress 2", "result"]


def test_progress_bar():
    assert progress_bar(0.0, width=4) == "▱▱▱▱   0%"
    assert progress_bar(0.5, width=4) == "▰▰▱▱  50%"
    assert progress_bar(1.0, width=4) == "▰▰▰▰ 100%"
    assert progress_bar(1.7, width=4).startswith("▰▰▰▰")


def test_render_job_stages():
    queued = render_job(Job(id="1", kind="caption"), "Caption")
    assert "Queued" in queued and "▰" not in queued and "▱" not in queued
    running = render_job(Job(id="1", kind="caption", status=JobStatus.RUNNING, progress=0.5,
                             stage="captioning · token 3/48"), "Caption")
    assert "Captioning · token 3/48" in running and "50%" in running
    loading = render_job(Job(id="1", kind="caption", status=JobStatus.RUNNING, stage="loading model"), "Caption")
    assert "Loading the model" in loading
