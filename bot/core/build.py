"""From what a person asked for to the one checked job request: the single path of every front end.

`build_generate_request` and `build_upscale_request` own every rule between
choices, each with one message worded for anyone (no front end's option
names), so the same bad choice is refused with the same code and words through
Discord, the CLI and the HTTP API, before a job exists. The rules of a request
on its own (a pose without a face, Flux's negative prompt, a LoRA listed twice)
live on the request classes, which the worker applies again.

Both build in the same steps: every value is checked first, with no library
lookup, so a bad value is named before a missing LoRA (and a seed left out is
drawn there, so that whoever asked can be told it); then the optional models
the request needs; then its LoRAs; then the checkpoint; then the request
itself. Only the state store is read (library entries, the active checkpoint,
optional models), so this works alike on the local and the Modal backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bot.core.choices import GenerateChoices, UpscaleChoices
from bot.core.generate_models import (
    FAMILY_NAMES,
    GENERATE_MODELS,
    SDXL,
    TextToImageModel,
    generate_model,
    names_of,
)
from modal_services.base_models.optional_models import require_enabled
from modal_services.base_models.registry import INSTANTID_MODELS
from modal_services.engines.sdxl.limits import check_upscale_size
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.imaging import image_size
from modal_services.jobs.requests import LoraRef, TextToImageRequest, UpscaleRequest
from modal_services.library.entries import Library

# The choices that ask for InstantID: a face to keep, a pose, and their weights.
FACE_CHOICES = ("face_image", "pose_image", "identity_strength", "controlnet_strength")
HALF_A_SIZE = "Give the width and the height together, or an aspect instead."


@dataclass(frozen=True)
class CheckedGenerate:
    """What `check_generate_choices` found: the model, its request before the library is read (no
    LoRAs, no checkpoint; the seed drawn), and the LoRAs as named."""

    model: TextToImageModel
    request: TextToImageRequest
    loras: list[LoraRef]


@dataclass(frozen=True)
class BuiltRequest:
    """A checked text-to-image request (`GenerateRequest`, `FluxGenerateRequest`...) and what the front
    ends show beside its results: the model, and the weights its images come from ({"key", "name",
    "file"...}: the library's active checkpoint for SDXL, the model's own otherwise)."""

    request: TextToImageRequest
    model: TextToImageModel
    checkpoint: dict[str, Any]


@dataclass(frozen=True)
class BuiltUpscale:
    """A checked upscale request, the active checkpoint it runs on, and the (width, height) it will make."""

    request: UpscaleRequest
    checkpoint: dict[str, Any]
    output_size: tuple[int, int]


# ------------------------------------------------------------------ generate


async def build_generate_request(library: Library, choices: GenerateChoices) -> BuiltRequest:
    """The checked request for `choices`, or the ToolboxError of the first thing wrong with them:
    INVALID_INPUT (or INVALID_PROMPT) for a value or a rule, INCOMPATIBLE_MODEL for a LoRA of another
    model's family, MODELS_MISSING for a model an admin has not enabled and downloaded."""
    # 1. Every value and every rule between them, with no library lookup.
    checked = check_generate_choices(choices)
    model, request = checked.model, checked.request
    # 2. The optional models it needs: the model's own, and InstantID's for a face.
    needed = model.optional_models + (INSTANTID_MODELS if choices.face_image is not None else ())
    for key in needed:
        await require_enabled(library.store, key)
    # 3. Its LoRAs, from the library, made for this model.
    loras = [await resolve_lora(library, lora, model.lora_family) for lora in checked.loras]
    # 4. The weights its images come from: the model's own, else the library checkpoint asked for, else the active one.
    checkpoint = model.checkpoint or await _library_checkpoint(library, choices.checkpoint)
    # 5. The request, with what the library gave: the checkpoint, and its sampler unless one was asked for.
    payload = {**request.to_payload(), "loras": loras}
    if model.checkpoint is None:
        payload["checkpoint"] = checkpoint["file"]
        payload["sampler"] = payload["sampler"] or checkpoint["sampler"]
    return BuiltRequest(model.request.parse(payload), model, checkpoint)


