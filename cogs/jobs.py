"""/status and /cancel."""

from __future__ import annotations

import time
from collections import Counter

import discord
from discord import app_commands
from discord.ext import commands

from bot.library_options import bot_library
from bot.permissions import is_admin
from bot.tracker import CAPPED_KINDS, QueueSnapshot
from bot.core.text import human_duration
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.records import Job, JobStatus
from modal_services.state.reconcile import last_report


def describe_job(job: Job, snapshot: QueueSnapshot, now: float) -> str:
    place = snapshot.position(job)
    where = f"#{place} in line" if place else ("running" if job.status is JobStatus.RUNNING else job.status.value)
    progress = f" {job.progress:.0%}" if job.status is JobStatus.RUNNING else ""
    return f"`{job.id[:8]}` {job.kind} · {where}{progress} · {human_duration(now - job.created_at)} ago"


# Room for the rest of /status within Discord's 2000 characters, whatever the file names.
RECORDS_LINE_LIMIT = 600


async def records_line(store, now: float) -> str:
    """The last reconcile of the durable records with their files, as `/status` shows it to admins."""
    report = await last_report(store)
    text = report.describe(human_duration(now - report.ran_at)) if report else "not checked yet"
    if len(text) > RECORDS_LINE_LIMIT:
        text = text[: RECORDS_LINE_LIMIT - 1] + "…"
    return "**Records**: " + discord.utils.escape_markdown(text)


class Jobs(commands.Cog):
    def __init__(self, bot: commands.Bot):
        self.bot = bot

    @app_commands.command(name="status", description="The bot, its workers, the queue and your jobs")
    async def status(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        tracker = self.bot.tracker
        snapshot = await tracker.snapshot(max_age=0)
        now = time.time()
        settings = self.bot.settings
        checkpoint = await bot_library(self.bot).active_checkpoint()
        services = await self.bot.backend.service_status()
        guild_settings = await tracker.guild_settings(interaction.guild_id)

        counts = Counter((job.kind, job.status) for job in snapshot.jobs)
        queue = " · ".join(
            f"{kind}: {counts[kind, JobStatus.RUNNING]} running, {counts[kind, JobStatus.QUEUED]} queued"
            for kind in CAPPED_KINDS
        )
        mine = snapshot.active(user_id=interaction.user.id)
        lines = [
            f"**AI Toolbox** · up {human_duration(now - tracker.started_at)} · "
            f"latency {self.bot.latency * 1000:.0f} ms · backend: {settings.backend}",
            "**Workers**: " + (" · ".join(f"{name} {state}" for name, state in services.items()) or "none started yet"),
            f"**Queue**: {queue}",
            f"**Active checkpoint**: {checkpoint['name']}",
            f"**{guild_settings.describe_safety().replace('Safety:', 'Safety**:', 1)}",
            "**Your jobs**: " + ("\n".join(describe_job(job, snapshot, now) for job in mine) if mine else "none"),
        ]
        if is_admin(interaction):  # file names of the library: for those who can act on them
            lines.insert(-1, await records_line(self.bot.backend.store, now))
        await interaction.edit_original_response(content="\n".join(lines))

    @app_commands.command(name="cancel", description="Stop one of your jobs (your latest if you name none)")
    @app_commands.describe(job="Which job (start typing to pick)")
    async def cancel(self, interaction: discord.Interaction, job: str | None = None) -> None:
        if job is None:
            mine = (await self.bot.tracker.snapshot(max_age=0)).active(user_id=interaction.user.id)
            if not mine:
                raise ToolboxError(ErrorCode.INVALID_INPUT, "You have no jobs waiting or running.")
            job = max(mine, key=lambda record: record.created_at).id
        await self.bot.tracker.cancel(interaction, job)

    @cancel.autocomplete("job")
    async def cancel_autocomplete(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        snapshot = await self.bot.tracker.snapshot()
        now = time.time()
        mine = sorted(snapshot.active(user_id=interaction.user.id), key=lambda record: -record.created_at)
        return [
            app_commands.Choice(name=describe_job(record, snapshot, now)[:100], value=record.id)
            for record in mine
            if current.lower() in record.id or current.lower() in record.kind
        ][:25]


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Jobs(bot))
