"""Jobs as people see them in Discord: admission, live replies, cancel buttons, delivery.

- Admission: per-user, per-guild and global caps on jobs queued or running,
  held by slots claimed atomically in the state store (`modal_services.jobs.slots`)
  before anything is downloaded; over a cap the user gets a private message
  with their place in line.
- A job reports into one message, and every edit of it (progress, previews,
  the result, an error) goes through that message's one `MessageEdits`. While the interaction token lives (15 min)
  the reply is edited through it; after that, and after a bot restart, the
  same message is edited with the bot's own token.
- Every running job's reply carries a Cancel button that survives restarts
  (a dynamic item keyed by the job id).
- On start, the bot finds jobs whose result was never delivered and resumes
  reporting them; results that finished while it was down are delivered then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

import discord

from bot.guild_settings import GuildSettings, load_guild_settings
from bot.permissions import is_admin, is_operator
from bot.progress import MessageEdits, render_job
from bot.core.following import follow_job
from bot.core.generate_models import GENERATE_MODELS
from bot.replies import error_text
from bot.ui import PersistentButton
from bot.core.text import plural
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.requests import CaptionRequest, JobRequest, UpscaleRequest
from modal_services.services import service_of_kind
from modal_services.jobs.records import (Job, JobStatus, found_jobs, job_retention_seconds, new_job_id, request_cancel,
                                         update_job)
from modal_services.state.keys import JOB_PREFIX, forget_job
from modal_services.jobs.slots import UNSTARTED_CLAIM_TIMEOUT, Scope, SlotTable

if TYPE_CHECKING:
    from bot.client import ToolboxBot

log = logging.getLogger(__name__)

# Interaction tokens die after 15 minutes; switch to the bot token with a margin.
INTERACTION_TOKEN_LIFETIME = 14 * 60
SNAPSHOT_MAX_AGE = 2.0
# Job kinds people start from commands (every text-to-image model's too); admin work (downloads) is not capped.
CAPPED_KINDS = (CaptionRequest.kind, UpscaleRequest.kind, *(model.request.kind for model in GENERATE_MODELS.values()))
# A result's upload limit when neither the interaction nor the guild says (Discord's default).
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
# Discord's limit on one request with several files.
MAX_REQUEST_BYTES = 25 * 1024 * 1024

RESTART_NOTICE = "🔄 **The bot is restarting** · this job's reply picks up again when it is back."

# (job, result, target) -> shows the finished job's result in its message; one per request class.
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
        self.edits = MessageEdits(self._send_edit)

    @property
    def token_alive(self) -> bool:
        if self.interaction is None:
            return False
        return self.clock() - self.interaction.created_at.timestamp() < INTERACTION_TOKEN_LIFETIME

    def post(self, **fields: Any) -> None:
        """Change the message at its next edit slot (progress, a preview), without waiting."""
        self.edits.post(**fields)

    async def edit(self, **fields: Any) -> None:
        """Change the message as soon as its edit budget allows, and wait until it has."""
        await self.edits.edit(**fields)

    async def close(self) -> None:
        """No further edits: what is pending is dropped, one in flight is waited for."""
        await self.edits.close()

    async def _send_edit(self, **fields: Any) -> None:
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

    async def tell_requester(self, content: str) -> None:
        """A message only the person who asked sees (an ephemeral follow-up), while the interaction
        token lives; after that there is no private way back to them, and the message's own text stands."""
        if self.token_alive:
            await self.interaction.followup.send(content, ephemeral=True)

    def upload_limit(self, guild_id: int | None) -> int:
        """The largest file this message may carry: the interaction's limit, else the guild's."""
        if self.interaction is not None:
            return self.interaction.filesize_limit
        guild = self.bot.get_guild(guild_id or 0)
        return guild.filesize_limit if guild is not None else DEFAULT_UPLOAD_LIMIT

    def _channel(self) -> discord.PartialMessageable:
        return self.bot.get_partial_messageable(self.channel_id)


class CancelJobButton(PersistentButton, discord.ui.DynamicItem[discord.ui.Button],
                      template=r"toolbox:cancel:(?P<job_id>[0-9a-f]+)"):
    def __init__(self, job_id: str):
        super().__init__(
            discord.ui.Button(label="Cancel", style=discord.ButtonStyle.secondary, custom_id=f"toolbox:cancel:{job_id}")
        )
        self.job_id = job_id

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.client.tracker.cancel(interaction, self.job_id)


def cancel_view(job_id: str) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(CancelJobButton(job_id))
    return view


