"""Flux LoRAs: which layout a file uses, and whether diffusers loads it into FLUX.1.

Flux LoRAs come as diffusers / PEFT (`transformer.….lora_A.weight`), Kohya
sd-scripts (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, CLIP-L
as `lora_te1_`), ComfyUI (`diffusion_model.` prefixes) or XLabs
(`double_blocks.0.processor.qkv_lora1.down.weight`). diffusers' own
`FluxPipeline.lora_state_dict` converts all of them (or says it cannot); the
converted layers are then checked against FLUX.1's transformer and CLIP-L,
built from their configs on the meta device. Nothing is rewritten: diffusers
loads each of these layouts as it is.
"""

from __future__ import annotations

from pathlib import Path

from modal_services.library.lora_formats.files import (
    DORA,
    LoraReport,
    incompatible_model,
    is_flux_layout,
    lora_load_failed,
    read_lora,
)
from modal_services.library.lora_formats.layouts import FluxLayout


def flux_format(state: dict) -> str:
    keys = list(state)
    if any(".processor." in key for key in keys):
        return "xlabs"
    if any(key.endswith(".lora_down.weight") for key in keys):
        return "kohya"
    return "diffusers"


def check_flux_lora(path: Path, layout: FluxLayout | None = None) -> LoraReport:
    """A Flux LoRA diffusers can load whose every layer fits the Flux model; LORA_LOAD_FAILED or
    INCOMPATIBLE_MODEL (an SDXL LoRA, or one of another size) with the reason otherwise."""
    from diffusers import FluxPipeline

    layout = layout or FluxLayout.flux1_dev()
    state = read_lora(Path(path))
    if not is_flux_layout(state):
        sample = ", ".join(sorted(state)[:2])
        raise incompatible_model(
            f"This is not a Flux LoRA: its layers ({sample}…) are those of an SDXL or SD LoRA. Use it with SDXL."
        )
    fmt = flux_format(state)
    notes = ["DoRA magnitudes are dropped by diffusers"] if any(DORA in key for key in state) else []
    try:
        # The converters pop what they consume: give them a copy.
        converted = FluxPipeline.lora_state_dict(dict(state))
    except (ValueError, KeyError, IndexError, AssertionError, RuntimeError) as exc:
        raise lora_load_failed(f"diffusers cannot read this file as a Flux LoRA ({type(exc).__name__}: {str(exc)[:200]}).") from None
    counts, rank = _check_flux_fit(converted, layout)
    return LoraReport(fmt, False, sum(counts.values()), rank, counts, notes)


def _check_flux_fit(converted: dict, layout: FluxLayout) -> tuple[dict[str, int], int | None]:
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    text = {key[len("text_encoder."):]: value for key, value in converted.items() if key.startswith("text_encoder.")}
    peft = {key: value for key, value in converted.items() if not key.startswith("text_encoder.")}
    if text:
        peft |= {f"text_encoder.{key}": value
                 for key, value in convert_state_dict_to_peft(convert_state_dict_to_diffusers(text)).items()}
    pairs: dict[tuple[str, str], dict[str, tuple]] = {}
    for key, tensor in peft.items():
        component, _, rest = key.partition(".")
        for suffix, role in ((".lora_A.weight", "down"), (".lora_B.weight", "up")):
            if rest.endswith(suffix):
                pairs.setdefault((component, rest[: -len(suffix)]), {})[role] = tuple(tensor.shape)
                break
        else:
            if rest.endswith((".lora_B.bias", ".lora_magnitude_vector", ".alpha")) and component in layout.layers:
                continue
            raise incompatible_model(f"The LoRA changes {key}, which Flux does not have: it is not a Flux LoRA.")
    if not pairs:
        raise lora_load_failed("The file holds no LoRA layers.")
    counts: dict[str, int] = {}
    ranks = set()
    for (component, path), shapes in pairs.items():
        target = layout.layers.get(component, {}).get(path)
        if target is None:
            raise incompatible_model(f"The LoRA changes {component}.{path}, which Flux does not have: it is not a Flux LoRA.")
        down, up = shapes.get("down"), shapes.get("up")
        if down is None or up is None:
            raise lora_load_failed(f"The LoRA layer for {component}.{path} is incomplete (one of its two matrices is missing).")
        if up[0] != target[0] or down[1] != target[1] or up[1] != down[0]:
            raise incompatible_model(
                f"The LoRA's shapes for {component}.{path} ({up[0]}x{down[1]}) do not fit this Flux model's "
                f"({target[0]}x{target[1]}): it was made for another base model."
            )
        ranks.add(down[0])
        counts[component] = counts.get(component, 0) + 1
    return counts, max(ranks)
