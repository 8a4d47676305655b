"""Image info: how the images of a message were made, read from their metadata and shown privately.

A message context menu. Each image attachment (up to `MAX_IMAGES`) is
downloaded as any attachment is (size checked first, through the egress
policy), and its metadata alone is read in a thread
(`modal_services.image_info.reading`: A1111/Forge, ComfyUI, NovelAI, InvokeAI;
no pixel decoded). The reply, seen only by whoever asked, shows each image's
prompts and settings and what a /generate with them would be here
(`bot.core.image_settings`): its LoRAs found in the library or missing (an
admin is told how to add them), values brought within the bot's ranges.

Everything shown comes from a stranger's file: prompts sit in code blocks whose
fences they cannot close, other text is escaped, and the reply mentions no one.

**Generate with these settings** (one button per image that has a prompt)
survives restarts: the settings read are kept under `image-info:<id>` for as
long as the server keeps results (`bot/result_params.py`), and a press plans
the /generate again against the library as it is then, so a LoRA an admin has
imported since is used.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.attachments import check_attachment, image_attachments, read_bytes
from bot.core.image_settings import Remake, plan_generate, setting_pairs
from bot.guild_settings import result_retention_days
from bot.library_options import bot_library
from bot.permissions import is_admin
from bot.replies import safe_inline
from bot.result_params import keep_result_params, read_result_params
from bot.ui import PersistentButton
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.image_info.reading import MAX_IMAGE_BYTES, read_generation_settings
from modal_services.image_info.settings import GenerationSettings
from modal_services.state.keys import image_info_key

if TYPE_CHECKING:
    from bot.client import ToolboxBot

MAX_IMAGES = 4
MESSAGE_LIMIT = 2000
# Only the metadata is read, never the pixels: Discord's reported size says nothing about the cost.
ANY_PIXEL_COUNT = 2**62
# A look-alike of the backtick, so a prompt cannot close the code block it is shown in.
BACKTICK_STAND_IN = "ˋ"
NO_MENTIONS = discord.AllowedMentions.none()
CODE_FENCES = "```\n{}\n```"
# The least of a prompt shown, however many notes there are.
MIN_PROMPT_ROOM = 60


class GenerateWithSettingsButton(PersistentButton, discord.ui.DynamicItem[discord.ui.Button],
                                 template=r"toolbox:image-info:generate:(?P<reading_id>[0-9a-f]+)"):
    """Under an Image info reply: a /generate with the settings read from that image."""

    def __init__(self, reading_id: str, label: str = "Generate with these settings"):
        super().__init__(discord.ui.Button(label=label, style=discord.ButtonStyle.primary, emoji="🎨",
                                           custom_id=f"toolbox:image-info:generate:{reading_id}"))
        self.reading_id = reading_id

    async def callback(self, interaction: discord.Interaction) -> None:
        cog = interaction.client.get_cog(ImageInfo.__cog_name__)
        if cog is None:
            raise ToolboxError(ErrorCode.INVALID_INPUT, "Image info is not available right now; try again later.")
        await cog.generate_with(interaction, self.reading_id)


class ImageInfo(commands.Cog):
    def __init__(self, bot: ToolboxBot):
        self.bot = bot
        self.library = bot_library(bot)
        self.menu = app_commands.ContextMenu(name="Image info", callback=self.image_info)
        bot.tree.add_command(self.menu)
        bot.add_dynamic_items(GenerateWithSettingsButton)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.menu.name, type=self.menu.type)
        self.bot.remove_dynamic_items(GenerateWithSettingsButton)

    async def image_info(self, interaction: discord.Interaction, message: discord.Message) -> None:
        every_image = image_attachments(message)
        attachments = every_image[:MAX_IMAGES]
        for attachment in attachments:
            check_attachment(attachment, max_bytes=MAX_IMAGE_BYTES, max_pixels=ANY_PIXEL_COUNT)
        await interaction.response.defer(ephemeral=True, thinking=True)
        readings = [await self._read(attachment) for attachment in attachments]
        view = discord.ui.View(timeout=None)
        sections = []
        budget = (MESSAGE_LIMIT - 100) // len(readings)
        for number, (attachment, settings) in enumerate(zip(attachments, readings), start=1):
            remake = await plan_generate(settings, self.library) if settings else None
            if remake is not None and remake.problem is None:
                reading_id = secrets.token_hex(8)
                await keep_result_params(self.bot.backend.store, image_info_key(reading_id), settings.to_dict(),
                                         interaction.guild_id)
                label = "Generate with these settings" if len(readings) == 1 else f"Generate with image {number}'s settings"
                view.add_item(GenerateWithSettingsButton(reading_id, label))
            sections.append(describe_image(attachment.filename, settings, remake, is_admin(interaction), budget))
        if len(every_image) > MAX_IMAGES:
            sections.append(f"-# Only the first {MAX_IMAGES} of the message's {len(every_image)} images are read.")
        await interaction.edit_original_response(content="\n".join(sections),
                                                 view=view if view.children else None, allowed_mentions=NO_MENTIONS)

    async def _read(self, attachment: discord.Attachment) -> GenerationSettings | None:
        data = await read_bytes(attachment)
        name = f"`{discord.utils.escape_markdown(attachment.filename)}`"
        return await asyncio.to_thread(read_generation_settings, data, name)

    async def generate_with(self, interaction: discord.Interaction, reading_id: str) -> None:
        """The button: the kept settings planned against the library as it is now, then /generate's own path."""
        kept = await read_result_params(self.bot.backend.store, image_info_key(reading_id), interaction.guild_id,
                                        result_retention_days)
        if kept is None:
            raise ToolboxError(ErrorCode.INVALID_INPUT, "Those settings are no longer kept; use Image info on the image again.")
        remake = await plan_generate(GenerationSettings.from_dict(kept), self.library)
        if remake.problem:
            raise ToolboxError(ErrorCode.INVALID_INPUT, remake.problem)
        if self.bot.generations is None:
            raise ToolboxError(ErrorCode.INVALID_INPUT, "/generate is not available right now; try again later.")
        await self.bot.generations.run_generate(interaction, remake.params)


