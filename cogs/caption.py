"""/caption and the "Caption image" message menu."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.attachments import check_attachment, image_attachments, read_image
from bot.result_params import keep_result_params
from bot.tracker import ReplyTarget
from bot.ui import CAPTION_STYLE_CHOICES, option_range
from cogs.generate import generate_from_caption_view
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.requests import CaptionRequest
from modal_services.jobs.records import Job
from modal_services.state.keys import caption_prompt_key

if TYPE_CHECKING:
    from bot.client import ToolboxBot

# The caption engine never looks at more than this many pixels a side, so the
# bot shrinks images first: less to send to the worker.
CAPTION_MAX_SIDE = 1024
MESSAGE_LIMIT = 2000
QuestionOption = option_range(CaptionRequest, "question")


def caption_blocks(files: list[dict], captions: list[str], label: str) -> list[str]:
    blocks = []
    for index, (file, caption) in enumerate(zip(files, captions), start=1):
        heading = f"**{label}**" if len(files) == 1 else f"**{index}. {discord.utils.escape_markdown(file['name'])}**"
        if file["animated"]:
            heading += " (animated: first frame)"
        text = caption.replace("```", "'''") or "(the model returned no text)"
        room = MESSAGE_LIMIT - len(heading) - 10
        if len(text) > room:
            text = text[: room - 1] + "…"
        blocks.append(f"{heading}\n```\n{text}\n```")
    return blocks


def pack_messages(blocks: list[str]) -> list[str]:
    """Join blocks into as few messages as fit Discord's 2000-character limit."""
    messages: list[str] = []
    for block in blocks:
        if messages and len(messages[-1]) + 1 + len(block) <= MESSAGE_LIMIT:
            messages[-1] += "\n" + block
        else:
            messages.append(block)
    return messages


class Caption(commands.Cog):
    def __init__(self, bot: ToolboxBot):
        self.bot = bot
        self.menu = app_commands.ContextMenu(name="Caption image", callback=self.caption_message)
        bot.tree.add_command(self.menu)
        bot.tracker.presenters[CaptionRequest] = self.present
        bot.captions = self

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.menu.name, type=self.menu.type)
        self.bot.tracker.presenters.pop(CaptionRequest, None)
        self.bot.captions = None

    @app_commands.command(name="caption", description="Describe an image, or tag it for SDXL prompts")
    @app_commands.describe(
        image="The image to caption",
        style="How to write the caption (default: the server's, usually descriptive)",
        question="Ask something about the image instead",
    )
    @app_commands.choices(style=CAPTION_STYLE_CHOICES)
    async def caption(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        style: app_commands.Choice[str] | None = None,
        question: QuestionOption | None = None,
    ) -> None:
        await self.run_caption(interaction, [image], style.value if style else None, question)

    async def caption_message(self, interaction: discord.Interaction, message: discord.Message) -> None:
        await self.run_caption(interaction, image_attachments(message), None, None)

    async def run_caption(
        self,
        interaction: discord.Interaction,
        attachments: list[discord.Attachment],
        style: str | None,
        question: str | None,
    ) -> None:
        for attachment in attachments:
            check_attachment(attachment)
        await interaction.response.defer(thinking=True)
        async with self.bot.tracker.admission(interaction) as admission:
            style = style or admission.settings.default_caption_style
            images = await asyncio.gather(*(read_image(a, max_side=CAPTION_MAX_SIDE) for a in attachments))
            meta = {
                "title": "Caption" if len(images) == 1 else f"Captioning {len(images)} images",
                "style": None if question else style,
                "label": f"Answer: {question[:200]}" if question else f"Caption ({style})",
                "files": [{"name": image.filename, "animated": image.animated} for image in images],
            }
            request = CaptionRequest.parse({"images": [image.png for image in images], "style": style, "question": question})
            job, target = await self.bot.tracker.start(interaction, request, meta, admission)
            await self.bot.tracker.run(job, target)

    async def present(self, job: Job, captions: list[str], target: ReplyTarget) -> None:
        files = job.meta["files"]
        if len(captions) != len(files):
            raise ToolboxError(ErrorCode.GENERATION_FAILED, "The caption worker returned the wrong number of captions.")
        first, *rest = pack_messages(caption_blocks(files, captions, job.meta["label"]))
        view = None
        if job.meta.get("style") == "prompt" and len(captions) == 1 and captions[0] and self.bot.generations is not None:
            await keep_result_params(self.bot.backend.store, caption_prompt_key(job.id), captions[0],
                                     job.owner.get("guild_id"))
            view = generate_from_caption_view(job.id)
        await target.edit(content=first, view=view)
        for text in rest:
            await target.send(content=text)


async def setup(bot: ToolboxBot) -> None:
    await bot.add_cog(Caption(bot))
