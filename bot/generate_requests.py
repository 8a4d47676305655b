"""Building a generate request from what a member or a terminal asked for (the cog and the CLI).

As for upscales: LoRAs are named as the library knows them and only the
state store is read, so this works alike on the local and the Modal backend.
"""

from __future__ import annotations

from typing import Any

from bot.upscale_requests import resolve_lora
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.requests import FluxGenerateRequest, GenerateRequest, LoraRef
from modal_services.library.entries import Library
from modal_services.base_models.optional_models import require_enabled
from modal_services.base_models.registry import INSTANTID_MODELS

# The models /generate offers: the name members pick (and the API's alias) -> what it is.
GENERATE_MODELS = {"sdxl": "SDXL (the server's checkpoint)", "flux": "FLUX.1-dev"}
MODEL_ALIASES = {"sdxl": "sdxl", "flux": "flux", "flux-dev": "flux", "flux1-dev": "flux"}
FLUX_MODEL = {"key": "flux1-dev", "name": "FLUX.1-dev", "file": None}
FACE_NEEDS_SDXL = "A face photo works with SDXL only: InstantID has no FLUX.1 weights. Generate with SDXL to use one."


def generate_model(name: str | None) -> str:
    """"sdxl" or "flux" for what a member, a terminal or an API client called the model."""
    model = MODEL_ALIASES.get((name or "sdxl").strip().lower())
    if model is None:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"The model is one of sdxl, flux-dev (got {name!r}).")
    return model


async def generate_request(library: Library, choices: dict[str, Any], loras: list[dict[str, Any]]) -> tuple[GenerateRequest, dict]:
    """The checked request for the member's `choices` (prompt, sizes, steps, seed...; None for the
    default) and `loras` ({name, weight}), on the active checkpoint; and that checkpoint.

    Every value is checked before any library lookup, so a bad one is named first; a seed left out
    is drawn here, so that whoever asked can be told it. A face photo needs InstantID's optional
    models, enabled and downloaded."""
    given = {name: value for name, value in choices.items() if value is not None}
    GenerateRequest.parse(given)
    if given.get("face_image") is not None:
        for key in INSTANTID_MODELS:
            await require_enabled(library.store, key)
    refs = [LoraRef.parse(lora) for lora in loras]
    resolved = [await resolve_lora(library, ref, family="sdxl") for ref in refs]
    checkpoint = await library.active_checkpoint()
    request = GenerateRequest.parse({**given, "loras": resolved, "checkpoint": checkpoint["file"]})
    return request, checkpoint


def face_notes(face: dict | None) -> list[str]:
    """What a reply says about a face generation's photos: which face was used when there were several."""
    if not face:
        return []
    notes = []
    if face["faces_found"] > 1:
        notes.append(f"{face['faces_found']} faces in the face photo: the largest one was used.")
    if (face.get("pose_faces_found") or 0) > 1:
        notes.append(f"{face['pose_faces_found']} faces in the pose photo: the largest one set the pose.")
    return notes


async def flux_generate_request(library: Library, choices: dict[str, Any],
                                loras: list[dict[str, Any]]) -> tuple[FluxGenerateRequest, dict]:
    """As `generate_request`, for FLUX.1-dev: `cfg` is Flux's guidance, and only Flux LoRAs are taken.
    FLUX.1-dev is optional: until an admin has enabled and downloaded it, MODELS_MISSING says what to do."""
    given = {("guidance" if name == "cfg" else name): value for name, value in choices.items() if value is not None}
    if given.keys() & {"face_image", "pose_image", "identity_strength", "controlnet_strength"}:
        raise ToolboxError(ErrorCode.INVALID_INPUT, FACE_NEEDS_SDXL)
    FluxGenerateRequest.parse(given)
    await require_enabled(library.store, FLUX_MODEL["key"])
    refs = [LoraRef.parse(lora) for lora in loras]
    resolved = [await resolve_lora(library, ref, family="flux") for ref in refs]
    return FluxGenerateRequest.parse({**given, "loras": resolved}), FLUX_MODEL
