"""From API request bodies to checked job requests: library names resolved, images decoded.

Generate and upscale requests are built by the same functions the bot's
commands use, so a request means the same whichever front end sent it.

The images are decoded last, after every cheaper check (the caller's cap,
taken before `ApiJobs.start` calls in here; the values, the optional models
the request needs and its LoRAs; then each image's header, for its pixel
limit): a request refused for any of those never costs a decode. They are
checked and built with the bytes as sent (no rule reads them), which the
decoded, re-encoded images then replace.
"""

from __future__ import annotations

from typing import Any

from bot.api.schema import CaptionJob, GenerateImageRequest, JobBody, UpscaleJob
from bot.backend import Backend
from bot.core.build import build_generate_request, build_upscale_request
from bot.core.choices import GenerateChoices, LoraChoice, UpscaleChoices
from bot.core.remix import civitai_client, plan_remix, remixed_choices
from bot.tile_prompts import tile_prompts
from modal_services.engines.sdxl.limits import DEFAULT_MAX_INPUT_PIXELS
from modal_services.imaging import DEFAULT_MAX_PIXELS, clean_png, decoded_off_loop, image_size
from modal_services.jobs.requests import (
    REFERENCE_MAX_SIDE,
    CaptionRequest,
    JobRequest,
    SafetyContext,
    TextToImageRequest,
    UpscaleRequest,
)
from modal_services.jobs.records import Job
from modal_services.library.entries import Library


# The body's fields whose choice has another name.
API_CHOICES = {"negative_prompt": "negative"}
# The request's photo fields and the API fields they come in.
PHOTO_FIELDS = {"face_image": "reference_image_base64", "pose_image": "pose_image_base64"}


def api_safety(safety_check: bool, real_photo: bool = False) -> SafetyContext:
    """An API caller's images are judged as for a channel that is not age-restricted, unless it opts out;
    `real_photo`: the job starts from an image the caller sent, which may show a real person."""
    return SafetyContext(policy="block" if safety_check else "off", real_photo=real_photo)


async def _decoded(uploads: dict[str, bytes], max_pixels: int, max_side: int | None = None) -> dict[str, bytes]:
    """Each upload (by the field it came in) as `clean_png` makes it, decoded off the event loop once every
    one's header has shown it within `max_pixels`: an image over the limit is refused before any is decoded."""
    for field, data in uploads.items():
        image_size(data, max_pixels, field)
    return {field: await decoded_off_loop(clean_png, data, field, max_pixels, max_side)
            for field, data in uploads.items()}


async def generate_job_request(library: Library, request: GenerateImageRequest, civitai_api_base: str,
                               meta: dict[str, Any]) -> TextToImageRequest:
    """The text-to-image request of /generate-image or a `generate` job, on the model it names; its photos
    are read only once the rest of it (InstantID enabled included) is known to be good. With `remix`, the
    image's settings fill the fields not given, and `meta` keeps what differs as the result's `notes`."""
    given = request.model_dump(exclude_unset=True)
    photos = {field: getattr(request, api_field) for field, api_field in PHOTO_FIELDS.items()}
    choices = GenerateChoices(
        prompt=request.prompt, model=request.model, negative=given.get("negative_prompt"),
        width=request.width, height=request.height, count=given.get("count"), steps=given.get("steps"),
        cfg=given.get("cfg"), sampler=request.sampler, seed=request.seed, loras=tuple(LoraChoice(**lora.model_dump()) for lora in request.loras),
        lora_url=None if request.lora_url is None else str(request.lora_url), lora_scale=given.get("lora_scale"),
        lora_sha256=request.lora_sha256, identity_strength=given.get("identity_strength"),
        controlnet_strength=given.get("controlnet_strength"), timeout=given.get("timeout"),
        safety=api_safety(request.safety_check), **photos,
    )
    if request.remix is not None:
        choices = await _remixed(library, request.remix, choices, given, civitai_api_base, meta)
    built = (await build_generate_request(library, choices)).request
    shrunk = await _decoded({PHOTO_FIELDS[field]: data for field, data in photos.items() if data is not None},
                            DEFAULT_MAX_PIXELS, REFERENCE_MAX_SIDE)
    return built.model_copy(update={field: shrunk[api_field] for field, api_field in PHOTO_FIELDS.items()
                                    if api_field in shrunk})


async def _remixed(library: Library, reference: str, choices: GenerateChoices, given: dict[str, Any],
                   civitai_api_base: str, meta: dict[str, Any]) -> GenerateChoices:
    """`choices` with the remixed image's settings for the fields the body did not give."""
    client = await civitai_client(civitai_api_base, library.store)
    remix = await plan_remix(reference, client, library)
    meta["notes"] = [f"Remix of CivitAI image {remix.image_id}", *remix.differences()]
    chosen = {API_CHOICES.get(name, name) for name in given} & set(GenerateChoices.__dataclass_fields__)
    return remixed_choices(remix, choices, chosen)


def generate_meta(request: GenerateImageRequest) -> dict[str, Any]:
    """What a generate job keeps of its API request: a later GET /jobs/{id} reports the contract's
    model_info.lora_scale from it."""
    return {"title": f"Generate {request.width}×{request.height}",
            "lora_scale": request.lora_scale if request.lora_url is not None else None}


async def caption_job_request(request: CaptionJob) -> CaptionRequest:
    sent = {f"images_base64.{index}": data for index, data in enumerate(request.images_base64)}
    images = await _decoded(sent, DEFAULT_MAX_PIXELS)
    return CaptionRequest.parse({"images": list(images.values()), "style": request.style, "question": request.question})


async def upscale_job_request(library: Library, request: UpscaleJob, backend: Backend,
                              owner: dict[str, Any]) -> UpscaleRequest:
    """The upscale request of an `upscale` job, refused here when its output would be too large (its size read
    from the image's header); with `tile_captions`, each tile's tags (a caption job of `owner`'s on `backend`,
    awaited) become its region's prompt, as /upscale and `toolbox upscale --tile-captions` do."""
    given = request.model_dump(exclude_unset=True)
    choices = UpscaleChoices(
        image=request.image_base64, scale=given.get("scale"), prompt=given.get("prompt"), negative=given.get("negative"),
        loras=tuple(LoraChoice(**lora.model_dump()) for lora in request.loras), creativity=given.get("creativity"),
        seed=request.seed, sampler=request.sampler, safety=api_safety(request.safety_check, real_photo=True),
    )
    built = await build_upscale_request(library, choices)
    png = (await _decoded({"image_base64": request.image_base64}, DEFAULT_MAX_INPUT_PIXELS))["image_base64"]
    upscale = built.request.model_copy(update={"image": png})
    if not request.tile_captions:
        return upscale
    regions = await tile_prompts(backend, png, image_size(png), built.output_size, _unwatched, owner)
    return upscale.with_region_prompts(regions)


async def _unwatched(_: Job) -> None:
    """No one watches a step an API job takes before it exists: its caller follows the job itself."""


async def job_request(library: Library, body: JobBody, backend: Backend, owner: dict[str, Any],
                      civitai_api_base: str, meta: dict[str, Any]) -> JobRequest:
    """The job request of a POST /jobs body, by its kind (`backend` and `owner` for an upscale's tile captions;
    `civitai_api_base` and `meta` for a generate's remix)."""
    if body.kind == "generate":
        return await generate_job_request(library, body, civitai_api_base, meta)
    if body.kind == "caption":
        return await caption_job_request(body)
    return await upscale_job_request(library, body, backend, owner)
