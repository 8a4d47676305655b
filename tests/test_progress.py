"""Progress rendering and the reply editor's rate limiting (with a fake clock)."""

from __future__ import annotations

from unittest.mock import AsyncMock

from bot.progress import ReplyEditor, progress_bar, render_job
from modal_services.jobs import Job, JobStatus


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


async def test_edits_only_on_change_and_at_most_every_interval():
    clock = FakeClock()
    edit = AsyncMock()
    editor = ReplyEditor(edit, min_interval=1.5, clock=clock)
    await editor.show("a")
    await editor.show("a")  # unchanged: skipped
    clock.now += 0.5
    await editor.show("b")  # too soon: skipped
    clock.now += 1.0
    await editor.show("c")
    clock.now += 1.6
    await editor.show("c")  # unchanged
    await editor.show("final", final=True)  # final text always goes out at once
    assert [call.args[0] for call in edit.await_args_list] == ["a", "c", "final"]
    assert editor.edits == 3


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
