"""/upscale, the "Upscale 2x" message menu, and the buttons under each result.

The reply shows the job's progress (the tracker edits its text) and, every
few seconds, the worker's latest low-resolution preview as an attachment.
The result replaces the preview: the upscaled image fitted to the server's
upload limit, beside the source image, with three buttons that survive
restarts (dynamic items keyed by the job id; the job's parameters are kept
under `upscale:<job id>` in the state store, for as long as the server keeps
results, see `bot/result_params.py`):

- Upscale 2x again: the result, upscaled 2x with the same settings;
- Vary seed: the source again with another seed;
- Caption: the result through the caption cog.
"""

from __future__ import annotations

import asyncio
import io
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.attachments import check_attachment, image_attachments, looks_like_image, read_image
from bot.content_safety import age_restricted, public_lines, withheld_notice
from bot.guild_settings import result_retention_days
from bot.library_options import bot_library, lora_autocomplete, lora_slots
from bot.live_previews import LivePreviews
from bot.result_images import fit_to_limit
from bot.result_params import keep_result_params, read_result_params
from bot.progress import render_job
from bot.tile_prompts import tile_prompts
from bot.tracker import MAX_REQUEST_BYTES, Admission, ReplyTarget, cancel_view
from bot.core.build import build_upscale_request
from bot.core.choices import LoraChoice, UpscaleChoices
from bot.ui import SAMPLER_CHOICES, PersistentButton, option_range
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.requests import LoraRef, UpscaleRequest
from modal_services.jobs.validation import field_bounds
from modal_services.jobs.records import Job
from modal_services.state.keys import upscale_params_key
from modal_services.safety.judge import SafetyReport
from modal_services.engines.sdxl.limits import DEFAULT_MAX_INPUT_PIXELS

if TYPE_CHECKING:
    from bot.client import ToolboxBot

# The options /upscale offers, read from the request its job takes.
ScaleOption = option_range(UpscaleRequest, "scale")
PromptOption = option_range(UpscaleRequest, "prompt")
NegativeOption = option_range(UpscaleRequest, "negative")
LoraWeightOption = option_range(LoraRef, "weight")
CreativityOption = option_range(UpscaleRequest, "creativity")
SeedOption = option_range(UpscaleRequest, "seed")
# What a job keeps under `upscale:<id>` for the buttons under its result.
KEPT_CHOICES = ("scale", "prompt", "negative", "creativity", "seed", "sampler")
SOURCE_STEM = "source"


def _result_button(action: str, job_id: str, label: str) -> discord.ui.Button:
    return discord.ui.Button(label=label, style=discord.ButtonStyle.secondary, custom_id=f"toolbox:upscale:{action}:{job_id}")


class UpscaleAgainButton(PersistentButton, discord.ui.DynamicItem[discord.ui.Button],
                         template=r"toolbox:upscale:again:(?P<job_id>[0-9a-f]+)"):
    """Upscale 2x again: the result, upscaled 2x with the same settings."""

    def __init__(self, job_id: str):
        super().__init__(_result_button("again", job_id, "Upscale 2x again"))
        self.job_id = job_id

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.client.upscales.upscale_again(interaction, self.job_id)


class VarySeedButton(PersistentButton, discord.ui.DynamicItem[discord.ui.Button],
                     template=r"toolbox:upscale:vary:(?P<job_id>[0-9a-f]+)"):
    """Vary seed: the source again, with another seed."""

    def __init__(self, job_id: str):
        super().__init__(_result_button("vary", job_id, "Vary seed"))
        self.job_id = job_id

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.client.upscales.vary_seed(interaction, self.job_id)


class CaptionResultButton(PersistentButton, discord.ui.DynamicItem[discord.ui.Button],
                          template=r"toolbox:upscale:caption:(?P<job_id>[0-9a-f]+)"):
    """Caption: the result, captioned (the job id only names the button)."""

    def __init__(self, job_id: str):
        super().__init__(_result_button("caption", job_id, "Caption"))
        self.job_id = job_id

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.client.upscales.caption_result(interaction)