def check_generate_choices(choices: GenerateChoices) -> CheckedGenerate:
    """Step 1 of `build_generate_request` on its own, for a caller with no library at hand (a client
    of a remote API): the model, every value and every rule that needs no library."""
    model = generate_model(choices.model)
    _refuse_what_the_model_lacks(model, choices)
    request = model.request.parse(_request_fields(model, choices))
    loras = [LoraRef.parse({"name": lora.name, "weight": lora.weight}) for lora in choices.loras]
    return CheckedGenerate(model, request, loras)


def _refuse_what_the_model_lacks(model: TextToImageModel, choices: GenerateChoices) -> None:
    """A face photo or a LoRA link is refused for a model that cannot use it, rather than ignored."""
    if not model.takes_faces and any(getattr(choices, name) is not None for name in FACE_CHOICES):
        raise ToolboxError(ErrorCode.INVALID_INPUT, _face_refused(model))
    if not model.takes_lora_url and choices.lora_url is not None:
        raise ToolboxError(ErrorCode.INVALID_INPUT, _lora_url_refused(model))
    if model.checkpoint is not None and choices.checkpoint is not None:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"{model.name} runs on its own weights: a library checkpoint "
                           f"works with {SDXL.name} only.")
    if not model.takes_sampler and choices.sampler is not None:
        raise ToolboxError(ErrorCode.INVALID_INPUT, _sampler_refused(model))


def _request_fields(model: TextToImageModel, choices: GenerateChoices) -> dict[str, Any]:
    """The request fields `choices` give for `model`; those not given are left to the request's defaults."""
    width, height = _requested_size(model, choices)
    fields = {
        "prompt": choices.prompt, "negative_prompt": choices.negative, "width": width, "height": height,
        "count": choices.count, "steps": choices.steps, model.cfg_field: choices.cfg, "seed": choices.seed,
        "timeout": choices.timeout, "image": choices.variation_image, "strength": choices.variation_strength,
        "safety": choices.safety,
    }
    if model.takes_faces:
        fields |= {name: getattr(choices, name) for name in FACE_CHOICES}
    if model.takes_sampler:
        fields["sampler"] = choices.sampler
    # The scale and the sha256 only qualify a LoRA link: without one there is nothing to apply them to.
    if choices.lora_url is not None:
        fields |= {"lora_url": choices.lora_url, "lora_scale": choices.lora_scale, "lora_sha256": choices.lora_sha256}
    return {name: value for name, value in fields.items() if value is not None}


def _requested_size(model: TextToImageModel, choices: GenerateChoices) -> tuple[int | None, int | None]:
    """(width, height): as given, else the aspect's size for `model`, else (None, None) for the default."""
    if (choices.width is None) != (choices.height is None):
        raise ToolboxError(ErrorCode.INVALID_INPUT, HALF_A_SIZE)
    if choices.width is not None:
        return choices.width, choices.height
    if choices.aspect is None:
        return None, None
    if choices.aspect not in model.aspects:
        raise ToolboxError(ErrorCode.INVALID_INPUT, _aspect_refused(choices.aspect))
    return model.aspects[choices.aspect]


async def _library_checkpoint(library: Library, name: str | None) -> dict[str, Any]:
    """The checkpoint named (its file there) as `Library.active_checkpoint` describes one; None: the active one."""
    if name is None:
        return await library.active_checkpoint()
    entry = await library.find(name, kind="checkpoint")
    if entry.missing:
        raise ToolboxError(ErrorCode.MODELS_MISSING, f"The file of the checkpoint {entry.name} is missing; "
                           "an operator can import it again.")
    return library.checkpoint_record(entry)


