"""The Discord client: loads the cogs, syncs the commands, handles their errors."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.backend import Backend
from bot.guild_settings import result_retention_days
from bot.replies import as_toolbox_error, send_error, taking_interactions
from bot.result_params import sweep_result_params
from bot.settings import Settings
from bot.tracker import CancelJobButton, JobTracker

if TYPE_CHECKING:
    from cogs.caption import Caption
    from cogs.generate import Generate
    from cogs.upscale import Upscale

log = logging.getLogger(__name__)

EXTENSIONS = (
    "cogs.caption", "cogs.setup", "cogs.models", "cogs.jobs", "cogs.settings", "cogs.upscale", "cogs.generate",
    "cogs.image_info",
)
# While closing, running jobs' replies are told of the restart for at most this long.
SHUTDOWN_NOTICE_SECONDS = 5.0


class ToolboxTree(app_commands.CommandTree):
    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        return await taking_interactions(interaction)


class ToolboxBot(commands.Bot):
    def __init__(self, settings: Settings, backend: Backend):
        # The bot never joins voice: discord.py's start-up warnings that its voice libraries (PyNaCl, davey) are
        # missing say nothing useful here. Its own switches turn just those two off.
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
        # Slash commands and context menus need no privileged intents: the
        # message a context menu targets arrives with the interaction.
        super().__init__(command_prefix=commands.when_mentioned, intents=discord.Intents.default(), tree_cls=ToolboxTree)
        self.settings = settings
        self.backend = backend
        self.stopping = False
        self.tracker = JobTracker(self)
        # The cogs whose jobs other cogs' buttons start (Upscale's Caption, Generate's U1-U4...):
        # each sets itself here while it is loaded.
        self.captions: Caption | None = None
        self.upscales: Upscale | None = None
        self.generations: Generate | None = None
        self.tree.on_error = self.on_app_command_error

    async def setup_hook(self) -> None:
        await self.backend.start()  # a Modal token that is missing or refused stops the bot here, in one line
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        # Cancel buttons on replies sent before a restart keep working.
        self.add_dynamic_items(CancelJobButton)
        await self.sync_commands()
        self.loop.create_task(self._resume_jobs())
        self.loop.create_task(self._sweep_old_results())

    async def _resume_jobs(self) -> None:
        await self.wait_until_ready()
        resumed = await self.tracker.resume()
        if resumed:
            log.info("resumed reporting %d unfinished jobs", resumed)

    async def _sweep_old_results(self) -> None:
        """Results kept past their server's retention are deleted at each start (the reconcile does it daily)."""
        try:
            await sweep_result_params(self.backend.store, result_retention_days)
        except Exception:  # a volume not answering now: the next start or reconcile sweeps them
            log.warning("could not sweep old results' parameters", exc_info=True)

    async def sync_commands(self) -> None:
        if self.settings.guild_ids:
            # Guild sync is instant; global sync can take up to an hour to show.
            for guild_id in self.settings.guild_ids:
                guild = discord.Object(id=guild_id)
                self.tree.copy_global_to(guild=guild)
                await self.tree.sync(guild=guild)
            log.info("commands synced to guilds %s", ", ".join(map(str, self.settings.guild_ids)))
        else:
            await self.tree.sync()
            log.info("commands synced globally")

    async def on_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        await send_error(interaction, as_toolbox_error(error))

    async def close(self) -> None:
        """Gracefully: no new interactions, running jobs' replies told of the restart (the jobs are
        resumed on the next start), then the gateway and the stores closed."""
        if self.stopping:
            await super().close()
            return
        self.stopping = True
        await self.tracker.stand_down(SHUTDOWN_NOTICE_SECONDS)
        await super().close()
        await self.backend.close()
