"""/setup: base models, recommended LoRAs and tokens, for the bot's operators (what every server shares).

An ephemeral panel lists every base model (size and state), the recommended
LoRAs (optional: what each is, its CivitAI page, whether it is installed) and
the token state (masked), with buttons: Set tokens (a modal form; each token
is checked against its service before it is kept), Download missing (one job
for the whole server; the panel turns into live progress bars), Verify, and
one Add button per recommended LoRA not yet installed (a CivitAI import, in a
message of its own with live progress, like `/models import`), and an
Enable/Disable button per optional model (its licence shown beside it: enabling
records who accepted it, and Download missing then includes the model).
A download already running is attached to, never started twice. A server's admins
who are not operators see the panel read-only: no buttons, and the tokens only as set or not.
"""

from __future__ import annotations

import logging

import discord
from discord import app_commands
from discord.ext import commands

from bot.content_safety import age_restricted
from bot.library_options import bot_library
from bot.permissions import is_admin, is_operator, require_operator
from bot.progress import MessageEdits, progress_bar
from bot.core.following import watch_job
from bot.replies import as_toolbox_error, error_text, send_error
from bot.setup_download import active_download, checked_states, start_or_attach_download
from bot.core.text import human_bytes, human_seconds
from modal_services.base_models.states import ModelState, model_states
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.requests import DownloadRequest, ModelImportRequest, VerifyRequest
from modal_services.jobs.records import Job, JobStatus
from modal_services.library.entries import Library, LibraryEntry
from modal_services.base_models.optional_models import enabled_record, set_enabled, setup_entries
from modal_services.base_models.registry import STARTER_LORAS, ModelEntry, StarterLora, optional_entries
from modal_services.base_models.tokens import LABELS, SERVICES, clear_token, set_token, token_state
from modal_services.remedies import FrontEnd

log = logging.getLogger(__name__)

# The interaction token dies at 15 min: stop editing a little before.
LIVE_VIEW_SECONDS = 14 * 60
PANEL_TIMEOUT = 14 * 60
POLL_SECONDS = 1.0
# Typed in a token field of the form: forget that token.
CLEAR_WORD = "clear"
MESSAGE_LIMIT = 2000  # Discord's limit on a message's text
SET_TOKENS = "set the API tokens"
READ_ONLY_NOTE = ("👀 Read-only: base models, tokens and optional models are every server's, "
                  "and only the bot's operators can change them.")
ICONS = {"present": "✅", "missing": "▫️", "downloading": "⬇️", "queued": "⏳", "failed": "❌"}


def describe(state: ModelState) -> str:
    state = state.worded_for(FrontEnd.DISCORD)
    if state.state == "downloading":
        fraction = state.bytes_done / state.size_bytes if state.size_bytes else 0
        return f"downloading {fraction * 100:.0f}%"
    if state.state == "failed":
        return f"failed: {state.detail}"
    if state.state == "present":
        return "present and verified"
    if state.state == "missing" and state.detail:
        return f"missing ({state.detail})"
    return state.state


def render_optional(entry: ModelEntry, enabled: dict | None, state: ModelState | None, terms: bool = True) -> str:
    """One optional model's line: enabled (by whom) or not, its size, and where to read its licence
    (with `terms`, that licence in one line too)."""
    if enabled is None:
        status = "▫️ not enabled"
    else:
        status = f"✅ enabled by {enabled['by']} · {describe(state) if state else 'missing'}"
    licence = f"{entry.optional.summary} · <{entry.optional.url}>" if terms else f"licence: <{entry.optional.url}>"
    return f"{status} · **{entry.name}** · ~{human_bytes(entry.approx_bytes)} · {licence}"


