"""Building an upscale request from what a member or a terminal asked for (the cog and the CLI).

LoRAs are named as the library knows them; only the state store is read
(entries, the active checkpoint), so this works the same whether the files
are local or on the workers' volume. The worker finds the files by name under
its own LoRA volume and adds the trigger words to the prompt.
"""

from __future__ import annotations

from typing import Any

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.requests import LoraRef, UpscaleRequest
from modal_services.library.entries import Library


FAMILY_NAMES = {"sdxl": "SDXL", "flux": "Flux"}


async def resolve_lora(library: Library, lora: LoraRef, family: str = "sdxl") -> dict[str, Any]:
    """{name, file, weight, trigger_words} of a library LoRA; its recommended weight unless one is given.
    A LoRA of another family than the job's model is INCOMPATIBLE_MODEL."""
    entry = await library.find(lora.name, kind="lora")
    if entry.family != family:
        raise ToolboxError(
            ErrorCode.INCOMPATIBLE_MODEL,
            f"The LoRA {entry.name!r} is made for {FAMILY_NAMES.get(entry.family, entry.family)}; it cannot be used "
            f"with {FAMILY_NAMES[family]}. Pick a {FAMILY_NAMES[family]} LoRA.",
        )
    weight = lora.weight
    if weight is None:
        weight = entry.weight if entry.weight is not None else 1.0
    return {"name": entry.name, "file": entry.file, "weight": weight, "trigger_words": list(entry.trigger_words)}


async def upscale_request(library: Library, image: bytes, choices: dict[str, Any], loras: list[dict[str, Any]]) -> tuple[UpscaleRequest, dict]:
    """The checked request for `image` with the member's `choices` (scale, prompt, creativity, seed...;
    None for the default) and `loras` ({name, weight}), on the active checkpoint; and that checkpoint.

    Every value is checked before any library lookup, so a bad one is named first."""
    given = {name: value for name, value in choices.items() if value is not None}
    UpscaleRequest.parse({**given, "image": image})
    refs = [LoraRef.parse(lora) for lora in loras]
    resolved = [await resolve_lora(library, ref) for ref in refs]
    checkpoint = await library.active_checkpoint()
    request = UpscaleRequest.parse({**given, "image": image, "loras": resolved, "checkpoint": checkpoint["file"]})
    return request, checkpoint


def parse_lora_option(value: str) -> dict[str, Any]:
    """`NAME` or `NAME:WEIGHT` (the CLI's --lora) as {name, weight}."""
    name, separator, weight = value.rpartition(":")
    if not separator:
        return {"name": value.strip(), "weight": None}
    try:
        return {"name": name.strip(), "weight": float(weight)}
    except ValueError:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"--lora {value!r}: the weight after ':' must be a number.") from None
