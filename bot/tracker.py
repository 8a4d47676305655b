"""Jobs as people see them in Discord: admission, live replies, cancel buttons, delivery.

- Admission: per-user, per-guild and global caps on jobs queued or running;
  over a cap the user gets a private message with their place in line.
- A job reports into one message. While the interaction token lives (15 min)
  the reply is edited through it; after that, and after a bot restart, the
  same message is edited with the bot's own token.
- Every running job's reply carries a Cancel button that survives restarts
  (a dynamic item keyed by the job id).
- On start, the bot finds jobs whose result was never delivered and resumes
  reporting them; results that finished while it was down are delivered then.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import discord

from bot.guild_settings import GuildSettings, load_guild_settings
from bot.permissions import is_admin
from bot.progress import ReplyEditor, end_if_stale, follow_job, render_job
from bot.replies import error_text, send_error
from bot.ui import plural
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.job_requests import JobRequest
from modal_services.jobs import Job, JobStatus, load_job, request_cancel, update_job
from modal_services.keys import JOB_PREFIX, forget_job

if TYPE_CHECKING:
    from bot.client import ToolboxBot

log = logging.getLogger(__name__)

# Interaction tokens die after 15 minutes; switch to the bot token with a margin.
INTERACTION_TOKEN_LIFETIME = 14 * 60
SNAPSHOT_MAX_AGE = 2.0
# Finished job records are kept this long (Modal's Dict drops entries unused for 7 days anyway).
JOB_RETENTION = 7 * 24 * 3600
# Job kinds people start from commands; admin work (downloads) is not capped.
CAPPED_KINDS = ("caption", "upscale")

# (job, result, target) -> shows the finished job's result in its message.
Presenter = Callable[[Job, Any, "ReplyTarget"], Awaitable[None]]


def global_cap() -> int:
    return int(os.environ.get("TOOLBOX_GLOBAL_CAP", "30"))


class ReplyTarget:
    """The message a job reports into."""

    def __init__(
        self,
        bot: discord.Client,
        channel_id: int,
        message_id: int,
        interaction: discord.Interaction | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.bot = bot
        self.channel_id = channel_id
        self.message_id = message_id
        self.interaction = interaction
        self.clock = clock

    @property
    def token_alive(self) -> bool:
        if self.interaction is None:
            return False
        return self.clock() - self.interaction.created_at.timestamp() < INTERACTION_TOKEN_LIFETIME

    async def edit(self, **fields: Any) -> None:
        if self.token_alive:
            await self.interaction.edit_original_response(**fields)
        else:
            await self._channel().get_partial_message(self.message_id).edit(**fields)

    async def send(self, **fields: Any) -> None:
        """A further message beside the job's own (a long result that needs more than one)."""
        if self.token_alive:
            await self.interaction.followup.send(**fields)
        else:
            await self._channel().send(**fields)

    def _channel(self) -> discord.PartialMessageable:
        return self.bot.get_partial_messageable(self.channel_id)


class CancelJobButton(discord.ui.DynamicItem[discord.ui.Button], template=r"toolbox:cancel:(?P<job_id>[0-9a-f]+)"):
    def __init__(self, job_id: str):
        super().__init__(
            discord.ui.Button(label="Cancel", style=discord.ButtonStyle.secondary, custom_id=f"toolbox:cancel:{job_id}")
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button, match) -> "CancelJobButton":
        return cls(match["job_id"])

    async def callback(self, interaction: discord.Interaction) -> None:
        # Component errors do not reach the app-command error handler: answer here.
        try:
            await interaction.client.tracker.cancel(interaction, self.job_id)
        except ToolboxError as error:
            await send_error(interaction, error)


def cancel_view(job_id: str) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(CancelJobButton(job_id))
    return view


@dataclass
class QueueSnapshot:
    jobs: list[Job]
    taken_at: float

    def active(self, user_id: int | None = None, guild_id: int | None = None) -> list[Job]:
        return [
            job
            for job in self.jobs
            if job.kind in CAPPED_KINDS
            and (user_id is None or job.owner.get("user_id") == user_id)
            and (guild_id is None or job.owner.get("guild_id") == guild_id)
        ]

    def position(self, job: Job) -> int | None:
        """1-based place among queued jobs of the same kind, oldest first."""
        queued = sorted(
            (other for other in self.jobs if other.kind == job.kind and other.status is JobStatus.QUEUED),
            key=lambda other: other.created_at,
        )
        for place, other in enumerate(queued, start=1):
            if other.id == job.id:
                return place
        return None