def describe_image(filename: str, settings: GenerationSettings | None, remake: Remake | None, admin: bool,
                   budget: int) -> str:
    """One image's part of the reply, within `budget` characters: the prompts get what the rest leaves."""
    title = f"🔎 **{safe_inline(filename, 80)}**"
    if settings is None:
        return f"{title}: no generation data (A1111/Forge, ComfyUI, NovelAI or InvokeAI) in this file."
    head = f"{title} · {safe_inline(settings.source, 40)}"
    pairs = " · ".join(f"{label} {value}" for label, value in setting_pairs(settings))
    tail = [safe_inline(pairs, budget // 3)] + (_remake_lines(remake, admin) if remake else [])
    negative_heading = "Negative prompt:\n" if settings.negative_prompt else ""
    overhead = len(CODE_FENCES) * (2 if negative_heading else 1) + len(negative_heading) + 4
    while len(tail) > 1 and len("\n".join([head, *tail])) + overhead + MIN_PROMPT_ROOM > budget:
        tail.pop()
    room = max(MIN_PROMPT_ROOM, budget - len("\n".join([head, *tail])) - overhead)
    blocks = [code_block(settings.prompt, room * 2 // 3 if negative_heading else room)]
    if negative_heading:
        blocks.append(negative_heading + code_block(settings.negative_prompt, room // 3))
    return "\n".join([head, *blocks, *tail])


def _remake_lines(remake: Remake, admin: bool) -> list[str]:
    if remake.problem:
        return [f"-# Cannot be generated here: {safe_inline(remake.problem, 200)}"]
    lines = [f"-# {safe_inline(note, 200)}" for note in remake.notes]
    if remake.found:
        lines.append("-# In the library: " + ", ".join(safe_inline(entry.name, 60) for _, entry in remake.found))
    if remake.missing:
        names = ", ".join(safe_inline(lora.name, 60) for lora in remake.missing)
        hint = (" Add them with /models import and each one's CivitAI link." if admin
                else " A server admin can add them.")
        lines.append(f"-# Not in the library, left out of Generate: {names}.{hint}")
    return lines


def code_block(text: str, limit: int) -> str:
    """`text` in a code block it cannot leave, cut to `limit` characters."""
    text = text.replace("`", BACKTICK_STAND_IN)
    if len(text) > limit:
        text = text[: max(0, limit - 1)] + "…"
    return CODE_FENCES.format(text)


async def setup(bot: ToolboxBot) -> None:
    await bot.add_cog(ImageInfo(bot))
