"""From API request bodies to checked job requests: images decoded, library names resolved.

Generate and upscale requests are built by the same functions the bot's
commands use, so a request means the same whichever front end sent it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bot.api.schema import CaptionJob, GenerateImageRequest, JobBody, UpscaleJob
from bot.generate_requests import FACE_NEEDS_SDXL, flux_generate_request, generate_model, generate_request
from bot.upscale_requests import upscale_request
from modal_services.engines.sdxl.limits import DEFAULT_MAX_INPUT_PIXELS, check_upscale_size
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.imaging import decode_image, encode_png, shrunk_png
from modal_services.jobs.requests import (
    REFERENCE_MAX_SIDE,
    CaptionRequest,
    FluxGenerateRequest,
    GenerateRequest,
    JobRequest,
    SafetyContext,
    UpscaleRequest,
)
from modal_services.library.entries import Library


def api_safety(safety_check: bool) -> SafetyContext:
    """An API caller's images are judged as for a channel that is not age-restricted, unless it opts out."""
    return SafetyContext(policy="block" if safety_check else "off")


def _clean_png(data: bytes, max_pixels: int | None = None) -> tuple[bytes, tuple[int, int]]:
    """An uploaded image decoded (bad files refused) and re-encoded as a plain PNG, as the bot does with attachments."""
    image = decode_image(data, **({"max_pixels": max_pixels} if max_pixels else {})).image
    return encode_png(image), image.size


async def generate_job_request(library: Library, request: GenerateImageRequest) -> GenerateRequest | FluxGenerateRequest:
    """The generate request of /generate-image or a `generate` job: SDXL's, or Flux's for `model: "flux-dev"`."""
    if generate_model(request.model) == "flux":
        if request.lora_url is not None:
            raise ToolboxError(ErrorCode.INVALID_INPUT, "lora_url is for SDXL: Flux takes LoRAs from the library (`loras`).")
        if request.reference_image_base64 is not None or request.pose_image_base64 is not None:
            raise ToolboxError(ErrorCode.INVALID_INPUT, FACE_NEEDS_SDXL)
        # Only what the client gave: Flux's own defaults (guidance 3.5) fill in the rest.
        choices = request.model_dump(exclude_unset=True, exclude={"kind", "model", "loras", "lora_scale", "lora_sha256",
                                                                  "safety_check"})
        choices["safety"] = api_safety(request.safety_check)
        job_request, _ = await flux_generate_request(library, choices, [lora.model_dump() for lora in request.loras])
        return job_request
    choices = request.model_dump(exclude={"kind", "model", "loras", "safety_check", "reference_image_base64",
                                           "pose_image_base64"})
    choices["safety"] = api_safety(request.safety_check)
    if request.lora_url is not None:
        choices["lora_url"] = str(request.lora_url)
    for field, photo, name in (("face_image", request.reference_image_base64, "reference_image_base64"),
                               ("pose_image", request.pose_image_base64, "pose_image_base64")):
        if photo is not None:
            choices[field] = await asyncio.to_thread(shrunk_png, photo, REFERENCE_MAX_SIDE, name)
    job_request, _ = await generate_request(library, choices, [lora.model_dump() for lora in request.loras])
    return job_request


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
    png, size = await asyncio.to_thread(_clean_png, request.image_base64, DEFAULT_MAX_INPUT_PIXELS)
    choices = request.model_dump(exclude={"kind", "image_base64", "loras", "safety_check"})
    choices["safety"] = api_safety(request.safety_check)
    job_request, _ = await upscale_request(library, png, choices, [lora.model_dump() for lora in request.loras])
    check_upscale_size(*size, job_request.scale)
    return job_request


async def job_request(library: Library, body: JobBody) -> JobRequest:
    """The job request of a POST /jobs body, by its kind."""
    if body.kind == "generate":
        return await generate_job_request(library, body)
    if body.kind == "caption":
        return await caption_job_request(body)
    return await upscale_job_request(library, body)
