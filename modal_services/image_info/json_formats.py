"""The JSON metadata of NovelAI and InvokeAI images, read into settings.

NovelAI writes its settings as the `Comment` text chunk (JSON: `prompt`,
`uc` the negative, `steps`, `scale`, `seed`, `sampler`, `noise_schedule`...;
V4's prompts also under `v4_prompt.caption.base_caption`), the prompt again as
`Description` and the model as `Source`. InvokeAI writes `invokeai_metadata`
(JSON: `positive_prompt`, `negative_prompt`, `cfg_scale`, `scheduler`, `model`
with its `hash`, `loras` each with its model and `weight`).
"""

from __future__ import annotations

from typing import Any

from modal_services.image_info.infotext import joined_sampler
from modal_services.image_info.settings import GenerationSettings, LoraUse

NOVELAI_SAMPLERS = {
    "k_euler": "Euler", "k_euler_ancestral": "Euler a", "k_dpmpp_2s_ancestral": "DPM++ 2S a",
    "k_dpmpp_2m": "DPM++ 2M", "k_dpmpp_sde": "DPM++ SDE", "k_dpmpp_2m_sde": "DPM++ 2M SDE", "ddim": "DDIM",
    "ddim_v3": "DDIM",
}
NOVELAI_SCHEDULES = {"karras": "Karras", "exponential": "Exponential", "polyexponential": "Polyexponential"}
# InvokeAI's scheduler names without their `_k` (Karras) ending.
INVOKEAI_SCHEDULERS = {
    "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "lms": "LMS", "kdpm_2": "DPM2", "kdpm_2_a": "DPM2 a",
    "dpmpp_2s": "DPM++ 2S", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_sde": "DPM++ SDE",
    "dpmpp_3m": "DPM++ 3M", "ddim": "DDIM", "ddpm": "DDPM", "deis": "DEIS", "unipc": "UniPC", "lcm": "LCM", "tcd": "TCD",
}
OTHER_LIMIT = 20


def read_novelai(comment: Any, texts: dict[str, str]) -> GenerationSettings | None:
    """The settings in NovelAI's `Comment` JSON (`comment`, parsed), with its other chunks (`texts`)."""
    if not isinstance(comment, dict):
        return None
    schedule = NOVELAI_SCHEDULES.get(str(comment.get("noise_schedule")))
    sampler = comment.get("sampler")
    return GenerationSettings(
        source="NovelAI",
        prompt=_text(comment.get("prompt")) or _v4_caption(comment.get("v4_prompt")) or texts.get("Description", ""),
        negative_prompt=_text(comment.get("uc")) or _v4_caption(comment.get("v4_negative_prompt")),
        steps=comment.get("steps"), cfg=comment.get("scale"), seed=comment.get("seed"),
        width=comment.get("width"), height=comment.get("height"),
        sampler=joined_sampler(NOVELAI_SAMPLERS.get(str(sampler), sampler and str(sampler)), schedule),
        model=texts.get("Source"), denoising_strength=comment.get("strength"),
        other=_scalars(comment, exclude=("prompt", "uc", "steps", "scale", "seed", "width", "height", "sampler",
                                         "noise_schedule", "strength")),
    )


def read_invokeai(metadata: Any) -> GenerationSettings | None:
    """The settings in InvokeAI's `invokeai_metadata` JSON (parsed)."""
    if not isinstance(metadata, dict):
        return None
    model = metadata.get("model") if isinstance(metadata.get("model"), dict) else {}
    return GenerationSettings(
        source="InvokeAI", prompt=_text(metadata.get("positive_prompt")),
        negative_prompt=_text(metadata.get("negative_prompt")), steps=metadata.get("steps"),
        cfg=metadata.get("cfg_scale"), seed=metadata.get("seed"), width=metadata.get("width"),
        height=metadata.get("height"), sampler=_invokeai_sampler(metadata.get("scheduler")),
        model=model.get("name"), model_hash=model.get("hash"), loras=_invokeai_loras(metadata.get("loras")),
        denoising_strength=metadata.get("strength"),
        other=_scalars(metadata, exclude=("positive_prompt", "negative_prompt", "steps", "cfg_scale", "seed", "width",
                                          "height", "scheduler", "strength")),
    )


def _invokeai_sampler(name: Any) -> str | None:
    if not isinstance(name, str) or not name:
        return None
    base, karras = (name[:-2], "Karras") if name.endswith("_k") else (name, None)
    return joined_sampler(INVOKEAI_SCHEDULERS.get(base, base), karras)


def _invokeai_loras(loras: Any) -> list[LoraUse]:
    """Each `{"model": {"name", "hash"}, "weight"}` (older versions: `{"lora": {"model_name"}, "weight"}`)."""
    found = []
    for lora in loras if isinstance(loras, list) else []:
        if not isinstance(lora, dict):
            continue
        model = lora.get("model") or lora.get("lora")
        if isinstance(model, dict) and (model.get("name") or model.get("model_name")):
            found.append(LoraUse(model.get("name") or model.get("model_name"), lora.get("weight"), model.get("hash")))
    return found


def _v4_caption(prompt: Any) -> str:
    caption = prompt.get("caption") if isinstance(prompt, dict) else None
    return _text(caption.get("base_caption")) if isinstance(caption, dict) else ""


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _scalars(data: dict[str, Any], exclude: tuple[str, ...]) -> dict[str, str]:
    """The other plain values (text, numbers, yes/no), to show as written."""
    return {str(key): str(value) for key, value in list(data.items())[:OTHER_LIMIT * 4]
            if key not in exclude and isinstance(value, (str, int, float, bool))}
