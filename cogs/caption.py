"""/caption and the "Caption image" message menu."""

from __future__ import annotations

import asyncio

import discord
from discord import app_commands
from discord.ext import commands

from bot.attachments import ReceivedImage, check_attachment, image_attachments, read_image
from bot.progress import ReplyEditor, follow_job, render_job
from modal_services.errors import ErrorCode, ToolboxError

# The caption engine never looks at more than this many pixels a side, so the
# bot shrinks images first: less to send to the worker.
CAPTION_MAX_SIDE = 1024
MAX_QUESTION_CHARS = 500
MESSAGE_LIMIT = 2000

STYLE_CHOICES = [
    app_commands.Choice(name="descriptive: a detailed paragraph", value="descriptive"),
    app_commands.Choice(name="tags: booru-style tags for SDXL prompts", value="tags"),
    app_commands.Choice(name="short: one sentence, good alt text", value="short"),
]


def caption_blocks(images: list[ReceivedImage], captions: list[str], label: str) -> list[str]:
    blocks = []
    for index, (image, caption) in enumerate(zip(images, captions), start=1):
        heading = f"**{label}**" if len(images) == 1 else f"**{index}. {discord.utils.escape_markdown(image.filename)}**"
        if image.animated:
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
    def __init__(self, bot: commands.Bot):
        self.bot = bot
        self.menu = app_commands.ContextMenu(name="Caption image", callback=self.caption_message)
        bot.tree.add_command(self.menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.menu.name, type=self.menu.type)

    @app_commands.command(name="caption", description="Describe an image, or tag it for SDXL prompts")
    @app_commands.describe(
        image="The image to caption",
        style="How to write the caption (default: descriptive)",
        question="Ask something about the image instead",
    )
    @app_commands.choices(style=STYLE_CHOICES)
    async def caption(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        style: app_commands.Choice[str] | None = None,
        question: app_commands.Range[str, 1, MAX_QUESTION_CHARS] | None = None,
    ) -> None:
        await self.run_caption(interaction, [image], style.value if style else "descriptive", question)

    async def caption_message(self, interaction: discord.Interaction, message: discord.Message) -> None:
        await self.run_caption(interaction, image_attachments(message), "descriptive", None)

    async def run_caption(
        self,
        interaction: discord.Interaction,
        attachments: list[discord.Attachment],
        style: str,
        question: str | None,
    ) -> None:
        for attachment in attachments:
            check_attachment(attachment)
        await interaction.response.defer(thinking=True)

        images = await asyncio.gather(*(read_image(a, max_side=CAPTION_MAX_SIDE) for a in attachments))
        backend = self.bot.backend
        job = await backend.submit(
            "caption",
            {"images": [image.png for image in images], "style": style, "question": question},
            owner={
                "user_id": interaction.user.id,
                "guild_id": interaction.guild_id,
                "channel_id": interaction.channel_id,
            },
        )
        title = "Caption" if len(images) == 1 else f"Captioning {len(images)} images"
        editor = ReplyEditor(lambda text: interaction.edit_original_response(content=text))
        captions = await follow_job(backend, job.id, lambda record: editor.show(render_job(record, title)))
        if len(captions) != len(images):
            raise ToolboxError(ErrorCode.GENERATION_FAILED, "The caption worker returned the wrong number of captions.")

        label = f"Answer: {question}" if question else f"Caption ({style})"
        first, *rest = pack_messages(caption_blocks(images, captions, label))
        await editor.show(first, final=True)
        for text in rest:
            await interaction.followup.send(text)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Caption(bot))
