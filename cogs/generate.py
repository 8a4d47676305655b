"""/generate: SDXL or FLUX.1-dev text-to-image, and the buttons under each result.

The reply shows the job's progress and the worker's live previews; the
result is the images themselves (Discord lays four out as a 2x2 gallery),
each fitted to the upload limit, with the prompt, seeds and settings in the
message. The buttons survive restarts (dynamic items keyed by the job id;
the request's settings are kept under `generate:<job id>` in the store, for
as long as the server keeps results, see `bot/result_params.py`):

- U1-U4: that image upscaled 2x (the upscale cog's job, same prompt and LoRAs);
- V1-V4: variations of that image: the same settings, new seeds, the image as
  the img2img start at low strength;
- Reroll: the same settings with new seeds.

With a `face` photo (InstantID) every image keeps that person's face, posed
as the face in the `pose` photo when one is given; V and Reroll keep both
photos (kept under `generate-faces:<job id>`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from typing import TYPE_CHECKING, Any, Sequence

import discord
from discord import app_commands
from discord.ext import commands

from bot.attachments import check_attachment, looks_like_image, read_image
from bot.content_safety import age_restricted, public_lines, withheld_notice
from bot.guild_settings import result_retention_days
from bot.library_options import bot_library, lora_slots, model_lora_autocomplete
from bot.live_previews import LivePreviews
from bot.remix_replies import MODELS_COG, private_offer, public_differences
from bot.result_images import fit_to_limit
from bot.result_params import keep_result_params, read_result_params
from bot.tracker import MAX_REQUEST_BYTES, Admission, ReplyTarget
from bot.ui import SAMPLER_CHOICES, PersistentButton, option_range
from bot.core.build import build_generate_request
from bot.core.remix import civitai_client, plan_remix, remix_params
from bot.core.choices import GenerateChoices, LoraChoice
from bot.core.generate_models import GENERATE_MODELS, SDXL, aspect_sizes, generate_model, model_of_kind, names_of
from bot.core.results import job_notes
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.limits import MAX_REMIX_REFERENCE_CHARS
from modal_services.library.civitai import parse_image_reference
from modal_services.jobs.requests import (
    REFERENCE_MAX_SIDE,
    GenerateRequest,
    LoraRef,
)
from modal_services.jobs.validation import field_bounds
from modal_services.jobs.records import Job
from modal_services.state.keys import caption_prompt_key, generate_faces_key, generate_params_key
from modal_services.safety.judge import SafetyReport

if TYPE_CHECKING:
    from bot.client import ToolboxBot

log = logging.getLogger(__name__)

# The options /generate offers, read from the request its job takes.
PromptOption = option_range(GenerateRequest, "prompt")
NegativeOption = option_range(GenerateRequest, "negative_prompt")
CountOption = option_range(GenerateRequest, "count")
StepsOption = option_range(GenerateRequest, "steps")
CfgOption = option_range(GenerateRequest, "cfg")
SeedOption = option_range(GenerateRequest, "seed")
LoraWeightOption = option_range(LoraRef, "weight")
IdentityStrengthOption = option_range(GenerateRequest, "identity_strength")
RemixOption = app_commands.Range[str, 1, MAX_REMIX_REFERENCE_CHARS]
MAX_PROMPT_CHARS = field_bounds(GenerateRequest, "prompt")[1]
# A member watches with a Cancel button: the longest timeout the request allows.
DISCORD_TIMEOUT = field_bounds(GenerateRequest, "timeout")[1]
# A variation's start image: the largest output, with room to spare.
MAX_START_PIXELS = 4 * field_bounds(GenerateRequest, "width")[1] ** 2
# Every model's size buckets; one that not every model makes names those that do.
ASPECT_CHOICES = [
    app_commands.Choice(name=f"{ratio} ({w}×{h})" + ("" if len(makers) == len(GENERATE_MODELS) else f", {names_of(makers)}"),
                        value=ratio)
    for ratio, ((w, h), makers) in aspect_sizes().items()
]
MODEL_CHOICES = [app_commands.Choice(name=model.title, value=key) for key, model in GENERATE_MODELS.items()]
IMAGE_STEM = "image"


def _result_button(action: str, job_id: str, label: str, row: int, emoji: str | None = None) -> discord.ui.Button:
    return discord.ui.Button(label=label, style=discord.ButtonStyle.secondary, emoji=emoji, row=row,
                             custom_id=f"toolbox:generate:{action}:{job_id}")


class UpscaleImageButton(PersistentButton, discord.ui.DynamicItem[discord.ui.Button],
                         template=r"toolbox:generate:u(?P<number>[1-4]):(?P<job_id>[0-9a-f]+)"):
    """U1-U4: that image of the result, upscaled 2x."""

    def __init__(self, number: int | str, job_id: str):
        super().__init__(_result_button(f"u{number}", job_id, label=f"U{number}", row=0))
        self.number, self.job_id = int(number), job_id

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.client.generations.upscale_image(interaction, self.job_id, self.number)


class VaryImageButton(PersistentButton, discord.ui.DynamicItem[discord.ui.Button],
                      template=r"toolbox:generate:v(?P<number>[1-4]):(?P<job_id>[0-9a-f]+)"):
    """V1-V4: variations of that image of the result."""

    def __init__(self, number: int | str, job_id: str):
        super().__init__(_result_button(f"v{number}", job_id, label=f"V{number}", row=1))
        self.number, self.job_id = int(number), job_id

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.client.generations.vary_image(interaction, self.job_id, self.number)


class RerollButton(PersistentButton, discord.ui.DynamicItem[discord.ui.Button],
                   template=r"toolbox:generate:reroll:(?P<job_id>[0-9a-f]+)"):
    """Reroll: the same settings with new seeds."""

    def __init__(self, job_id: str):
        super().__init__(_result_button("reroll", job_id, label="Reroll", row=2, emoji="🔄"))
        self.job_id = job_id

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.client.generations.reroll(interaction, self.job_id)


class GenerateFromCaptionButton(PersistentButton, discord.ui.DynamicItem[discord.ui.Button],
                                template=r"toolbox:caption-generate:(?P<job_id>[0-9a-f]+)"):
    """Under a caption in the prompt style: generate from it."""

    def __init__(self, job_id: str):
        super().__init__(
            discord.ui.Button(label="Generate from this", style=discord.ButtonStyle.primary, emoji="🎨",
                              custom_id=f"toolbox:caption-generate:{job_id}")
        )
        self.job_id = job_id

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.client.generations.generate_from_caption(interaction, self.job_id)


# The buttons this cog answers, whichever message they are under.
BUTTONS = (UpscaleImageButton, VaryImageButton, RerollButton, GenerateFromCaptionButton)


def generate_from_caption_view(job_id: str) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(GenerateFromCaptionButton(job_id))
    return view


def fit_prompt(text: str) -> str:
    """A caption cut to the prompt limit at a tag boundary."""
    if len(text) <= MAX_PROMPT_CHARS:
        return text
    return text[:MAX_PROMPT_CHARS].rsplit(",", 1)[0].strip()


def result_view(job_id: str, shown: list[int]) -> discord.ui.View:
    """U and V buttons for the images posted (1-based numbers), and Reroll."""
    view = discord.ui.View(timeout=None)
    for button in (UpscaleImageButton, VaryImageButton):
        for number in shown:
            view.add_item(button(number, job_id))
    view.add_item(RerollButton(job_id))
    return view


def image_attachment(message: discord.Message, index: int) -> discord.Attachment | None:
    """The result message's image number `index` (1-based), by its file name (a spoiler's too)."""
    for attachment in message.attachments:
        stem = attachment.filename.removeprefix("SPOILER_").rsplit(".", 1)[0]
        if looks_like_image(attachment) and stem == f"{IMAGE_STEM}{index}":
            return attachment
    return None


def posted_image(message: discord.Message, index: int) -> discord.Attachment:
    """`image_attachment`, or the reason a button cannot use it."""
    attachment = image_attachment(message, index)
    if attachment is None:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"Image {index} is no longer attached to that message.")
    return attachment


def describe(params: dict[str, Any], lora_names: list[str], checkpoint: str, seeds: list[int] | None = None,
             guidance: str = "CFG") -> str:
    seeds = seeds or [params["seed"]]
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"
    parts = [f"{params['width']}×{params['height']}", f"{params['steps']} steps", f"{guidance} {params['cfg']:g}",
             *([params["sampler"]] if params.get("sampler") else []), seed_text, checkpoint]
    parts += [f"{name} ({lora['weight']:g})" for name, lora in zip(lora_names, params["loras"])]
    if params.get("strength") is not None:
        parts.append(f"variation at {params['strength']:g}")
    if params.get("face"):
        parts.append(f"face {params['face']['identity_strength']:g} · pose {params['face']['controlnet_strength']:g}")
    return " · ".join(parts)


def encode_photos(photos: dict[str, bytes | None]) -> dict[str, str | None]:
    return {name: base64.b64encode(png).decode("ascii") if png else None for name, png in photos.items()}


def decode_photos(kept: dict[str, str | None]) -> dict[str, bytes | None]:
    return {name: base64.b64decode(text) if text else None for name, text in kept.items()}


class Generate(commands.Cog):
    def __init__(self, bot: ToolboxBot):
        self.bot = bot
        self.library = bot_library(bot)
        bot.add_dynamic_items(*BUTTONS)
        self.presenters = {model.request: self.present for model in GENERATE_MODELS.values()}
        bot.tracker.presenters.update(self.presenters)
        self.previews = LivePreviews(lambda: bot.backend.store)
        bot.generations = self

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(*BUTTONS)
        for request in self.presenters:
            self.bot.tracker.presenters.pop(request, None)
        self.bot.generations = None

    @app_commands.command(name="generate", description="Make images from a prompt with SDXL or Flux, optionally with LoRAs")
    @app_commands.describe(
        prompt="What to draw (booru tags work best with Illustrious; Flux follows plain sentences)",
        negative="What to avoid (default: the server's; SDXL only)",
        aspect="The shape (default: the server's, usually square)",
        count="How many images, 1-4 (default 1)",
        steps="Denoising steps, 20-50 (default: the server's, usually 28)",
        cfg="How closely to follow the prompt: SDXL's CFG 1-20 (default 5.5), Flux's guidance 1-10 (default 3.5)",
        seed="For repeatable results (default: random)",
        lora1="A LoRA from the library",
        lora1_weight="Its weight (default: the library's recommendation)",
        lora2="A second LoRA",
        lora2_weight="Its weight",
        lora3="A third LoRA",
        lora3_weight="Its weight",
        face="A photo of a person: every image keeps their face (InstantID, SDXL only; an admin enables it in /setup)",
        identity_strength="How strongly the face is kept, 0-1.5 (default 0.8)",
        pose="A photo whose face sets the head's place and angle (default: the face photo's)",
        model="SDXL or FLUX.1-dev (default: the server's, usually SDXL)",
        remix="A CivitAI image's link or id: its published prompt and settings (what you also give wins)",
        sampler="The sampler, as A1111 names it (default: the server's, else the checkpoint's; SDXL only)",
    )
    @app_commands.choices(aspect=ASPECT_CHOICES, model=MODEL_CHOICES, sampler=SAMPLER_CHOICES)
    @app_commands.autocomplete(lora1=model_lora_autocomplete, lora2=model_lora_autocomplete, lora3=model_lora_autocomplete)
    async def generate(
        self,
        interaction: discord.Interaction,
        prompt: PromptOption | None = None,
        negative: NegativeOption | None = None,
        aspect: app_commands.Choice[str] | None = None,
        count: CountOption | None = None,
        steps: StepsOption | None = None,
        cfg: CfgOption | None = None,
        seed: SeedOption | None = None,
        lora1: str | None = None,
        lora1_weight: LoraWeightOption | None = None,
        lora2: str | None = None,
        lora2_weight: LoraWeightOption | None = None,
        lora3: str | None = None,
        lora3_weight: LoraWeightOption | None = None,
        face: discord.Attachment | None = None,
        identity_strength: IdentityStrengthOption | None = None,
        pose: discord.Attachment | None = None,
        model: app_commands.Choice[str] | None = None,
        remix: RemixOption | None = None,
        sampler: app_commands.Choice[str] | None = None,
    ) -> None:
        if prompt is None and remix is None:
            raise ToolboxError(ErrorCode.INVALID_PROMPT, "Give a prompt, or a CivitAI image to remix.")
        params = {
            "prompt": prompt, "model": model.value if model else None, "negative": negative,
            "sampler": sampler.value if sampler else None,
            "aspect": aspect.value if aspect else None, "count": count, "steps": steps, "cfg": cfg, "seed": seed,
            "identity_strength": identity_strength,
            "loras": lora_slots((lora1, lora1_weight), (lora2, lora2_weight), (lora3, lora3_weight)),
        }
        await self.run_generate(interaction, params, face=face, pose=pose, remix=remix)

    # ------------------------------------------------------------ the buttons under a result

    async def upscale_image(self, interaction: discord.Interaction, job_id: str, number: int) -> None:
        """U: image `number` of job `job_id`'s result, upscaled 2x by the upscale cog with the same prompt."""
        params = await self._kept_settings(interaction.guild_id, job_id)
        attachment = posted_image(interaction.message, number)
        # The upscaler is SDXL: a Flux image's LoRAs do not apply to it.
        upscale = {"scale": 2.0, "prompt": params["prompt"], "negative": params.get("negative") or "",
                   "loras": params["loras"] if params.get("model", "sdxl") == "sdxl" else [],
                   # The bot's own result, but one made with a face photo shows that real person.
                   "real_photo": await self._kept_photos(interaction.guild_id, job_id) is not None}
        await self.bot.upscales.run_upscale(interaction, attachment, upscale)

    async def vary_image(self, interaction: discord.Interaction, job_id: str, number: int) -> None:
        """V: job `job_id`'s settings with new seeds, image `number` of its result as the img2img start."""
        params = await self._kept_settings(interaction.guild_id, job_id)
        photos = await self._kept_photos(interaction.guild_id, job_id)
        attachment = posted_image(interaction.message, number)
        await self.run_generate(interaction, {**params, "seed": None}, start=attachment, photos=photos)

    async def reroll(self, interaction: discord.Interaction, job_id: str) -> None:
        """Reroll: job `job_id`'s settings (and face photos) with new seeds."""
        params = await self._kept_settings(interaction.guild_id, job_id)
        photos = await self._kept_photos(interaction.guild_id, job_id)
        await self.run_generate(interaction, {**params, "seed": None}, photos=photos)

    async def _kept(self, guild_id: int | None, key: str) -> Any:
        """What a result's buttons reuse, or None; too old for this server's retention, or made on another
        server than `guild_id` (where the button is pressed): refused."""
        return await read_result_params(self.bot.backend.store, key, guild_id, result_retention_days)

    async def _kept_settings(self, guild_id: int | None, job_id: str) -> dict[str, Any]:
        params = await self._kept(guild_id, generate_params_key(job_id))
        if params is None:
            raise ToolboxError(ErrorCode.INVALID_INPUT, "The settings of that generation are no longer kept; run /generate again.")
        return params

    async def _kept_photos(self, guild_id: int | None, job_id: str) -> dict[str, bytes | None] | None:
        kept_photos = await self._kept(guild_id, generate_faces_key(job_id))
        return decode_photos(kept_photos) if kept_photos else None

    async def generate_from_caption(self, interaction: discord.Interaction, caption_job_id: str) -> None:
        prompt = await self._kept(interaction.guild_id, caption_prompt_key(caption_job_id))
        if not prompt:
            raise ToolboxError(ErrorCode.INVALID_INPUT, "That caption is no longer kept; caption the image again.")
        await self.run_generate(interaction, {"prompt": fit_prompt(prompt)})

    # ------------------------------------------------------------ the job

    async def run_generate(
        self, interaction: discord.Interaction, params: dict[str, Any], start: discord.Attachment | None = None,
        face: discord.Attachment | None = None, pose: discord.Attachment | None = None,
        photos: dict[str, bytes | None] | None = None, remix: str | None = None,
    ) -> None:
        """Check, defer, resolve the defaults and LoRAs, then follow the job to its result.

        The face and pose come as attachments (a new /generate) or as the photos a result kept (its buttons);
        `remix`, a CivitAI image whose published settings `params` (those given) override."""
        for attachment in (start, face, pose):
            if attachment is not None:
                check_attachment(attachment)
        if remix is not None:
            parse_image_reference(remix)  # refused before anything is fetched
        await interaction.response.defer(thinking=True)
        async with self.bot.tracker.admission(interaction) as admission:
            if face is not None or pose is not None:
                # Read as given: the shared core says what is wrong with them (a pose without a face, a
                # face for a model that takes none) in the words every front end uses.
                photos = {"face": (await read_image(face, max_side=REFERENCE_MAX_SIDE)).png if face else None,
                          "pose": (await read_image(pose, max_side=REFERENCE_MAX_SIDE)).png if pose else None}
            notes: list[str] = []
            if remix is not None:
                params, notes = await self._remixed(interaction, remix, params)
            await self._generate(interaction, params, start, photos, admission, notes)

    async def _remixed(self, interaction: discord.Interaction, reference: str,
                       given: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The CivitAI image's /generate params with what was `given` in their place, and the differences the
        result shows; whoever asked is told privately what is missing (with Import missing if they may)."""
        client = await civitai_client(self.bot.settings.civitai_api_base, self.bot.backend.store)
        remix = await plan_remix(reference, client, self.library)
        notes = public_differences(remix)
        await interaction.edit_original_response(content="🔁 " + " · ".join(notes))
        models = self.bot.get_cog(MODELS_COG)
        offer = private_offer(remix, models is not None and await models.may_import(interaction))
        if offer is not None:
            text, view = offer
            await interaction.followup.send(text, view=view or discord.utils.MISSING, ephemeral=True)
        return remix_params(remix, given), notes

    async def _generate(self, interaction: discord.Interaction, params: dict[str, Any],
                        start: discord.Attachment | None, photos: dict[str, bytes | None] | None,
                        admission: Admission, notes: Sequence[str] = ()) -> None:
        settings = admission.settings
        model = params.get("model") or settings.default_model
        # The server's defaults are SDXL's: another model keeps its own (Flux has no negative prompt at all).
        sdxl_defaults = generate_model(model) is SDXL
        choices = GenerateChoices(
            prompt=params["prompt"], model=model, aspect=params.get("aspect") or settings.default_aspect,
            width=params.get("width"), height=params.get("height"), count=params.get("count"),
            steps=params.get("steps") or settings.default_steps, seed=params.get("seed"), timeout=DISCORD_TIMEOUT,
            cfg=params.get("cfg") or (settings.default_cfg if sdxl_defaults else None),
            sampler=params.get("sampler") or (settings.default_sampler if sdxl_defaults else None),
            negative=params.get("negative") or (settings.default_negative if sdxl_defaults else None),
            loras=tuple(LoraChoice(**lora) for lora in params.get("loras") or ()), checkpoint=params.get("checkpoint"),
            variation_image=(await read_image(start, max_pixels=MAX_START_PIXELS)).png if start is not None else None,
            face_image=photos["face"] if photos else None, pose_image=photos["pose"] if photos else None,
            identity_strength=params.get("identity_strength"),
            # Judged for the channel this was asked in (a button's too): recomputed, never kept with the params.
            safety=settings.safety_for(age_restricted(interaction)),
        )
        # Refused here, before a job exists, in the same words as on every front end.
        built = await build_generate_request(self.library, choices)
        request, width, height = built.request, built.request.width, built.request.height
        kept = {name: getattr(request, name) for name in ("prompt", "width", "height", "count", "steps", "seed")}
        kept |= {"negative": request.negative_prompt, "aspect": choices.aspect, "model": built.model.key,
                 "cfg": getattr(request, built.model.cfg_field),
                 "identity_strength": getattr(request, "identity_strength", None),
                 "sampler": getattr(request, "sampler", None),
                 "loras": [{"name": lora.file, "weight": lora.weight} for lora in request.loras],
                 "checkpoint": built.checkpoint["file"] if choices.checkpoint else None}
        title = ("Variations" if start is not None else "Generate") + (" with a face" if photos else "")
        meta = {
            "title": title + ("" if built.model is SDXL else f" · {built.model.name}") + f" · {request.count} × {width}×{height}",
            "prompt": request.prompt[:300],
            "lora_names": [lora.name for lora in request.loras],
            "checkpoint_name": built.checkpoint["name"],
            "notes": list(notes),
        }
        job, target = await self.bot.tracker.start(interaction, request, meta, admission)
        store = self.bot.backend.store
        await keep_result_params(store, generate_params_key(job.id), kept, interaction.guild_id)
        if photos is not None:
            await keep_result_params(store, generate_faces_key(job.id), encode_photos(photos), interaction.guild_id)
        self.previews.start(job.id, target)
        try:
            await self.bot.tracker.run(job, target)
        finally:
            await self.previews.stop(job.id)

    async def present(self, job: Job, result: dict, target: ReplyTarget) -> None:
        await self.previews.stop(job.id)
        report = SafetyReport.from_dict(result["safety"]) if result.get("safety") else None
        spoilered = set(report.spoilered) if report else set()
        # The worker sends None for a withheld image: its bytes never reached the bot.
        shown = [(index, png) for index, png in enumerate(result["images"], start=1) if png is not None]
        # Each file within the upload limit, and all of them within one request's.
        limit = min(target.upload_limit(job.owner.get("guild_id")), MAX_REQUEST_BYTES // max(1, len(shown)))
        fitted = [await asyncio.to_thread(fit_to_limit, png, limit, f"{IMAGE_STEM}{index}") for index, png in shown]
        files = [discord.File(io.BytesIO(image.data), image.filename, spoiler=index - 1 in spoilered)
                 for (index, _), image in zip(shown, fitted)]
        summary = describe(result, job.meta.get("lora_names") or [lora["name"] for lora in result["loras"]],
                           job.meta.get("checkpoint_name") or result["checkpoint"], result["seeds"],
                           model_of_kind(job.kind).cfg_label)
        prompt = discord.utils.escape_markdown(job.meta.get("prompt") or result["prompt"])
        lines = [f"✅ **{job.meta.get('title', 'Generate')}**", f"> {prompt}", summary]
        notes = {image.note for image in fitted if image.note}
        lines += [f"-# {note}" for note in job.meta.get("notes", []) + job_notes(result) + sorted(notes)]
        lines += public_lines(report)
        await target.edit(content="\n".join(lines), attachments=files,
                          view=result_view(job.id, [index for index, _ in shown]))
        notice = report and withheld_notice(report)
        if notice:
            await target.tell_requester(notice)


async def setup(bot: ToolboxBot) -> None:
    await bot.add_cog(Generate(bot))