def render_panel(states: list[ModelState], tokens: list, note: str | None = None,
                 starters: list[tuple[StarterLora, LibraryEntry | None]] = (),
                 optional: list[tuple[ModelEntry, dict | None]] = (), read_only: bool = False) -> str:
    """The panel's text; the note comes right under the title, so that it shows however long the rest is,
    and the optional models' licences are left to their links when all of them would not fit. Read-only
    (a server's admin), each token shows only whether it is set."""
    present = sum(state.state == "present" for state in states)
    total = sum(state.size_bytes for state in states)
    lines = [f"**AI Toolbox setup** · base models {present}/{len(states)} present · {human_bytes(total)} in all"]
    if note:
        lines.append(note)
    for state in states:
        lines.append(f"{ICONS.get(state.state, '•')} **{state.name}** · {human_bytes(state.size_bytes)} · {describe(state)}")
    if starters:
        lines.append("**Recommended LoRAs** (optional, from CivitAI, made for Illustrious-XL)")
    for starter, installed in starters:
        state = f"installed as `{installed.file}`" if installed else f"~{human_bytes(starter.approx_bytes)} · not installed"
        lines.append(f"{'✅' if installed else '▫️'} **{starter.name}** · {starter.purpose} · <{starter.page_url}> · {state}")
    shown = [f"{LABELS[token.service]}: {'set' if token.is_set else 'not set'}" if read_only else token.describe()
             for token in tokens]
    lines.append("**Tokens** · " + " · ".join(shown))
    if optional:
        lines.append("**Optional models** (an operator enables each, accepting its licence; "
                     "Download missing then includes it)")
        by_key = {state.key: state for state in states}
        full = [render_optional(entry, record, by_key.get(entry.key)) for entry, record in optional]
        if len("\n".join(lines + full)) > MESSAGE_LIMIT:
            full = [render_optional(entry, record, by_key.get(entry.key), terms=False) for entry, record in optional]
        lines.extend(full)
    return "\n".join(lines)[:MESSAGE_LIMIT]


def render_progress(job: Job, states: list[ModelState]) -> str:
    """The live view: one bar per model (bytes, speed, ETA) and an overall bar."""
    done = sum(s.size_bytes if s.state == "present" else s.bytes_done for s in states)
    total = sum(s.size_bytes for s in states) or 1
    title = {
        JobStatus.QUEUED: "⏳ **Download queued**",
        JobStatus.RUNNING: "⬇️ **Downloading base models**",
        JobStatus.DONE: "✅ **Base models ready**",
        JobStatus.ERROR: "❌ **Download stopped**",
        JobStatus.CANCELLED: "⏹️ **Download cancelled**",
    }[job.status]
    lines = [title, f"Overall `{progress_bar(done / total)}` · {human_bytes(done)} / {human_bytes(total)}"]
    for state in states:
        if state.state == "downloading":
            fraction = state.bytes_done / state.size_bytes if state.size_bytes else 0
            speed = f"{human_bytes(state.rate)}/s" if state.rate else "–"
            lines.append(
                f"⬇️ **{state.name}** `{progress_bar(fraction)}` {human_bytes(state.bytes_done)} / "
                f"{human_bytes(state.size_bytes)} · {speed} · ETA {human_seconds(state.eta)}"
            )
        else:
            lines.append(f"{ICONS.get(state.state, '•')} **{state.name}** · {human_bytes(state.size_bytes)} · {describe(state)}")
    if job.status is JobStatus.ERROR and job.error_message:
        lines.append(error_text(job.error()))
    return "\n".join(lines)[:MESSAGE_LIMIT]


async def refuse_non_operator(interaction: discord.Interaction, what: str) -> bool:
    """True (and an ephemeral refusal sent, naming the role it needs) when the user may not do `what`."""
    try:
        await require_operator(interaction, what)
    except ToolboxError as error:
        await send_error(interaction, error)
        return True
    return False


class TokensForm(discord.ui.Modal, title="API tokens"):
    civitai = discord.ui.TextInput(
        label="CivitAI API key", placeholder=f"Empty keeps the current one; {CLEAR_WORD} removes it",
        required=False, max_length=200,
    )
    hf = discord.ui.TextInput(
        label="Hugging Face token", placeholder=f"Empty keeps the current one; {CLEAR_WORD} removes it",
        required=False, max_length=200,
    )

    def __init__(self, cog: "Setup"):
        super().__init__(timeout=PANEL_TIMEOUT)
        self.cog = cog

    async def on_submit(self, interaction: discord.Interaction) -> None:
        if await refuse_non_operator(interaction, SET_TOKENS):
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        settings = self.cog.bot.settings
        lines = []
        for service, field in (("civitai", self.civitai), ("hf", self.hf)):
            value = (field.value or "").strip()
            if not value:
                continue
            if value.lower() == CLEAR_WORD:
                await clear_token(self.cog.store, service)
                lines.append(f"🗑️ {LABELS[service]}: removed.")
                continue
            try:
                state = await set_token(self.cog.store, service, value, civitai_api_base=settings.civitai_api_base)
                lines.append(f"✅ {state.label()}: checked and saved.")
            except ToolboxError as error:
                lines.append(f"{LABELS[service]}: {error_text(error)}")
        if not lines:
            lines.append("Nothing changed: both fields were empty.")
        await interaction.followup.send("\n".join(lines), ephemeral=True)


