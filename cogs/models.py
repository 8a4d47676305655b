"""/models: import LoRAs and checkpoints from CivitAI, browse and edit the library, switch the checkpoint.

`list` and `info` (and showing the active checkpoint) are open to everyone. The library is every
server's, so changing it is for the bot's operators: `edit`, `delete`, `checkpoint <name>` and `scan`;
`import` and `upload` are also for a server's admins where the operators allowed that server
(`/settings imports`), and those admins may edit and delete what their server imported. All of it is
checked in code (Discord's default permissions are a hint that does not reach subcommands). Library
reads come from the state store only, so autocomplete answers in milliseconds; file work (downloads,
deletes, uploads) runs as jobs on the workers, which see the volume.
"""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import PurePath
from typing import Any, Awaitable, Callable

import discord
from discord import app_commands
from discord.ext import commands

from bot.content_safety import age_restricted
from bot.library_options import bot_library
from bot.guild_settings import load_guild_settings
from bot.permissions import is_operator, require_admin, require_operator
from bot.tracker import ReplyTarget
from bot.remix_replies import ImportMissingButton
from bot.ui import SAMPLER_CHOICES, ConfirmView, OwnedView, option_range
from bot.core.remix import civitai_client
from bot.core.text import plural, size_text
from bot.replies import error_text
from modal_services.library.civitai import CivitaiRef, parse_reference
from modal_services.library.civitai_plans import ImportPlan, plan_import
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.requests import (
    JobRequest,
    LoraRef,
    ModelDeleteRequest,
    ModelImportRequest,
    ModelScanRequest,
    ModelUploadRequest,
)
from modal_services.jobs.records import Job
from modal_services.jobs.samplers import NO_SAMPLER
from modal_services.library.entries import DEFAULT_CHECKPOINT, LibraryEntry
from modal_services.remedies import FrontEnd, render

PAGE_SIZE = 8
LoraWeightOption = option_range(LoraRef, "weight")
SourceOption = option_range(ModelImportRequest, "ref")
DisplayNameOption = option_range(ModelUploadRequest, "name")
TriggerWordsOption = option_range(ModelUploadRequest, "trigger_words")
TYPE_CHOICES = [app_commands.Choice(name="LoRA", value="lora"), app_commands.Choice(name="Checkpoint", value="checkpoint")]


def _escape(text: str) -> str:
    return discord.utils.escape_markdown(text or "")


def _code(text: str) -> str:
    # Markdown escapes show literally inside a code span: only backticks need care there.
    return "`" + (text or "").replace("`", "'") + "`"


def plan_embed(plan: ImportPlan, age_ok: bool) -> discord.Embed:
    embed = discord.Embed(title=f"{plan.name} · {plan.version_name}"[:256], url=plan.page_url,
                          description=(plan.description[:300] + ("…" if len(plan.description) > 300 else "")) or None)
    embed.add_field(name="Type", value=f"{plan.civitai_type} → {plan.type}")
    embed.add_field(name="Base model", value=plan.base_model or "unknown")
    embed.add_field(name="Size", value=size_text(plan.size_bytes))
    embed.add_field(name="File", value=_code(plan.file_name)[:1024])
    embed.add_field(name="Format", value=f"{plan.format}" + (f" · {plan.precision}" if plan.precision else ""))
    embed.add_field(name="Trigger words", value=(", ".join(plan.trigger_words) or "none")[:1024], inline=False)
    thumbnail = plan.thumbnail(age_ok)
    if thumbnail:
        embed.set_thumbnail(url=thumbnail)
    if plan.nsfw:
        embed.set_footer(text="Marked NSFW on CivitAI")
    return embed


