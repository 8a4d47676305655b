"""Showing a job's progress in a Discord reply.

The bot follows the job record (`bot.core.following`) and edits its reply
through the message's one `MessageEdits` scheduler: only when something
changes, and at most once per `min_interval`, so it stays well inside
Discord's per-message edit rate limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

import discord

from modal_services.jobs.records import Job, JobStatus

log = logging.getLogger(__name__)

BAR_WIDTH = 14
# About one edit per 1.5 s per message is safe under Discord's unpublished edit limits.
MIN_EDIT_INTERVAL = 1.5

STAGE_LABELS = {
    "queued": "Queued, waiting for a worker…",
    "starting": "Starting…",
    "loading model": "Loading the model…",
}


def progress_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = round(max(0.0, min(fraction, 1.0)) * width)
    return "▰" * filled + "▱" * (width - filled) + f" {fraction * 100:3.0f}%"


def render_job(job: Job, title: str) -> str:
    stage = STAGE_LABELS.get(job.stage, job.stage[:1].upper() + job.stage[1:] + "…")
    if job.status is JobStatus.QUEUED:
        return f"⏳ **{title}** · {stage}"
    return f"⚙️ **{title}** · {stage}\n`{progress_bar(job.progress)}`"


class MessageEdits:
    """The one scheduler of a message's edits: progress text, previews and results all go through it.

    Discord limits edits per message route, so however many parts of the bot
    want to change one message, it is edited at most once per `min_interval`.
    What arrives meanwhile is merged (the latest value of each field wins: the
    latest text and the latest preview go out in one edit), an edit that would
    change nothing is skipped, and `edit` (a result, an error) goes out as
    soon as the budget allows and waits for it.
    """

    def __init__(self, send: Callable[..., Awaitable[Any]], min_interval: float | None = None, clock=time.monotonic):
        self._send = send
        self._min_interval = MIN_EDIT_INTERVAL if min_interval is None else min_interval
        self._clock = clock
        self._pending: dict[str, Any] = {}
        self._waiters: list[asyncio.Future] = []
        self._shown: dict[str, Any] = {}
        self._last_edit = float("-inf")
        self._wake = asyncio.Event()
        self._sending = asyncio.Lock()
        self._flusher: asyncio.Task | None = None
        self._closed = False
        self.edits = 0

    def post(self, **fields: Any) -> None:
        """Queue `fields` for the next edit without waiting for it."""
        if self._closed:
            return
        seen = {**self._shown, **self._pending}
        if all(name in seen and seen[name] == value for name, value in fields.items()):
            return
        self._pending.update(fields)
        self._schedule()

    async def edit(self, **fields: Any) -> None:
        """Queue `fields` and wait until an edit carrying them has gone out (raising that edit's error)."""
        if self._closed:
            raise RuntimeError("this message's edits are closed")
        done = asyncio.get_running_loop().create_future()
        self._pending.update(fields)
        self._waiters.append(done)
        self._schedule()
        await done

    async def close(self) -> None:
        """Drop what is pending and wait for an edit in flight: no edit lands after this returns."""
        self._closed = True
        self._pending.clear()
        async with self._sending:
            if self._flusher is not None:
                self._flusher.cancel()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(RuntimeError("the message stopped taking edits before this one went out"))
        self._waiters.clear()

    def _schedule(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop(), name="message-edits")
        self._wake.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            wait = self._last_edit + self._min_interval - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
            async with self._sending:
                if not self._pending:
                    continue
                fields, waiters = self._pending, self._waiters
                self._pending, self._waiters = {}, []
                try:
                    await self._send(**fields)
                except Exception as exc:
                    self._report(exc, waiters)
                else:
                    self._shown.update(fields)
                    self.edits += 1
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_result(None)
                finally:
                    self._last_edit = self._clock()

    @staticmethod
    def _report(exc: Exception, waiters: list[asyncio.Future]) -> None:
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(exc)
        if not waiters:  # a progress or preview edit: the next one will try again
            if isinstance(exc, discord.HTTPException):
                log.info("a progress edit was refused: %s", exc.status)
            else:
                log.warning("a progress edit failed", exc_info=exc)