class AddStarterButton(discord.ui.Button):
    def __init__(self, cog: "Setup", starter: StarterLora):
        super().__init__(label=f"Add {starter.name}"[:80], style=discord.ButtonStyle.secondary, emoji="➕", row=1)
        self.cog = cog
        self.starter = starter

    async def callback(self, interaction: discord.Interaction) -> None:
        if await refuse_non_operator(interaction, "add the recommended LoRAs"):
            return
        # A message of its own (the panel stays), which the job tracker keeps up to date.
        await interaction.response.defer(thinking=True)
        try:
            await self.cog.add_starter(interaction, self.starter)
        except Exception as exc:  # a button has no command error handler: show it in the message
            await interaction.edit_original_response(content=error_text(as_toolbox_error(exc)), embed=None, view=None)


class ToggleOptionalButton(discord.ui.Button):
    def __init__(self, cog: "Setup", entry: ModelEntry, enabled: bool):
        label = f"{'Disable' if enabled else 'Enable'} {entry.name}"[:80]
        super().__init__(label=label, style=discord.ButtonStyle.secondary, emoji="⏏️" if enabled else "✅", row=2)
        self.cog = cog
        self.entry = entry
        self.enable = not enabled

    async def callback(self, interaction: discord.Interaction) -> None:
        if await refuse_non_operator(interaction, "enable optional models and accept their licences"):
            return
        await interaction.response.defer()
        await interaction.edit_original_response(**await self.cog.toggle_optional(interaction, self.entry, self.enable))