@dataclass
class Admission:
    """A command's claim on a job: the id its job will get and the slots held for it."""

    settings: GuildSettings
    job_id: str
    slots: list[str] = field(default_factory=list)
    started: bool = False


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
        self.presenters: dict[type[JobRequest], Presenter] = {}
        self.started_at = time.time()
        self._snapshot = QueueSnapshot([], 0.0)
        self._snapshot_lock = asyncio.Lock()
        self._following: dict[str, ReplyTarget] = {}
        # The task following each job, so that a closing bot can stop following.
        self._followers: dict[str, asyncio.Task] = {}
        # Jobs whose reply no longer shows progress: being cancelled, or the bot is closing.
        self._quiet: set[str] = set()
        # Names this bot session in its slot claims: a claim from a gone session whose job never started is free.
        self.session = uuid.uuid4().hex

    def presenter(self, job: Job) -> Presenter | None:
        """Who shows `job`'s result: the presenter of its kind's request class (None if no cog shows it)."""
        service = service_of_kind(job.kind)
        return self.presenters.get(service.request) if service else None

    @property
    def slots(self) -> SlotTable:
        return SlotTable(self.store, self.session, self._slot_is_stale)

    async def _slot_is_stale(self, claim: dict) -> bool:
        job = await self.bot.backend.job(claim["holder"])  # a dead one is failed here: finished
        if job is not None:
            # A finished job holds its slot until its result is shown, or until its session is gone.
            return job.delivered or (job.status.finished and claim.get("session") != self.session)
        return claim.get("session") != self.session or time.time() - claim.get("claimed_at", 0) > UNSTARTED_CLAIM_TIMEOUT

    @property
    def store(self):
        return self.bot.backend.store

    async def snapshot(self, max_age: float | None = None) -> QueueSnapshot:
        """Unfinished jobs, read at most once per `max_age` however many replies are following."""
        max_age = SNAPSHOT_MAX_AGE if max_age is None else max_age
        async with self._snapshot_lock:
            if time.time() - self._snapshot.taken_at > max_age:
                jobs = await found_jobs(self.store)  # a dead job is failed here: never counted as running
                await self._forget_old(jobs)
                self._snapshot = QueueSnapshot([job for job in jobs if not job.status.finished], time.time())
            return self._snapshot

    async def _forget_old(self, jobs: list[Job]) -> None:
        """Drop long-finished job records, so that reading the queue stays cheap."""
        horizon = time.time() - job_retention_seconds()
        for job in jobs:
            if job.status.finished and (job.finished_at or job.created_at) < horizon:
                await forget_job(self.store, job.id)
                await self.slots.forget(job.id, job.owner.get("slots", []))

    async def guild_settings(self, guild_id: int | None) -> GuildSettings:
        return await load_guild_settings(self.store, guild_id)

    @contextlib.asynccontextmanager
    async def admission(self, interaction: discord.Interaction) -> AsyncIterator[Admission]:
        """Hold a job slot for this command, or raise if a cap (or the guild's access rules) refuses it.

        The slots are claimed before the command reads its attachment, so a
        burst cannot overshoot a cap; they are let go when the block ends,
        unless the bot is going down with the job started (it is resumed,
        slots and all, on the next start).
        """
        settings = await self.guild_settings(interaction.guild_id)
        settings.check_member(interaction)
        admission = Admission(settings, new_job_id())
        admission.slots, full = await self.slots.claim_all(admission.job_id, self.scopes(interaction, settings))
        if full is not None:
            raise await self._over_cap(interaction, settings, full)
        handed_over = False
        try:
            yield admission
        except asyncio.CancelledError:
            handed_over = admission.started
            raise
        finally:
            if not handed_over:
                await self.slots.release(admission.job_id, admission.slots)

    @staticmethod
    def scopes(interaction: discord.Interaction, settings: GuildSettings) -> list[Scope]:
        """The caps a command by this user, here, counts against."""
        scopes = [Scope(f"user:{interaction.user.id}", settings.user_cap)]
        if interaction.guild_id is not None:
            scopes.append(Scope(f"guild:{interaction.guild_id}", settings.guild_cap))
        scopes.append(Scope("global", global_cap()))
        return scopes

    async def _over_cap(self, interaction: discord.Interaction, settings: GuildSettings, full: Scope) -> ToolboxError:
        snapshot = await self.snapshot(max_age=0)
        mine = snapshot.active(user_id=interaction.user.id)
        if full.name.startswith("user:"):
            return ToolboxError(ErrorCode.RATE_LIMITED, f"You already have {describe_jobs(mine, snapshot)} "
                                f"(the limit is {full.cap}). Wait for one to finish, or stop one with /cancel.")
        if full.name.startswith("guild:"):
            return ToolboxError(ErrorCode.RATE_LIMITED, f"This server has {full.cap} jobs in line, its limit. "
                                f"{_your_jobs(mine, snapshot)}Try again in a minute.")
        return ToolboxError(ErrorCode.RATE_LIMITED, f"The bot is busy: {full.cap} jobs are in line. "
                            f"{_your_jobs(mine, snapshot)}Try again in a minute.")

    async def reply_target(self, interaction: discord.Interaction) -> "ReplyTarget":
        """The deferred interaction's reply, as the message a job reports into."""
        message = await interaction.original_response()
        return ReplyTarget(self.bot, interaction.channel_id, message.id, interaction)

    async def start(
        self,
        interaction: discord.Interaction,
        request: JobRequest,
        meta: dict[str, Any],
        admission: Admission | None = None,
        target: ReplyTarget | None = None,
    ) -> tuple[Job, ReplyTarget]:
        """Submit a job for a deferred interaction (under `admission`'s slots, if capped);
        its reply becomes the job's message."""
        target = target or await self.reply_target(interaction)
        owner = {
            "user_id": interaction.user.id,
            "guild_id": interaction.guild_id,
            "channel_id": target.channel_id,
            "message_id": target.message_id,
        }
        if admission is not None:
            owner["slots"] = admission.slots
        job = await self.bot.backend.submit(
            request, owner=owner, meta=meta, job_id=admission.job_id if admission else None
        )
        if admission is not None:
            admission.started = True
        return job, target

    async def run(self, job: Job, target: ReplyTarget) -> None:
        """Follow the job in its message until it ends, then present the result (or the error)."""
        self._following[job.id] = target
        self._followers[job.id] = asyncio.current_task()
        try:
            result = await self._follow(job, target)
        except ToolboxError as error:
            await update_job(self.store, job.id, delivered=True)
            if target.token_alive:
                await target.close()  # no progress edit may land on the reply the error handler removes
                raise  # the app-command error handler shows it privately
            await target.edit(content=error_text(error), view=None)
            await target.close()
            return
        finally:
            self._following.pop(job.id, None)
            self._followers.pop(job.id, None)
            self._quiet.discard(job.id)
        await self.presenter(job)(job, result, target)
        await target.close()
        await update_job(self.store, job.id, delivered=True)

    async def _follow(self, job: Job, target: ReplyTarget) -> Any:
        title = job.meta.get("title", job.kind.capitalize())
        view = cancel_view(job.id)

        async def show(record: Job) -> None:
            if record.id in self._quiet:
                return  # the reply already says it is stopping, or that the bot is
            text = render_job(record, title)
            if record.status is JobStatus.QUEUED:
                place = (await self.snapshot()).position(record)
                if place is not None:
                    text += f" · position {place} in line"
            target.post(content=text, view=view)

        return await follow_job(self.bot.backend, job.id, show)

    async def cancel(self, interaction: discord.Interaction, job_id: str) -> None:
        job = await self.bot.backend.job(job_id)
        if job is None or job.status.finished:
            await interaction.response.send_message("That job has already finished (or there is no such job).", ephemeral=True)
            return
        # An admin stops their own server's jobs only: a custom id forged with another server's job id does nothing.
        own_server_admin = is_admin(interaction) and interaction.guild_id == job.owner.get("guild_id")
        if job.owner.get("user_id") != interaction.user.id and not own_server_admin and not await is_operator(interaction):
            raise ToolboxError(ErrorCode.PERMISSION_DENIED,
                               "Only the person who started this job (or this server's admins) can cancel it.")
        await self.bot.backend.cancel(job_id)  # first: it may withdraw a job that is still queued
        await request_cancel(self.store, job_id)
        target = self._following.get(job_id)
        if target is not None:
            # Said at the next edit slot, not when the worker next looks up from a long step.
            self._quiet.add(job_id)
            target.post(content=f"⏹️ **{job.meta.get('title', job.kind.capitalize())}** · Stopping…", view=None)
        await interaction.response.send_message("Stopping the job at its next step…", ephemeral=True)

    async def stand_down(self, timeout: float) -> None:
        """The bot is closing: every followed job's reply says so, then following stops. The jobs keep
        their records and slots: the next start resumes them (or reports them cut short)."""
        followed = dict(self._following)
        followers = [self._followers[job_id] for job_id in followed if job_id in self._followers]
        self._quiet.update(followed)
        notices = [target.edit(content=RESTART_NOTICE, view=cancel_view(job_id)) for job_id, target in followed.items()]
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*notices, return_exceptions=True)
        except TimeoutError:
            log.warning("not every running job's reply could be told of the restart in %.0f s", timeout)
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
        for target in followed.values():
            await target.close()

    async def resume(self) -> int:
        """Pick up every job whose result was never delivered (after a restart). Returns how many."""
        await self.bot.backend.recover()
        records = await self.store.items(JOB_PREFIX)
        resumed = 0
        for record in records.values():
            job = Job.from_dict(record)
            if job.delivered or job.id in self._following or self.presenter(job) is None:
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
        await self.slots.release(job.id, job.owner.get("slots", []))


def describe_jobs(jobs: list[Job], snapshot: QueueSnapshot) -> str:
    parts = []
    for job in jobs:
        place = snapshot.position(job)
        parts.append(f"{job.kind} #{place} in line" if place else f"{job.kind} running")
    return f"{plural(len(jobs), 'job')} going ({', '.join(parts)})"


def _your_jobs(mine: list[Job], snapshot: QueueSnapshot) -> str:
    return f"You have {describe_jobs(mine, snapshot)}. " if mine else ""
