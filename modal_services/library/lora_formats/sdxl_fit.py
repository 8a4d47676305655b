"""Whether an SDXL LoRA fits SDXL: its layer names through diffusers' own key conversion, its shapes against SDXL's."""

from __future__ import annotations

from modal_services.library.lora_formats.files import incompatible_model, lora_load_failed
from modal_services.library.lora_formats.layouts import ModelLayout


def target_shapes(layers: dict[str, dict], layout: ModelLayout) -> dict[str, tuple[int, ...]]:
    """Kohya layer name → the weight shape of the model layer it modifies (needed to fold conv kernels)."""
    import torch

    probe = {}
    for name in layers:
        probe[f"{name}.lora_down.weight"] = torch.empty((1, 1), device="meta")
        probe[f"{name}.lora_up.weight"] = torch.empty((1, 1), device="meta")
    mapping = peft_keys(probe, layout)
    shapes = {}
    for name in layers:
        component, path = mapping[f"{name}.lora_down.weight"]
        shape = layout.layers[component].get(path)
        if shape is None:
            raise incompatible_model(f"The LoRA layer {name} has no counterpart in SDXL ({component}.{path}): it is not an SDXL LoRA.")
        shapes[name] = shape
    return shapes


def peft_keys(state: dict, layout: ModelLayout) -> dict[str, tuple[str, str]]:
    """Each key of a LoRA state dict → (component, model layer path), via diffusers' own key conversion."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    # Tag each tensor with its original key: the tag survives every rename.
    tagged = {}
    tags = {}
    for index, key in enumerate(state):
        if key.endswith(".alpha"):
            tagged[key] = torch.tensor(1.0)
            continue
        tensor = torch.empty((index + 1,), device="meta")
        tagged[key] = tensor
        tags[index + 1] = key
    try:
        converted, _ = StableDiffusionXLPipeline.lora_state_dict(tagged, unet_config=layout.unet_config)
    except (ValueError, KeyError, IndexError) as exc:
        raise lora_load_failed(f"diffusers cannot read this LoRA's layer names ({str(exc)[:200]}).") from None
    mapping: dict[str, tuple[str, str]] = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        part = {k[len(component) + 1:]: v for k, v in converted.items() if k.startswith(component + ".")}
        if not part:
            continue
        if component == "unet":
            if not any("lora_A" in k for k in part):
                part = convert_unet_state_dict_to_peft(part)
        else:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            if layout.text_model_flattened(component):
                part = {k.removeprefix("text_model."): v for k, v in part.items()}
        for key, tensor in part.items():
            for suffix in (".lora_A.weight", ".lora_B.weight"):
                if key.endswith(suffix) and tensor.dim() == 1:
                    mapping[tags[tensor.shape[0]]] = (component, key[: -len(suffix)])
    unmapped = [key for key in state if not key.endswith(".alpha") and key not in mapping and "magnitude" not in key]
    if unmapped:
        raise lora_load_failed(f"diffusers would not load these layers: {', '.join(unmapped[:5])}.")
    return mapping


def check_fit(state: dict, layout: ModelLayout) -> tuple[dict[str, int], int | None]:
    """Every LoRA layer names a layer of the model and has its shapes; returns layers per component and rank."""
    mapping = peft_keys(state, layout)
    pairs: dict[tuple[str, str], dict[str, tuple]] = {}
    for key, (component, path) in mapping.items():
        role = "down" if key.endswith(("lora_down.weight", "lora_A.weight", ".down.weight")) else "up"
        pairs.setdefault((component, path), {})[role] = tuple(state[key].shape)
    ranks = set()
    counts: dict[str, int] = {}
    for (component, path), shapes in pairs.items():
        target = layout.layers[component].get(path)
        where = f"{component}.{path}"
        if target is None:
            raise incompatible_model(f"The LoRA changes {where}, which SDXL does not have: it is not an SDXL LoRA.")
        down, up = shapes.get("down"), shapes.get("up")
        if down is None or up is None:
            raise lora_load_failed(f"The LoRA layer for {where} is incomplete (one of its two matrices is missing).")
        out_features, in_features = target[0], target[1]
        kernel = target[2:]
        fits = (
            up[0] == out_features
            and down[1] == in_features
            and up[1] == down[0]
            and (tuple(down[2:]) in ((), kernel) if kernel else len(down) == 2)
            and tuple(up[2:]) in ((), (1, 1))
        )
        if not fits:
            raise incompatible_model(
                f"The LoRA's shapes for {where} ({'x'.join(map(str, up[:1]))}x{'x'.join(map(str, down[1:]))}) do not fit "
                f"SDXL's ({'x'.join(map(str, target))}): it was made for another base model (SD 1.5?)."
            )
        ranks.add(down[0])
        counts[component] = counts.get(component, 0) + 1
    if not pairs:
        raise lora_load_failed("The file holds no LoRA layers.")
    _check_beyond_sd15(pairs, layout)
    return counts, max(ranks) if ranks else None


def _check_beyond_sd15(pairs, layout: ModelLayout) -> None:
    """At least one changed layer must be one SD 1.5 lacks or shapes differently (or the second text encoder)."""
    sd15 = ModelLayout.sd15().layers
    for component, path in pairs:
        if component == "text_encoder_2" or sd15[component].get(path) != layout.layers[component][path]:
            return
    raise incompatible_model(
        "This LoRA changes only layers SD 1.5 has with the same shapes, none that only SDXL has: it was made "
        "for SD 1.5 or another base model. Look for an SDXL version of it."
    )


# ---------------------------------------------------------------- conversions to lora_down / lora_up