# The buttons this cog answers.
BUTTONS = (UpscaleAgainButton, VarySeedButton, CaptionResultButton)


def result_view(job_id: str, with_source: bool) -> discord.ui.View:
    """Upscale 2x again, Vary seed (when the source rides along) and Caption."""
    view = discord.ui.View(timeout=None)
    view.add_item(UpscaleAgainButton(job_id))
    if with_source:
        view.add_item(VarySeedButton(job_id))
    view.add_item(CaptionResultButton(job_id))
    return view


def posted_result(message: discord.Message) -> discord.Attachment:
    """A result message's upscaled image, or the reason a button cannot use it."""
    result = split_attachments(message)[0]
    if result is None:
        raise ToolboxError(ErrorCode.INVALID_INPUT, "That message has no result image any more.")
    return result


def split_attachments(message: discord.Message) -> tuple[discord.Attachment | None, discord.Attachment | None]:
    """(result, source) among a result message's attachments."""
    result = source = None
    for attachment in message.attachments:
        if not looks_like_image(attachment):
            continue
        if attachment.filename.removeprefix("SPOILER_").rsplit(".", 1)[0] == SOURCE_STEM:
            source = attachment
        elif result is None:
            result = attachment
    return result, source


class Upscale(commands.Cog):
    def __init__(self, bot: ToolboxBot):
        self.bot = bot
        self.library = bot_library(bot)
        self.menu = app_commands.ContextMenu(name="Upscale 2x", callback=self.upscale_message)
        bot.tree.add_command(self.menu)
        bot.add_dynamic_items(*BUTTONS)
        bot.tracker.presenters[UpscaleRequest] = self.present
        self.previews = LivePreviews(lambda: bot.backend.store)
        # Source images of running jobs, attached beside their results (for Vary seed).
        self._sources: dict[str, tuple[bytes, str]] = {}
        bot.upscales = self

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.menu.name, type=self.menu.type)
        self.bot.remove_dynamic_items(*BUTTONS)
        self.bot.tracker.presenters.pop(UpscaleRequest, None)
        self.bot.upscales = None

    @app_commands.command(name="upscale", description="Upscale an image 1.5x-4x with SDXL, optionally with LoRAs")
    @app_commands.describe(
        image="The image to upscale",
        scale="How much larger (default: the server's, usually 2x)",
        prompt="What the image shows, to guide new detail",
        negative="What to avoid",
        lora1="A LoRA from the library",
        lora1_weight="Its weight (default: the library's recommendation)",
        lora2="A second LoRA",
        lora2_weight="Its weight",
        lora3="A third LoRA",
        lora3_weight="Its weight",
        creativity="How much may change: {0:g} (faithful) to {1:g} (repaint); default {2:g}".format(
            *field_bounds(UpscaleRequest, "creativity"), UpscaleRequest.model_fields["creativity"].default),
        seed="For repeatable results (default: random)",
        tile_captions="Caption each tile (tags) and add that to its prompt: slower, more fitting detail",
        sampler="The sampler, as A1111 names it (default: the checkpoint config's, Euler)",
    )
    @app_commands.choices(sampler=SAMPLER_CHOICES)
    @app_commands.autocomplete(lora1=lora_autocomplete, lora2=lora_autocomplete, lora3=lora_autocomplete)
    async def upscale(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        scale: ScaleOption | None = None,
        prompt: PromptOption | None = None,
        negative: NegativeOption | None = None,
        lora1: str | None = None,
        lora1_weight: LoraWeightOption | None = None,
        lora2: str | None = None,
        lora2_weight: LoraWeightOption | None = None,
        lora3: str | None = None,
        lora3_weight: LoraWeightOption | None = None,
        creativity: CreativityOption | None = None,
        seed: SeedOption | None = None,
        tile_captions: bool = False,
        sampler: app_commands.Choice[str] | None = None,
    ) -> None:
        loras = lora_slots((lora1, lora1_weight), (lora2, lora2_weight), (lora3, lora3_weight))
        params = {"scale": scale, "prompt": prompt or "", "negative": negative or "", "loras": loras,
                  "creativity": creativity, "seed": seed, "tile_captions": tile_captions, "real_photo": True,
                  "sampler": sampler.value if sampler else None}
        await self.run_upscale(interaction, image, params)

    async def upscale_message(self, interaction: discord.Interaction, message: discord.Message) -> None:
        # A message the bot posted holds its own result; anyone else's image may be a real person's photo.
        posted_by_bot = self.bot.user is not None and message.author.id == self.bot.user.id
        await self.run_upscale(interaction, image_attachments(message)[0], {"scale": 2.0, "real_photo": not posted_by_bot})

    # ------------------------------------------------------------ the buttons under a result

    async def upscale_again(self, interaction: discord.Interaction, job_id: str) -> None:
        """The result, upscaled 2x with job `job_id`'s settings."""
        params = await self._kept_settings(interaction.guild_id, job_id)
        await self.run_upscale(interaction, posted_result(interaction.message), {**params, "scale": 2.0})

    async def vary_seed(self, interaction: discord.Interaction, job_id: str) -> None:
        """The source again, with job `job_id`'s settings and another seed."""
        params = await self._kept_settings(interaction.guild_id, job_id)
        source = split_attachments(interaction.message)[1]
        if source is None:
            raise ToolboxError(ErrorCode.INVALID_INPUT, "The source image is not attached to that message.")
        # A source kept from before the job said where it came from counts as uploaded.
        await self.run_upscale(interaction, source, {**params, "seed": None, "real_photo": params.get("real_photo", True)})

    async def caption_result(self, interaction: discord.Interaction) -> None:
        """The result, captioned by the caption cog in the server's default style."""
        await self.bot.captions.run_caption(interaction, [posted_result(interaction.message)], None, None)

    async def _kept_settings(self, guild_id: int | None, job_id: str) -> dict[str, Any]:
        """Job `job_id`'s settings (none kept: the server's defaults); too old for the retention, or made on
        another server than `guild_id` (where the button is pressed): refused."""
        store = self.bot.backend.store
        return await read_result_params(store, upscale_params_key(job_id), guild_id, result_retention_days) or {}

    # ------------------------------------------------------------ the job

    async def run_upscale(self, interaction: discord.Interaction, attachment: discord.Attachment, params: dict[str, Any]) -> None:
        check_attachment(attachment, max_pixels=DEFAULT_MAX_INPUT_PIXELS)
        await interaction.response.defer(thinking=True)
        async with self.bot.tracker.admission(interaction) as admission:
            await self._upscale(interaction, attachment, params, admission)

    async def _upscale(self, interaction: discord.Interaction, attachment: discord.Attachment, params: dict[str, Any],
                       admission: Admission) -> None:
        settings = admission.settings
        received = await read_image(attachment, max_pixels=DEFAULT_MAX_INPUT_PIXELS)
        choices = UpscaleChoices(
            image=received.png, scale=params.get("scale") or settings.default_upscale_scale,
            prompt=params.get("prompt"), negative=params.get("negative"),
            creativity=params.get("creativity") or settings.default_creativity, seed=params.get("seed"),
            sampler=params.get("sampler"),
            loras=tuple(LoraChoice(**lora) for lora in params.get("loras") or ()),
            # Judged for the channel this was asked in (a button's too): recomputed, never kept with the params;
            # whether the source is a real person's photo is kept, for the result's buttons.
            safety=settings.safety_for(age_restricted(interaction)).model_copy(
                update={"real_photo": bool(params.get("real_photo"))}),
        )
        # Checked before anything is sent to the worker, with the limits it applies.
        built = await build_upscale_request(self.library, choices)
        request, checkpoint, (out_width, out_height) = built.request, built.checkpoint, built.output_size
        target = await self.bot.tracker.reply_target(interaction)
        if params.get("tile_captions"):
            regions = await self._caption_tiles(interaction, target, received, out_width, out_height)
            request = request.with_region_prompts(regions)
        kept = {name: getattr(request, name) for name in KEPT_CHOICES}
        kept["tile_captions"] = bool(params.get("tile_captions"))
        kept["real_photo"] = request.safety.real_photo
        kept["loras"] = [{"name": lora.file, "weight": lora.weight} for lora in request.loras]
        meta = {
            "title": f"Upscale {request.scale:g}x → {out_width}×{out_height}",
            "summary": describe(kept, [lora.name for lora in request.loras], checkpoint["name"]),
        }
        job, target = await self.bot.tracker.start(interaction, request, meta, admission, target)
        await keep_result_params(self.bot.backend.store, upscale_params_key(job.id), kept, interaction.guild_id)
        self._sources[job.id] = (received.png, f"{SOURCE_STEM}.png")
        self.previews.start(job.id, target)
        try:
            await self.bot.tracker.run(job, target)
        finally:
            await self.previews.stop(job.id)
            self._sources.pop(job.id, None)

    async def _caption_tiles(self, interaction: discord.Interaction, target: ReplyTarget, received,
                             out_width: int, out_height: int) -> list[dict]:
        """Tags for each tile the worker will denoise, with the usual progress and Cancel button."""
        cancel: dict[str, discord.ui.View] = {}
        owner = {"user_id": interaction.user.id, "guild_id": interaction.guild_id, "channel_id": interaction.channel_id}

        async def show(record: Job) -> None:
            cancel.setdefault("view", cancel_view(record.id))
            target.post(content=render_job(record, record.meta.get("title", "Tile captions")), view=cancel["view"])

        return await tile_prompts(self.bot.backend, received.png, received.size, (out_width, out_height), show, owner)

    async def present(self, job: Job, result: dict, target: ReplyTarget) -> None:
        await self.previews.stop(job.id)
        report = SafetyReport.from_dict(result["safety"])
        title = f"✅ **{job.meta.get('title', 'Upscale')}**"
        png = result["image"]
        if png is None:  # withheld in the worker: nothing to post, and no source beside it
            lines = [title, job.meta.get("summary", ""), *public_lines(report)]
            await target.edit(content="\n".join(line for line in lines if line), attachments=[], view=None)
            await target.tell_requester(withheld_notice(report))
            return
        spoiler = bool(report.spoilered)
        limit = target.upload_limit(job.owner.get("guild_id"))
        fitted = await asyncio.to_thread(fit_to_limit, png, limit)
        files = [discord.File(io.BytesIO(fitted.data), fitted.filename, spoiler=spoiler)]
        source = self._sources.get(job.id)
        # The source rides along for Vary seed when the request stays within Discord's limits.
        with_source = (
            source is not None and len(source[0]) <= limit and len(source[0]) + len(fitted.data) <= MAX_REQUEST_BYTES
        )
        if with_source:
            files.append(discord.File(io.BytesIO(source[0]), source[1], spoiler=spoiler))
        lines = [title, job.meta.get("summary", "")]
        if fitted.note:
            lines.append(f"-# {fitted.note}")
        lines += public_lines(report)
        await target.edit(content="\n".join(line for line in lines if line), attachments=files,
                          view=result_view(job.id, with_source))


def describe(params: dict[str, Any], lora_names: list[str], checkpoint: str) -> str:
    parts = [f"creativity {params['creativity']:g}", *([params["sampler"]] if params.get("sampler") else []),
             f"seed {params['seed']}", checkpoint]
    if params.get("tile_captions"):
        parts.append("tile captions")
    parts += [f"{name} ({lora['weight']:g})" for name, lora in zip(lora_names, params["loras"])]
    if params["prompt"]:
        parts.append(f"“{params['prompt'][:120]}”")
    return " · ".join(parts)


async def setup(bot: ToolboxBot) -> None:
    await bot.add_cog(Upscale(bot))
