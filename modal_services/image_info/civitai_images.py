"""A CivitAI image's published generation data (an item of `GET /api/v1/images?imageId=`), read into settings.

CivitAI publishes what it read from the uploaded file, or what its own
generator used, as `meta`: `prompt`, `negativePrompt`, `steps`, `sampler`
(with `Schedule type` where A1111 wrote one), `cfgScale`, `seed`, `Size`
("832x1216"), `Model` and `Model hash`. The resources come in two lists:
`civitaiResources` (its generator's: `type`, `modelVersionId`, `weight`) and
`resources` (parsed from an uploaded file: `type` "model" or "lora", `name`,
`hash`, `weight`). Some answers nest the data one level down (`meta.meta`).

Every value is a stranger's: anything of the wrong type reads as absent, and
`GenerationSettings` bounds what is kept.
"""

from __future__ import annotations

from typing import Any

from modal_services.image_info.infotext import joined_sampler, size_of, without_lora_tags
from modal_services.image_info.settings import MAX_LORAS, GenerationSettings, LoraUse, as_id

# CivitAI's resource types that are LoRAs to the library, lower-cased.
LORA_TYPES = ("lora", "locon", "dora", "lycoris")
CHECKPOINT_TYPES = ("checkpoint", "model")
# Fields shown as they are, besides the settings' own.
SHOWN_FIELDS = ("Clip skip", "clipSkip", "Denoising strength", "Hires upscale", "Hires upscaler", "VAE")


def image_page(image_id: int) -> str:
    return f"https://civitai.com/images/{image_id}"


def published_meta(item: dict[str, Any]) -> dict[str, Any]:
    """The image's generation data: `meta`, or the `meta` nested in it; {} when it has none."""
    meta = item.get("meta")
    if isinstance(meta, dict) and "prompt" not in meta and isinstance(meta.get("meta"), dict):
        meta = meta["meta"]
    return meta if isinstance(meta, dict) else {}


def read_civitai_image(item: dict[str, Any]) -> GenerationSettings:
    """The settings CivitAI publishes for one image (empty when it publishes none)."""
    meta = published_meta(item)
    prompt, tagged = without_lora_tags(_text(meta.get("prompt")))
    width, height = size_of(_text(meta.get("Size")))
    checkpoint = _checkpoint_resource(meta)
    return GenerationSettings(
        source=f"CivitAI image {as_id(item.get('id')) or ''}".strip(), prompt=prompt,
        negative_prompt=_text(meta.get("negativePrompt")), steps=_number(meta.get("steps")),
        sampler=joined_sampler(_text(meta.get("sampler")) or None, _text(meta.get("Schedule type")) or None),
        cfg=_number(meta.get("cfgScale")), seed=_number(meta.get("seed")), width=width, height=height,
        model=_text(meta.get("Model")) or _text(checkpoint.get("name")) or None,
        model_hash=_text(meta.get("Model hash")) or _text(checkpoint.get("hash")) or None,
        model_version_id=checkpoint.get("modelVersionId"),
        loras=_loras(meta, tagged),
        other=_shown_fields(item, meta),
    )


def _shown_fields(item: dict[str, Any], meta: dict[str, Any]) -> dict[str, str]:
    """What else is worth showing: the image's base model, clip skip, hires fix..."""
    shown = {"Base model": _text(item.get("baseModel"))}
    shown |= {name: str(value) for name in SHOWN_FIELDS if (value := _number(meta.get(name))) is not None}
    return {name: value for name, value in shown.items() if value}


def _checkpoint_resource(meta: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint among the resources (CivitAI's generator's first, with its version id), or {}."""
    for resource in _resources(meta, "civitaiResources") + _resources(meta, "resources"):
        if _text(resource.get("type")).lower() in CHECKPOINT_TYPES:
            return resource
    return {}


def _loras(meta: dict[str, Any], tagged: list[tuple[str, float | None]]) -> list[LoraUse]:
    """The LoRAs of CivitAI's generator, else those read from the uploaded file, else the prompt's tags."""
    generator = [LoraUse(_lora_name(resource), _number(resource.get("weight") if "weight" in resource
                                                       else resource.get("strength")),
                         None, resource.get("modelVersionId"))
                 for resource in _resources(meta, "civitaiResources") if _is_lora(resource)]
    uploaded = [LoraUse(_text(resource.get("name")), _number(resource.get("weight")), _text(resource.get("hash")) or None)
                for resource in _resources(meta, "resources") if _is_lora(resource) and _text(resource.get("name"))]
    return (generator or uploaded or [LoraUse(name, weight) for name, weight in tagged])[:MAX_LORAS]


def _lora_name(resource: dict[str, Any]) -> str:
    """How a generator's LoRA is named: CivitAI's names when it sends them, else its version id."""
    name = _text(resource.get("modelName")) or _text(resource.get("name"))
    version = _text(resource.get("modelVersionName"))
    if name:
        return f"{name} ({version})" if version else name
    return f"CivitAI model version {as_id(resource.get('modelVersionId')) or '?'}"


def _resources(meta: dict[str, Any], name: str) -> list[dict[str, Any]]:
    listed = meta.get(name)
    return [resource for resource in listed[: MAX_LORAS * 2] if isinstance(resource, dict)] \
        if isinstance(listed, list) else []


def _is_lora(resource: dict[str, Any]) -> bool:
    return _text(resource.get("type")).lower() in LORA_TYPES


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _number(value: Any) -> int | float | str | None:
    """A number, or its text; anything else (a list, an object, a bool) reads as absent."""
    return value if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