class SetupPanel(discord.ui.View):
    def __init__(self, cog: "Setup", missing_starters: list[StarterLora] = (),
                 optional: list[tuple[ModelEntry, bool]] = ()):
        super().__init__(timeout=PANEL_TIMEOUT)
        self.cog = cog
        for starter in missing_starters:
            self.add_item(AddStarterButton(cog, starter))
        for entry, enabled in optional:
            self.add_item(ToggleOptionalButton(cog, entry, enabled))

    @discord.ui.button(label="Set tokens", style=discord.ButtonStyle.secondary, emoji="🔑")
    async def set_tokens(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        if await refuse_non_operator(interaction, SET_TOKENS):
            return
        await interaction.response.send_modal(TokensForm(self.cog))

    @discord.ui.button(label="Download missing", style=discord.ButtonStyle.primary, emoji="⬇️")
    async def download(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        if await refuse_non_operator(interaction, "download base models"):
            return
        await interaction.response.defer()
        try:
            await self.cog.download_and_follow(interaction)
        except ToolboxError as error:
            await send_error(interaction, error)

    @discord.ui.button(label="Verify", style=discord.ButtonStyle.secondary, emoji="🔍")
    async def verify(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        if await refuse_non_operator(interaction, "verify the base models"):
            return
        await interaction.response.defer()
        try:
            await self.cog.verify_and_show(interaction)
        except ToolboxError as error:
            await send_error(interaction, error)


class Setup(commands.Cog):
    def __init__(self, bot: commands.Bot):
        self.bot = bot

    @property
    def store(self):
        return self.bot.backend.store

    @property
    def library(self) -> Library:
        return bot_library(self.bot)

    async def panel(self, note: str | None = None, read_only: bool = False) -> dict:
        """The panel's message: its text and its buttons (read-only: no buttons)."""
        entries = await setup_entries(self.store)
        states = await checked_states(self.bot.settings, self.store, entries)
        tokens = [await token_state(self.store, service) for service in SERVICES]
        library = self.library
        starters = [(starter, await library.by_model(starter.civitai_model_id)) for starter in STARTER_LORAS.values()]
        missing = [starter for starter, installed in starters if installed is None]
        optional = [(entry, await enabled_record(self.store, entry.key)) for entry in optional_entries()]
        toggles = [(entry, record is not None) for entry, record in optional]
        return {"content": render_panel(states, tokens, note, starters, optional, read_only),
                "view": None if read_only else SetupPanel(self, missing, toggles)}

    async def toggle_optional(self, interaction: discord.Interaction, entry: ModelEntry, enable: bool) -> dict:
        """Enable (the pressing admin accepts its terms) or disable an optional model; the panel again, with a note."""
        by = f"{interaction.user} ({interaction.user.id})"
        await set_enabled(self.store, entry.key, enable, by)
        log.info("optional model %s %s by user %s", entry.key, "enabled" if enable else "disabled", interaction.user.id)
        if enable:
            note = (f"✅ Enabled **{entry.name}**, accepting its terms: {entry.optional.summary} (<{entry.optional.url}>). "
                    f"**Download missing** now fetches it (~{human_bytes(entry.approx_bytes)}).")
        else:
            note = f"⏏️ Disabled **{entry.name}**: nothing uses it now. Files already downloaded stay on the volume."
        return await self.panel(note)

    async def add_starter(self, interaction: discord.Interaction, starter: StarterLora) -> None:
        """Import a recommended LoRA as `/models import` does: the importer's job, followed by the job tracker."""
        installed = await self.library.by_model(starter.civitai_model_id)
        if installed is not None:
            await interaction.edit_original_response(content=f"{starter.name} is already in the library "
                                                     f"(`{installed.file}`).")
            return
        request = ModelImportRequest.parse({"ref": starter.reference, "api_base": self.bot.settings.civitai_api_base})
        meta = {"title": f"Adding {starter.name}", "age_ok": age_restricted(interaction)}
        job, target = await self.bot.tracker.start(interaction, request, meta)
        await self.bot.tracker.run(job, target)

    @app_commands.command(name="setup", description="Base models, recommended LoRAs and API tokens (operators)")
    @app_commands.default_permissions(administrator=True)
    @app_commands.guild_only()
    async def setup(self, interaction: discord.Interaction) -> None:
        operator = await is_operator(interaction)
        if not operator and not is_admin(interaction):
            await send_error(interaction, ToolboxError(ErrorCode.PERMISSION_DENIED, "Only the bot's operators "
                                                       "(and, to look, this server's admins) can use /setup."))
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        if not operator:
            await interaction.edit_original_response(**await self.panel(READ_ONLY_NOTE, read_only=True))
            return
        job_id = await active_download(self.store)
        if job_id is not None:
            await self.follow(interaction, job_id)
            return
        await interaction.edit_original_response(**await self.panel())

    async def download_and_follow(self, interaction: discord.Interaction) -> None:
        states = await checked_states(self.bot.settings, self.store, await setup_entries(self.store))
        missing = [s.key for s in states if s.state != "present"]
        if not missing:
            note = "Everything is already downloaded. Use **Verify** to re-check the files."
            await interaction.edit_original_response(**await self.panel(note))
            return
        owner = {"user_id": interaction.user.id, "guild_id": interaction.guild_id, "channel_id": interaction.channel_id}
        job_id, started = await start_or_attach_download(
            self.store, lambda: self.bot.backend.submit(DownloadRequest.parse({"keys": missing}), owner=owner),
        )
        log.info("setup download %s job %s", "started" if started else "attached to", job_id)
        await self.follow(interaction, job_id)

    async def follow(self, interaction: discord.Interaction, job_id: str) -> None:
        """Edit the panel with live progress until the download ends (or the interaction token would)."""
        edits = MessageEdits(interaction.edit_original_response)
        entries = await setup_entries(self.store)

        async def show(job: Job) -> None:
            edits.post(content=render_progress(job, await model_states(self.store, entries)), view=None)

        job = await watch_job(self.bot.backend, job_id, show, POLL_SECONDS, timeout=LIVE_VIEW_SECONDS)
        if job.status.finished:
            note = "✅ All base models are ready." if job.status is JobStatus.DONE else error_text(job.error())
            await edits.edit(**await self.panel(note))
        else:
            await edits.edit(
                content=render_progress(job, await model_states(self.store, entries))
                + "\nStill going in the background: run /setup again to see it.", view=None)
        await edits.close()

    async def verify_and_show(self, interaction: discord.Interaction) -> None:
        edits = MessageEdits(interaction.edit_original_response)
        await edits.edit(content="🔍 Verifying the files on the volume…", view=None)
        job = await self.bot.backend.submit(VerifyRequest.parse({"keys": []}), owner={"user_id": interaction.user.id})

        async def show(record: Job) -> None:
            edits.post(content=f"🔍 **Verifying** · {record.stage}\n`{progress_bar(record.progress)}`", view=None)

        record = await watch_job(self.bot.backend, job.id, show, POLL_SECONDS)
        note = "🔍 Verified: sizes and hashes checked." if record.status is JobStatus.DONE else error_text(record.error())
        await edits.edit(**await self.panel(note))
        await edits.close()


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Setup(bot))