def entry_embed(entry: LibraryEntry | dict, age_ok: bool, title_prefix: str = "") -> discord.Embed:
    entry = LibraryEntry.from_dict(entry) if isinstance(entry, dict) else entry
    embed = discord.Embed(title=f"{title_prefix}{entry.name}"[:256])
    embed.add_field(name="Type", value=entry.type + (f" · {entry.format}" if entry.format and entry.format != entry.type else ""))
    embed.add_field(name="Base model", value=entry.base_model or "unknown")
    embed.add_field(name="Size", value=size_text(entry.size_bytes))
    embed.add_field(name="File", value=_code(entry.file)[:1024])
    if entry.type == "lora":
        embed.add_field(name="Weight", value=f"{entry.weight if entry.weight is not None else 1.0:g}")
    else:
        embed.add_field(name="Sampler", value=entry.sampler or "the base checkpoint's")
    embed.add_field(name="Source", value=entry.source + (
        f" · [CivitAI](https://civitai.com/models/{entry.civitai_model_id}?modelVersionId={entry.civitai_version_id})"
        if entry.civitai_model_id else ""))
    embed.add_field(name="Trigger words", value=(", ".join(entry.trigger_words) or "none")[:1024], inline=False)
    if entry.tags:
        embed.add_field(name="Tags", value=", ".join(entry.tags)[:1024], inline=False)
    if entry.missing:
        embed.add_field(name="⚠️ Missing", value="The file is gone from the volume: import it again or delete the entry.", inline=False)
    if entry.thumbnail_url and (age_ok or not entry.nsfw):
        embed.set_thumbnail(url=entry.thumbnail_url)
    embed.set_footer(text=f"added {entry.added_at}")
    return embed