class JobTracker:
    def __init__(self, bot: "ToolboxBot"):
        self.bot = bot
        self.presenters: dict[str, Presenter] = {}
        self.started_at = time.time()
        self._snapshot = QueueSnapshot([], 0.0)
        self._snapshot_lock = asyncio.Lock()
        self._following: set[str] = set()

    @property
    def store(self):
        return self.bot.backend.store

    async def snapshot(self, max_age: float | None = None) -> QueueSnapshot:
        """Unfinished jobs, read at most once per `max_age` however many replies are following."""
        max_age = SNAPSHOT_MAX_AGE if max_age is None else max_age
        async with self._snapshot_lock:
            if time.time() - self._snapshot.taken_at > max_age:
                records = await self.store.items(JOB_PREFIX)
                jobs = [Job.from_dict(record) for record in records.values()]
                await self._forget_old(jobs)
                self._snapshot = QueueSnapshot([job for job in jobs if not job.status.finished], time.time())
            return self._snapshot

    async def _forget_old(self, jobs: list[Job]) -> None:
        """Drop long-finished job records, so that reading the queue stays cheap."""
        horizon = time.time() - JOB_RETENTION
        for job in jobs:
            if job.status.finished and (job.finished_at or job.created_at) < horizon:
                await forget_job(self.store, job.id)

    async def guild_settings(self, guild_id: int | None) -> GuildSettings:
        return await load_guild_settings(self.store, guild_id)

    async def admit(self, interaction: discord.Interaction) -> GuildSettings:
        """Raises if this user may not start a job now; returns the guild's settings."""
        settings = await self.guild_settings(interaction.guild_id)
        settings.check_member(interaction)
        snapshot = await self.snapshot(max_age=0)
        mine = snapshot.active(user_id=interaction.user.id)
        if len(mine) >= settings.user_cap:
            raise ToolboxError(ErrorCode.RATE_LIMITED, f"You already have {describe_jobs(mine, snapshot)} "
                               f"(the limit is {settings.user_cap}). Wait for one to finish, or stop one with /cancel.")
        guild_jobs = snapshot.active(guild_id=interaction.guild_id)
        if interaction.guild_id is not None and len(guild_jobs) >= settings.guild_cap:
            raise ToolboxError(ErrorCode.RATE_LIMITED, f"This server has {len(guild_jobs)} jobs in line, its limit. "
                               f"{_your_jobs(mine, snapshot)}Try again in a minute.")
        everyone = snapshot.active()
        if len(everyone) >= global_cap():
            raise ToolboxError(ErrorCode.RATE_LIMITED, f"The bot is busy: {len(everyone)} jobs are in line. "
                               f"{_your_jobs(mine, snapshot)}Try again in a minute.")
        return settings

    async def start(
        self, interaction: discord.Interaction, request: JobRequest, meta: dict[str, Any]
    ) -> tuple[Job, ReplyTarget]:
        """Submit a job for a deferred interaction; its reply becomes the job's message."""
        message = await interaction.original_response()
        owner = {
            "user_id": interaction.user.id,
            "guild_id": interaction.guild_id,
            "channel_id": interaction.channel_id,
            "message_id": message.id,
        }
        job = await self.bot.backend.submit(request, owner=owner, meta=meta)
        return job, ReplyTarget(self.bot, interaction.channel_id, message.id, interaction)

    async def run(self, job: Job, target: ReplyTarget) -> None:
        """Follow the job in its message until it ends, then present the result (or the error)."""
        self._following.add(job.id)
        try:
            result = await self._follow(job, target)
        except ToolboxError as error:
            await update_job(self.store, job.id, delivered=True)
            if target.token_alive:
                raise  # the app-command error handler shows it privately
            await target.edit(content=error_text(error), view=None)
            return
        finally:
            self._following.discard(job.id)
        await self.presenters[job.kind](job, result, target)
        await update_job(self.store, job.id, delivered=True)

    async def _follow(self, job: Job, target: ReplyTarget) -> Any:
        title = job.meta.get("title", job.kind.capitalize())
        view = cancel_view(job.id)
        editor = ReplyEditor(lambda text: target.edit(content=text, view=view))

        async def show(record: Job) -> None:
            await end_if_stale(self.bot.backend, record)
            text = render_job(record, title)
            if record.status is JobStatus.QUEUED:
                place = (await self.snapshot()).position(record)
                if place is not None:
                    text += f" · position {place} in line"
            await editor.show(text)

        return await follow_job(self.bot.backend, job.id, show)

    async def cancel(self, interaction: discord.Interaction, job_id: str) -> None:
        job = await load_job(self.store, job_id)
        if job is None or job.status.finished:
            await interaction.response.send_message("That job has already finished (or there is no such job).", ephemeral=True)
            return
        if job.owner.get("user_id") != interaction.user.id and not is_admin(interaction):
            raise ToolboxError(ErrorCode.PERMISSION_DENIED, "Only the person who started this job (or an admin) can cancel it.")
        await self.bot.backend.cancel(job_id)  # first: it may withdraw a job that is still queued
        await request_cancel(self.store, job_id)
        await interaction.response.send_message("Stopping the job at its next step…", ephemeral=True)

    async def resume(self) -> int:
        """Pick up every job whose result was never delivered (after a restart). Returns how many."""
        await self.bot.backend.recover()
        records = await self.store.items(JOB_PREFIX)
        resumed = 0
        for record in records.values():
            job = Job.from_dict(record)
            if job.delivered or job.id in self._following or job.kind not in self.presenters:
                continue
            if not {"channel_id", "message_id"} <= job.owner.keys():
                continue
            target = ReplyTarget(self.bot, job.owner["channel_id"], job.owner["message_id"])
            asyncio.create_task(self._resume_one(job, target), name=f"resume-{job.id}")
            resumed += 1
        return resumed

    async def _resume_one(self, job: Job, target: ReplyTarget) -> None:
        try:
            await self.run(job, target)
        except discord.HTTPException as exc:
            # The message may be gone (deleted, channel removed): nothing left to report into.
            log.warning("could not resume job %s in its message: %s", job.id, exc.status)
            await update_job(self.store, job.id, delivered=True)


def describe_jobs(jobs: list[Job], snapshot: QueueSnapshot) -> str:
    parts = []
    for job in jobs:
        place = snapshot.position(job)
        parts.append(f"{job.kind} #{place} in line" if place else f"{job.kind} running")
    return f"{plural(len(jobs), 'job')} going ({', '.join(parts)})"


def _your_jobs(mine: list[Job], snapshot: QueueSnapshot) -> str:
    return f"You have {describe_jobs(mine, snapshot)}. " if mine else ""
