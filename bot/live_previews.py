"""A running SDXL job's latest preview, shown in its message every few seconds.

The worker keeps its newest small JPEG under `preview:<job id>`; while the
job runs, a new one is posted to the message, to ride along with its next
edit (the tracker's progress text shares the same edit budget). `stop()`
ends the watching before the result is shown.
"""

from __future__ import annotations

import asyncio
import io

import discord

from bot.tracker import ReplyTarget
from modal_services.state.keys import preview_key
from modal_services.engines.sdxl.previews import decode_preview
from modal_services.state.store import StateStore

PREVIEW_EDIT_INTERVAL = 6.0


class LivePreviews:
    def __init__(self, store_of, interval: float = PREVIEW_EDIT_INTERVAL):
        # A callable giving the store: the bot's backend may be swapped after a cog is loaded.
        self._store_of = store_of
        self.interval = interval
        self._tasks: dict[str, asyncio.Task] = {}

    @property
    def store(self) -> StateStore:
        return self._store_of()

    def start(self, job_id: str, target: ReplyTarget) -> None:
        self._tasks[job_id] = asyncio.create_task(self._show(job_id, target), name=f"previews-{job_id}")

    async def stop(self, job_id: str) -> None:
        task = self._tasks.pop(job_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _show(self, job_id: str, target: ReplyTarget) -> None:
        shown = None
        while True:
            await asyncio.sleep(self.interval)
            record = await self.store.get(preview_key(job_id))
            jpeg = decode_preview(record)
            if jpeg is None or record.get("n") == shown:
                continue
            # Rides along with the next progress edit: one edit budget for the whole message.
            target.post(attachments=[discord.File(io.BytesIO(jpeg), "preview.jpg")])
            shown = record.get("n")