def list_text(entries: list[LibraryEntry], page: int, heading: str) -> str:
    pages = max(1, -(-len(entries) // PAGE_SIZE))
    page = min(max(page, 0), pages - 1)
    lines = [f"**{heading}** · {plural(len(entries), 'model')} · page {page + 1}/{pages}"]
    for entry in entries[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]:
        triggers = f" · triggers: {_escape(', '.join(entry.trigger_words))[:120]}" if entry.trigger_words else ""
        flag = " ⚠️ missing" if entry.missing else ""
        lines.append(f"• **{_escape(entry.name)}** ({entry.type}, {entry.base_model or '?'}, {size_text(entry.size_bytes)})"
                     f"{triggers}{flag}\n  {_code(entry.file)}")
    if not entries:
        lines.append("Nothing here yet. The bot's operators can add models with `/models import`.")
    return "\n".join(lines)[:2000]


class ListView(OwnedView):
    def __init__(self, owner_id: int, entries: list[LibraryEntry], heading: str):
        super().__init__(owner_id)
        self.entries, self.heading, self.page = entries, heading, 0
        self.pages = max(1, -(-len(entries) // PAGE_SIZE))
        self._sync()

    def text(self) -> str:
        return list_text(self.entries, self.page, self.heading)

    def _sync(self) -> None:
        self.previous.disabled = self.page == 0
        self.next.disabled = self.page >= self.pages - 1

    async def _turn(self, interaction: discord.Interaction, step: int) -> None:
        self.page = min(max(self.page + step, 0), self.pages - 1)
        self._sync()
        await interaction.response.edit_message(content=self.text(), view=self)

    @discord.ui.button(label="◀ Previous", style=discord.ButtonStyle.secondary)
    async def previous(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await self._turn(interaction, -1)

    @discord.ui.button(label="Next ▶", style=discord.ButtonStyle.secondary)
    async def next(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await self._turn(interaction, 1)


class Models(commands.Cog):
    models = app_commands.Group(name="models", description="LoRAs and checkpoints: import from CivitAI, browse, manage")

    def __init__(self, bot: commands.Bot):
        self.bot = bot
        self.library = bot_library(bot)
        self.presenters = {
            ModelImportRequest: partial(self.present_entry, "✅ Imported:"),
            ModelUploadRequest: partial(self.present_entry, "✅ Added:"),
            ModelDeleteRequest: self.present_delete,
            ModelScanRequest: self.present_scan,
        }
        bot.tracker.presenters.update(self.presenters)
        bot.add_dynamic_items(ImportMissingButton)

    async def cog_unload(self) -> None:
        for request in self.presenters:
            self.bot.tracker.presenters.pop(request, None)
        self.bot.remove_dynamic_items(ImportMissingButton)

    # ------------------------------------------------------------ helpers

    async def importing_guild(self, interaction: discord.Interaction) -> int | None:
        """The server an import or upload will belong to (None: shared, an operator's); refused, with the
        role it needs, for anyone else than an operator or an admin of a server the operators allowed."""
        if await is_operator(interaction):
            return None
        settings = await load_guild_settings(self.bot.backend.store, interaction.guild_id)
        if interaction.guild_id is None or not settings.imports_allowed:
            raise ToolboxError(ErrorCode.PERMISSION_DENIED, "Only the bot's operators can add models here: "
                               "they have not let this server's admins import (/settings imports).")
        require_admin(interaction, "add models")
        return interaction.guild_id

    async def require_entry_change(self, interaction: discord.Interaction, entry: LibraryEntry, verb: str) -> None:
        """Operators change any entry; a server's admins only those their server imported."""
        if await is_operator(interaction):
            return
        if entry.imported_by_guild is None:
            raise ToolboxError(ErrorCode.PERMISSION_DENIED, f"Only the bot's operators can {verb} shared models.")
        if entry.imported_by_guild != interaction.guild_id:
            raise ToolboxError(ErrorCode.PERMISSION_DENIED, f"Only the bot's operators (or the admins of the server "
                               f"that imported it) can {verb} {_escape(entry.name)}.")
        require_admin(interaction, f"{verb} the models this server imported")

    async def run_job(self, interaction: discord.Interaction, request: JobRequest, meta: dict[str, Any]) -> None:
        """Submit a /models job and follow it in the interaction's message through the job tracker:
        live progress, a Cancel button, the bot token after 15 minutes, and resumption after a restart."""
        job, target = await self.bot.tracker.start(interaction, request, meta)
        await self.bot.tracker.run(job, target)

    # The finished jobs' messages: the library entry, or what was deleted or found.

    async def present_entry(self, done: str, job: Job, result: dict[str, Any], target: ReplyTarget) -> None:
        heading = "Already in the library:" if result["already_installed"] else done
        await target.edit(content=heading, embed=entry_embed(result["entry"], job.meta.get("age_ok", False)), view=None)

    async def present_delete(self, job: Job, result: dict[str, Any], target: ReplyTarget) -> None:
        name, file = _escape(result["entry"]["name"]), _code(result["entry"]["file"])
        await target.edit(content=f"🗑️ Deleted **{name}** ({file}).", embed=None, view=None)

    async def present_scan(self, job: Job, result: dict[str, Any], target: ReplyTarget) -> None:
        await target.edit(content=scan_text(result), embed=None, view=None)

    async def name_autocomplete(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return [app_commands.Choice(name=label, value=value) for label, value in await self.library.choices(current)]

    async def checkpoint_autocomplete(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return [app_commands.Choice(name=label, value=value) for label, value in await self.library.checkpoint_choices(current)]

    # ------------------------------------------------------------ import

    @models.command(name="import", description="Import a LoRA or checkpoint from CivitAI (operators, allowed admins)")
    @app_commands.describe(source="A CivitAI link, model id, v:<version id>, download link or AIR URN")
    async def import_(self, interaction: discord.Interaction, source: SourceOption) -> None:
        guild_id = await self.importing_guild(interaction)
        ref = parse_reference(source)
        await interaction.response.defer(thinking=True)
        await self.preview_import(interaction, ref, guild_id, interaction.edit_original_response)

    async def preview_import(self, interaction: discord.Interaction, ref: CivitaiRef, guild_id: int | None,
                             show: Callable[..., Awaitable[Any]]) -> None:
        """The import's preview, shown with `show(content=, embed=, view=)`: the model's card and a Download
        button for whoever asked (or that it is already installed)."""
        client = await civitai_client(self.bot.settings.civitai_api_base, self.bot.backend.store)
        try:
            plan = await asyncio.to_thread(plan_import, client, ref)
        finally:
            client.close()
        age_ok = age_restricted(interaction)
        installed = await self.library.by_version(plan.version_id)
        if installed is not None and not installed.missing:
            await show(content="Already installed:", embed=entry_embed(installed, age_ok))
            return

        async def download(button_interaction: discord.Interaction) -> None:
            await self.run_job(button_interaction,
                               ModelImportRequest.parse({"ref": f"v:{plan.version_id}", "guild_id": guild_id,
                                                         "api_base": self.bot.settings.civitai_api_base}),
                               {"title": f"Importing {plan.name}", "age_ok": age_ok})

        view = ConfirmView(interaction.user.id, "Download", discord.ButtonStyle.success, download)
        await show(content=f"Import this {plan.type} ({size_text(plan.size_bytes)})?", embed=plan_embed(plan, age_ok),
                   view=view)

    async def may_import(self, interaction: discord.Interaction) -> bool:
        """Whether whoever asked may add models here (what `importing_guild` checks), without telling them."""
        try:
            await self.importing_guild(interaction)
        except ToolboxError:
            return False
        return True

    async def import_missing(self, interaction: discord.Interaction, version_ids: list[int]) -> None:
        """Import missing: each version's preview, as `/models import v:<id>` shows it, in a message of its own
        (one that cannot be previewed says why, and the others still are)."""
        guild_id = await self.importing_guild(interaction)
        await interaction.response.defer(thinking=True)
        for number, version_id in enumerate(version_ids):
            show = interaction.edit_original_response if number == 0 else interaction.followup.send
            try:
                await self.preview_import(interaction, CivitaiRef(version_id=version_id), guild_id, show)
            except ToolboxError as error:
                await show(content=f"Model version {version_id}: {error_text(error)}")

    # ------------------------------------------------------------ browsing

    @models.command(name="list", description="Browse the model library")
    @app_commands.describe(type="Only LoRAs or only checkpoints", query="Search names, tags and trigger words")
    @app_commands.choices(type=TYPE_CHOICES)
    async def list_(self, interaction: discord.Interaction, type: app_commands.Choice[str] | None = None,
                    query: app_commands.Range[str, 1, 100] | None = None) -> None:
        found = await self.library.search(query, type.value if type else None)
        heading = "Model library" + (f" · {type.name}s" if type else "") + (f" · “{_escape(query)}”" if query else "")
        view = ListView(interaction.user.id, found, heading)
        await interaction.response.send_message(view.text(), view=view if view.pages > 1 else discord.utils.MISSING,
                                                ephemeral=True)

    @models.command(name="info", description="Details of one model")
    @app_commands.describe(name="The model")
    @app_commands.autocomplete(name=name_autocomplete)
    async def info(self, interaction: discord.Interaction, name: str) -> None:
        entry = await self.library.find(name)
        active = await self.library.active_checkpoint()
        prefix = "⭐ " if active["file"] == entry.file else ""
        await interaction.response.send_message(embed=entry_embed(entry, age_restricted(interaction), prefix), ephemeral=True)

    # ------------------------------------------------------------ admin verbs

    @models.command(name="edit", description="Rename a model, set its trigger words, default weight or sampler (operators)")
    @app_commands.describe(name="The model", display_name="New name", trigger_words="Comma-separated",
                           weight="Default LoRA weight",
                           sampler="A checkpoint's sampler for jobs that name none (none: the base checkpoint's)")
    @app_commands.choices(sampler=[app_commands.Choice(name="none: the base checkpoint's", value=NO_SAMPLER),
                                   *SAMPLER_CHOICES])
    @app_commands.autocomplete(name=name_autocomplete)
    async def edit(self, interaction: discord.Interaction, name: str,
                   display_name: DisplayNameOption | None = None,
                   trigger_words: TriggerWordsOption | None = None,
                   weight: LoraWeightOption | None = None,
                   sampler: app_commands.Choice[str] | None = None) -> None:
        await self.require_entry_change(interaction, await self.library.find(name), "edit")
        entry = await self.library.edit(name, display_name, trigger_words, weight, sampler and sampler.value)
        await interaction.response.send_message("✅ Updated:", embed=entry_embed(entry, age_restricted(interaction)), ephemeral=True)

    @models.command(name="delete", description="Delete a model and its file (operators)")
    @app_commands.describe(name="The model")
    @app_commands.autocomplete(name=name_autocomplete)
    async def delete(self, interaction: discord.Interaction, name: str) -> None:
        entry = await self.library.find(name)
        await self.require_entry_change(interaction, entry, "delete")
        active = await self.library.active_checkpoint()
        if active["file"] == entry.file:
            raise ToolboxError(ErrorCode.INVALID_INPUT, f"{entry.name} is the active checkpoint. Switch to another one first.")

        async def confirmed(button_interaction: discord.Interaction) -> None:
            await self.run_job(button_interaction, ModelDeleteRequest.parse({"name": entry.file}),
                               {"title": f"Deleting {entry.name}"})

        view = ConfirmView(interaction.user.id, "Delete", discord.ButtonStyle.danger, confirmed)
        await interaction.response.send_message(f"Delete **{_escape(entry.name)}** and its file ({size_text(entry.size_bytes)})?",
                                                embed=entry_embed(entry, age_restricted(interaction)), view=view)

    @models.command(name="checkpoint", description="Show the active checkpoint, or switch every server's (operators)")
    @app_commands.describe(name="The checkpoint to use (leave empty to see the current one)")
    @app_commands.autocomplete(name=checkpoint_autocomplete)
    async def checkpoint(self, interaction: discord.Interaction, name: str | None = None) -> None:
        if name is None:
            active = await self.library.active_checkpoint()
            await interaction.response.send_message(f"Active checkpoint: **{_escape(active['name'])}**", ephemeral=True)
            return
        # One checkpoint for the whole deployment: switching it changes every server's images.
        await require_operator(interaction, "switch the checkpoint (it is every server's)")
        active = await self.library.set_active_checkpoint(name)
        note = "" if active["key"] == DEFAULT_CHECKPOINT else " The upscaler loads it on its next job."
        await interaction.response.send_message(f"✅ Active checkpoint: **{_escape(active['name'])}**.{note}")

    @models.command(name="upload", description="Add a .safetensors LoRA or checkpoint (operators, allowed admins)")
    @app_commands.describe(file="A .safetensors file", type="What it is", name="Display name",
                           trigger_words="Comma-separated")
    @app_commands.choices(type=TYPE_CHOICES)
    async def upload(self, interaction: discord.Interaction, file: discord.Attachment, type: app_commands.Choice[str],
                     name: DisplayNameOption | None = None,
                     trigger_words: TriggerWordsOption | None = None) -> None:
        guild_id = await self.importing_guild(interaction)
        if PurePath(file.filename).suffix.lower() != ".safetensors":
            raise ToolboxError(ErrorCode.INVALID_INPUT, "Only .safetensors files can be added (.ckpt/.pt/.bin run code when loaded).")
        if not file.size:
            raise ToolboxError(ErrorCode.INVALID_INPUT, "That file is empty.")
        await interaction.response.defer(thinking=True)
        request = ModelUploadRequest.parse({
            "url": file.url, "filename": file.filename, "type": type.value, "size_bytes": file.size,
            "name": name, "trigger_words": trigger_words, "guild_id": guild_id,
            "api_base": self.bot.settings.civitai_api_base,
        })
        await self.run_job(interaction, request, {"title": f"Adding {file.filename}", "age_ok": age_restricted(interaction)})

    @models.command(name="scan", description="Find files with no entry and entries with no file (operators)")
    @app_commands.describe(adopt="Add the untracked files to the library")
    async def scan(self, interaction: discord.Interaction, adopt: bool = False) -> None:
        await require_operator(interaction, "scan the library")
        await interaction.response.defer(thinking=True, ephemeral=True)
        await self.run_job(interaction, ModelScanRequest.parse({"adopt": adopt, "api_base": self.bot.settings.civitai_api_base}),
                           {"title": "Scanning the library"})


def scan_text(report: dict[str, Any]) -> str:
    lines = ["**Library scan**"]
    lines.append(f"Untracked files: {len(report['untracked'])}" + "".join(
        f"\n• {_code(item['file'])} ({item['type']}, {size_text(item['size_bytes'])})" for item in report["untracked"][:15]))
    lines.append(f"Entries whose file is missing: {len(report['missing'])}" + "".join(
        f"\n• {_code(file)}" for file in report["missing"][:15]))
    if report.get("restored"):
        lines.append(f"Entries restored from their sidecars: {report['restored']}")
    if report.get("adopted"):
        lines.append("Adopted: " + ", ".join(_code(e['file']) for e in report["adopted"][:15]))
    if report.get("failed"):
        lines.append("Not adopted: " + "; ".join(f"{_code(f['file'])}: {render(f['message'], FrontEnd.DISCORD)}" for f in report["failed"][:10]))
    if report["untracked"] and not report.get("adopted") and not report.get("failed"):
        lines.append("Run `/models scan adopt:True` to add the untracked files.")
    return "\n".join(lines)[:2000]


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Models(bot))
