"""From API request bodies to checked job requests: images decoded, library names resolved.

Generate and upscale requests are built by the same functions the bot's
commands use, so a request means the same whichever front end sent it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bot.api.schema import CaptionJob, GenerateImageRequest, JobBody, UpscaleJob
from bot.core.build import build_generate_request, build_upscale_request
from bot.core.choices import GenerateChoices, LoraChoice, UpscaleChoices
from bot.core.generate_models import generate_model
from modal_services.engines.sdxl.limits import DEFAULT_MAX_INPUT_PIXELS
from modal_services.imaging import decode_image, encode_png, shrunk_png
from modal_services.jobs.requests import (
    REFERENCE_MAX_SIDE,
    CaptionRequest,
    JobRequest,
    SafetyContext,
    TextToImageRequest,
    UpscaleRequest,
)
from modal_services.library.entries import Library


def api_safety(safety_check: bool, real_photo: bool = False) -> SafetyContext:
    """An API caller's images are judged as for a channel that is not age-restricted, unless it opts out;
    `real_photo`: the job starts from an image the caller sent, which may show a real person."""
    return SafetyContext(policy="block" if safety_check else "off", real_photo=real_photo)


def _clean_png(data: bytes, max_pixels: int | None = None) -> tuple[bytes, tuple[int, int]]:
    """An uploaded image decoded (bad files refused) and re-encoded as a plain PNG, as the bot does with attachments."""
    image = decode_image(data, **({"max_pixels": max_pixels} if max_pixels else {})).image
    return encode_png(image), image.size


async def generate_job_request(library: Library, request: GenerateImageRequest) -> TextToImageRequest:
    """The text-to-image request of /generate-image or a `generate` job, on the model it names."""
    given = request.model_dump(exclude_unset=True)
    photos = {"face_image": request.reference_image_base64, "pose_image": request.pose_image_base64}
    if generate_model(request.model).takes_faces:
        # Decoded (and shrunk) only for a model that uses them: any other refuses them unread.
        photos = {field: await asyncio.to_thread(shrunk_png, photo, REFERENCE_MAX_SIDE, name)
                  for (field, photo), name in zip(photos.items(), ("reference_image_base64", "pose_image_base64"))
                  if photo is not None}
    choices = GenerateChoices(
        prompt=request.prompt, model=request.model, negative=given.get("negative_prompt"),
        width=request.width, height=request.height, count=given.get("count"), steps=given.get("steps"),
        cfg=given.get("cfg"), seed=request.seed, loras=tuple(LoraChoice(**lora.model_dump()) for lora in request.loras),
        lora_url=None if request.lora_url is None else str(request.lora_url), lora_scale=given.get("lora_scale"),
        lora_sha256=request.lora_sha256, face_image=photos.get("face_image"), pose_image=photos.get("pose_image"),
        identity_strength=given.get("identity_strength"), controlnet_strength=given.get("controlnet_strength"),
        timeout=given.get("timeout"), safety=api_safety(request.safety_check),
    )
    return (await build_generate_request(library, choices)).request


def generate_meta(request: GenerateImageRequest) -> dict[str, Any]:
    """What a generate job keeps of its API request: a later GET /jobs/{id} reports the contract's
    model_info.lora_scale from it."""
    return {"title": f"Generate {request.width}×{request.height}",
            "lora_scale": request.lora_scale if request.lora_url is not None else None}


async def caption_job_request(request: CaptionJob) -> CaptionRequest:
    images = [(await asyncio.to_thread(_clean_png, data))[0] for data in request.images_base64]
    return CaptionRequest.parse({"images": images, "style": request.style, "question": request.question})


async def upscale_job_request(library: Library, request: UpscaleJob) -> UpscaleRequest:
    """The upscale request of an `upscale` job, refused here when its output would be too large."""
    png, _ = await asyncio.to_thread(_clean_png, request.image_base64, DEFAULT_MAX_INPUT_PIXELS)
    given = request.model_dump(exclude_unset=True)
    choices = UpscaleChoices(
        image=png, scale=given.get("scale"), prompt=given.get("prompt"), negative=given.get("negative"),
        loras=tuple(LoraChoice(**lora.model_dump()) for lora in request.loras), creativity=given.get("creativity"),
        seed=request.seed, safety=api_safety(request.safety_check, real_photo=True),
    )
    return (await build_upscale_request(library, choices)).request


async def job_request(library: Library, body: JobBody) -> JobRequest:
    """The job request of a POST /jobs body, by its kind."""
    if body.kind == "generate":
        return await generate_job_request(library, body)
    if body.kind == "caption":
        return await caption_job_request(body)
    return await upscale_job_request(library, body)