def _face_refused(model: TextToImageModel) -> str:
    takers = names_of([other for other in GENERATE_MODELS.values() if other.takes_faces])
    return (f"A face photo works with {takers} only: InstantID has no {model.name} weights. "
            f"Generate with {takers} to use one.")


def _lora_url_refused(model: TextToImageModel) -> str:
    takers = names_of([other for other in GENERATE_MODELS.values() if other.takes_lora_url])
    return f"A LoRA URL works with {takers} only: {model.name} takes LoRAs from the library."


def _sampler_refused(model: TextToImageModel) -> str:
    takers = names_of([other for other in GENERATE_MODELS.values() if other.takes_sampler])
    return f"A sampler is chosen for {takers} only: {model.name} runs on its own scheduler."


def _aspect_refused(aspect: str) -> str:
    """An aspect the chosen model does not make: which models make it, or which aspects there are."""
    makers = [model for model in GENERATE_MODELS.values() if aspect in model.aspects]
    if not makers:
        every = dict.fromkeys(name for model in GENERATE_MODELS.values() for name in model.aspects)
        return f"The aspect is one of {', '.join(every)} (got {aspect!r})."
    makers_named = names_of(makers)
    return f"The {aspect} size is made by {makers_named} only: pick {makers_named} as the model, or another aspect."


# ------------------------------------------------------------------ upscale


async def build_upscale_request(library: Library, choices: UpscaleChoices) -> BuiltUpscale:
    """The checked upscale for `choices`, on the library's active checkpoint, or the ToolboxError of
    the first thing wrong with them (INVALID_INPUT for a value or a size, INCOMPATIBLE_MODEL for a LoRA
    of another family)."""
    # 1. Every value, and the image's size at that scale, with no library lookup.
    request = UpscaleRequest.parse(_upscale_fields(choices))
    refs = [LoraRef.parse({"name": lora.name, "weight": lora.weight}) for lora in choices.loras]
    output_size = check_upscale_size(*image_size(choices.image, name="The file to upscale"), request.scale)
    # 2. Its LoRAs, from the library: the upscaler is SDXL.
    loras = [await resolve_lora(library, lora, SDXL.lora_family) for lora in refs]
    # 3. The library's active checkpoint.
    checkpoint = await library.active_checkpoint()
    # 4. The request, with what the library gave.
    request = UpscaleRequest.parse({**request.to_payload(), "loras": loras, "checkpoint": checkpoint["file"]})
    return BuiltUpscale(request, checkpoint, output_size)


def _upscale_fields(choices: UpscaleChoices) -> dict[str, Any]:
    fields = {
        "image": choices.image, "scale": choices.scale, "prompt": choices.prompt, "negative": choices.negative,
        "creativity": choices.creativity, "seed": choices.seed, "steps": choices.steps, "sampler": choices.sampler,
        "ip_adapter_scale": choices.ip_adapter_scale, "region_prompts": list(choices.region_prompts) or None,
        "safety": choices.safety,
    }
    return {name: value for name, value in fields.items() if value is not None}


# ------------------------------------------------------------------ LoRAs


async def resolve_lora(library: Library, lora: LoraRef, family: str) -> dict[str, Any]:
    """{name, file, weight, trigger_words} of a library LoRA; its recommended weight unless one is given.
    A LoRA of another family than the job's model is INCOMPATIBLE_MODEL."""
    entry = await library.find(lora.name, kind="lora")
    if entry.family != family:
        wanted = FAMILY_NAMES[family]
        raise ToolboxError(
            ErrorCode.INCOMPATIBLE_MODEL,
            f"The LoRA {entry.name!r} is made for {FAMILY_NAMES.get(entry.family, entry.family)}; it cannot be used "
            f"with {wanted}. Pick a {wanted} LoRA.",
        )
    weight = lora.weight
    if weight is None:
        weight = entry.weight if entry.weight is not None else 1.0
    return {"name": entry.name, "file": entry.file, "weight": weight, "trigger_words": list(entry.trigger_words)}
