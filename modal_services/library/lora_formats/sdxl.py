"""SDXL LoRAs: which layout a file uses, and a copy diffusers loads when it cannot load the file as it is.

Layouts diffusers takes as they are (diffusers / PEFT, Kohya, LoCon without a
CP `lora_mid`) are only checked; the rest are rewritten as plain Kohya LoRAs
(`factorization`), and DoRA in PEFT's own layout.
"""

from __future__ import annotations

from pathlib import Path

from modal_services.library.lora_formats.factorization import delta_to_lora
from modal_services.library.lora_formats.files import (
    DORA,
    LoraReport,
    incompatible_model,
    lora_load_failed,
    read_lora,
    save_converted,
)
from modal_services.library.lora_formats.layouts import ModelLayout
from modal_services.library.lora_formats.sdxl_fit import check_fit, peft_keys, target_shapes

KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_")
DIFFUSERS_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.")
DEFAULT_MAX_RANK = 128
# Relative error (Frobenius) above which a truncated conversion is worth a note.
NOTE_ERROR = 1e-3
# Params per Kohya-named layer, by what they mean.
PLAIN = {"lora_down.weight", "lora_up.weight", "alpha"}
LOHA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}
LOKR = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
UNSUPPORTED = {
    "diff_b": "bias deltas",
    "bias": "bias deltas",
    "w_norm": "norm-layer weights",
    "b_norm": "norm-layer biases",
}
# Kohya's names for SD 1.5's single text encoder (SDXL's are lora_te1_ / lora_te2_).
SD15_TEXT_ENCODER_PREFIX = "lora_te_"


def classify(state: dict) -> str:
    keys = list(state)
    if any(".hada_" in key for key in keys):
        return "loha"
    if any(".lokr_" in key for key in keys):
        return "lokr"
    if keys and all(key.startswith(KOHYA_PREFIXES) for key in keys):
        if any(key.endswith(".diff") for key in keys):
            return "full"
        # LoCon: LoRA on convolutions too (4-D factors), with or without a CP `lora_mid`.
        if any(".lora_mid." in key or (key.endswith(".lora_down.weight") and state[key].dim() == 4) for key in keys):
            return "locon"
        return "kohya"
    if keys and all(key.startswith(DIFFUSERS_PREFIXES) for key in keys):
        return "diffusers"
    sample = ", ".join(sorted(keys)[:3])
    raise incompatible_model(
        f"This is not an SDXL LoRA: its layers ({sample}…) match no SDXL LoRA layout "
        "(diffusers, Kohya, LyCORIS). It may be for another architecture (Flux, SD3…)."
    )


def normalize_lora(src: Path, dst: Path, layout: ModelLayout | None = None, max_rank: int = DEFAULT_MAX_RANK) -> LoraReport:
    """Check `src`; when diffusers cannot load it as it is, write a converted copy to `dst`.

    Returns the report (format, whether `dst` was written, layers, rank). Raises
    LORA_LOAD_FAILED (cannot be converted) or INCOMPATIBLE_MODEL (not SDXL).
    """
    layout = layout or ModelLayout.sdxl()
    state = read_lora(Path(src))
    if any(key.startswith(SD15_TEXT_ENCODER_PREFIX) for key in state):
        raise incompatible_model(
            "This LoRA was made for SD 1.5: it changes SD 1.5's single text encoder (`lora_te_` layers). "
            "Look for an SDXL version of it."
        )
    fmt = classify(state)
    notes: list[str] = []
    if fmt == "diffusers":
        components, rank = check_fit(state, layout)
        return LoraReport(fmt, False, sum(components.values()), rank, components, notes)

    layers = _group_kohya(state)
    if fmt in ("kohya", "locon") and all(set(params) <= PLAIN for params in layers.values()):
        components, rank = check_fit(state, layout)
        return LoraReport(fmt, False, sum(components.values()), rank, components, notes)

    # A file diffusers will not take as it is: every layer becomes plain lora_down/lora_up.
    shapes = target_shapes(layers, layout)
    converted: dict = {}
    worst = 0.0
    for name, params in layers.items():
        weights = {param: tensor for param, tensor in params.items() if param != DORA}
        down, up, alpha, error = delta_to_lora(name, weights, shapes.get(name), max_rank)
        converted[f"{name}.lora_down.weight"] = down
        converted[f"{name}.lora_up.weight"] = up
        converted[f"{name}.alpha"] = alpha
        worst = max(worst, error)
    if worst > NOTE_ERROR:
        notes.append(f"rank capped at {max_rank}: largest relative error {worst:.1%}")
    components, rank = check_fit(converted, layout)
    if any(DORA in params for params in layers.values()):
        fmt = "dora"
        converted = _to_peft_dora(layers, converted, shapes, layout)
    save_converted(converted, dst, fmt)
    return LoraReport(fmt, True, sum(components.values()), rank, components, notes)


def _to_peft_dora(layers: dict[str, dict], converted: dict, shapes: dict, layout: ModelLayout) -> dict:
    """Plain lora_down/lora_up (scale folded in) plus each layer's DoRA magnitude, in PEFT's layout.

    PEFT's DoRA rescales each output row of W + ΔW to its magnitude, the
    LyCORIS `wd_on_out` decomposition: `dora_scale` of shape (out, 1, ...).
    """
    mapping = peft_keys(converted, layout)
    with_magnitude: dict[str, list[bool]] = {}
    peft: dict = {}
    for name, params in layers.items():
        component, path = mapping[f"{name}.lora_down.weight"]
        prefix = f"{component}.{path}"
        peft[f"{prefix}.lora_A.weight"] = converted[f"{name}.lora_down.weight"]
        peft[f"{prefix}.lora_B.weight"] = converted[f"{name}.lora_up.weight"]
        magnitude = params.get(DORA)
        with_magnitude.setdefault(component, []).append(magnitude is not None)
        if magnitude is None:
            continue
        out_features = shapes[name][0]
        if magnitude.shape[0] != out_features or magnitude.numel() != out_features:
            raise lora_load_failed(
                f"This DoRA decomposes {name} on its input side (dora_scale {tuple(magnitude.shape)}); "
                "diffusers (PEFT) only applies DoRA per output feature."
            )
        # PEFT's shapes: (out,) for a Linear, (1, out, 1, 1) for a Conv2d.
        kernel = shapes[name][2:]
        shape = (1, out_features, *[1] * len(kernel)) if kernel else (out_features,)
        peft[f"{prefix}.lora_magnitude_vector.weight"] = magnitude.reshape(shape).contiguous()
    for component, flags in with_magnitude.items():
        # PEFT makes a whole component DoRA or not: a layer without a magnitude would be rescaled too.
        if any(flags) and not all(flags):
            raise lora_load_failed(f"This DoRA has magnitudes on only some of its {component} layers, which PEFT cannot apply.")
    return peft


def _group_kohya(state: dict) -> dict[str, dict]:
    layers: dict[str, dict] = {}
    for key, tensor in state.items():
        name, _, param = key.partition(".")
        if not param:
            raise lora_load_failed(f"Unexpected key {key!r}: not a LoRA layer parameter.")
        layers.setdefault(name, {})[param] = tensor
    known = PLAIN | LOHA | LOKR | {"lora_mid.weight", "diff", DORA}
    for name, params in layers.items():
        for param in params:
            if param in UNSUPPORTED:
                raise lora_load_failed(f"This LoRA trains {UNSUPPORTED[param]} ({name}.{param}), which cannot be applied as a LoRA.")
            if param not in known:
                raise lora_load_failed(f"Unknown LoRA parameter {name}.{param}: this format is not supported.")
    return layers
