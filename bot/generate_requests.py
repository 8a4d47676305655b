"""Building a generate request from what a member or a terminal asked for (the cog and the CLI).

As for upscales: LoRAs are named as the library knows them and only the
state store is read, so this works alike on the local and the Modal backend.
"""

from __future__ import annotations

from typing import Any

from bot.upscale_requests import resolve_lora
from modal_services.job_requests import GenerateRequest, LoraRef
from modal_services.library import Library
from modal_services.optional_models import require_enabled
from modal_services.registry import INSTANTID_MODELS


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
    resolved = [await resolve_lora(library, ref) for ref in refs]
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
