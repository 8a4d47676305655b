"""What kind of LoRA a file is, whether it fits SDXL, and a form diffusers loads.

People publish SDXL LoRAs in several layouts:

- diffusers / PEFT: `unet.….lora_A.weight` / `lora_B.weight` (or the older
  `…to_q_lora.down.weight`);
- Kohya: `lora_unet_*`, `lora_te1_*`, `lora_te2_*` with `lora_down`,
  `lora_up`, `alpha` (in diffusers or in SGM block naming);
- LyCORIS LoCon: the same keys on convolutions too, optionally with a CP
  `lora_mid`;
- LyCORIS LoHa (`hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, optional
  `hada_t1`/`hada_t2`) and LoKr (`lokr_w1[_a/_b]`, `lokr_w2[_a/_b]`,
  optional `lokr_t2`);
- full-weight deltas (`diff`).

diffusers' `load_lora_weights` takes the first three (minus `lora_mid`) and
refuses the rest. Every one of them is a weight delta ΔW per layer, so the
rest are rewritten as plain Kohya LoRAs (`lora_down`, `lora_up`, `alpha`):
exactly where the delta's structure gives a low-rank factorisation (CP LoCon,
LoHa's Hadamard product of two low-rank matrices, LoKr's Kronecker product),
by SVD otherwise, truncated at `max_rank` with the error recorded.

Before anything is accepted, the layer names go through diffusers' own key
conversion and the shapes are checked against the target model's layers,
built from its configs on the `meta` device: no SDXL weights are loaded, and
an SD 1.5 or Flux LoRA is caught here instead of in the upscaler.

DoRA (LyCORIS `dora_scale`, which diffusers' SDXL loader drops) is rewritten
in PEFT's own layout, `lora_A` / `lora_B` / `lora_magnitude_vector`, which
diffusers hands to PEFT as a DoRA adapter. What cannot be expressed that way
(bias or norm deltas, DoRA decomposed on the input side, DoRA on only some
layers) is refused with LORA_LOAD_FAILED and why.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modal_services.errors import ErrorCode, ToolboxError

log = logging.getLogger(__name__)

FORMATS = ("diffusers", "kohya", "locon", "loha", "lokr", "full", "dora")
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
DORA = "dora_scale"

# SDXL 1.0 base: the layer layout every SDXL-family model shares (diffusers' and
# transformers' config names; everything else is their defaults).
SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SDXL_TEXT_ENCODER_CONFIG = {  # CLIP ViT-L/14
    "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
    "projection_dim": 768, "hidden_act": "quick_gelu", "max_position_embeddings": 77, "vocab_size": 49408,
}
SDXL_TEXT_ENCODER_2_CONFIG = {  # OpenCLIP ViT-bigG/14
    "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
    "projection_dim": 1280, "hidden_act": "gelu", "max_position_embeddings": 77, "vocab_size": 49408,
}

# SD 1.5's UNet (its text encoder is SDXL's first, CLIP ViT-L/14): the layers an
# SDXL LoRA must go beyond, since an SD 1.5 LoRA touching only layers whose
# shapes both models share would load into SDXL and do nonsense.
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
}
# Kohya's names for SD 1.5's single text encoder (SDXL's are lora_te1_ / lora_te2_).
SD15_TEXT_ENCODER_PREFIX = "lora_te_"


@dataclass
class LoraReport:
    format: str
    converted: bool
    layers: int
    rank: int | None
    components: dict[str, int] = field(default_factory=dict)  # unet / text_encoder / text_encoder_2 → layers
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ModelLayout:
    """The Linear/Conv layers of a UNet and two text encoders, from configs, on the meta device."""

    def __init__(self, unet_config: dict, text_encoder_config: dict, text_encoder_2_config: dict):
        self._configs = (dict(unet_config), dict(text_encoder_config), dict(text_encoder_2_config))

    @classmethod
    @functools.cache
    def sdxl(cls) -> "ModelLayout":
        return cls(SDXL_UNET_CONFIG, SDXL_TEXT_ENCODER_CONFIG, SDXL_TEXT_ENCODER_2_CONFIG)

    @classmethod
    @functools.cache
    def sd15(cls) -> "ModelLayout":
        """SD 1.5's layers (the second text encoder is a stand-in: SD 1.5 has none)."""
        return cls(SD15_UNET_CONFIG, SDXL_TEXT_ENCODER_CONFIG, SDXL_TEXT_ENCODER_CONFIG)

    @classmethod
    def of_pipeline(cls, pipe) -> "ModelLayout":
        return cls(dict(pipe.unet.config), pipe.text_encoder.config.to_dict(), pipe.text_encoder_2.config.to_dict())

    @functools.cached_property
    def _built(self):
        import torch
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        unet_config, te_config, te2_config = self._configs
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_config)
            te = CLIPTextModel(CLIPTextConfig(**te_config))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**te2_config))
        layers = {
            name: {path: tuple(module.weight.shape) for path, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
            for name, model in (("unet", unet), ("text_encoder", te), ("text_encoder_2", te2))
        }
        flattened = {"text_encoder": not hasattr(te, "text_model"), "text_encoder_2": not hasattr(te2, "text_model")}
        return unet.config, layers, flattened

    @property
    def unet_config(self):
        return self._built[0]

    @property
    def layers(self) -> dict[str, dict[str, tuple[int, ...]]]:
        return self._built[1]

    def text_model_flattened(self, component: str) -> bool:
        return self._built[2][component]


def _fail(message: str) -> ToolboxError:
    return ToolboxError(ErrorCode.LORA_LOAD_FAILED, message)


def _incompatible(message: str) -> ToolboxError:
    return ToolboxError(ErrorCode.INCOMPATIBLE_MODEL, message)


def read_lora(path: Path) -> dict:
    """All tensors of a .safetensors file; anything else is refused (never unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _fail(f"{path.name} is not a readable .safetensors file ({type(exc).__name__}).") from None
    if not state:
        raise _fail(f"{path.name} holds no tensors.")
    return state


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
    raise _incompatible(
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
        raise _incompatible(
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
    shapes = _target_shapes(layers, layout)
    converted: dict = {}
    worst = 0.0
    for name, params in layers.items():
        weights = {param: tensor for param, tensor in params.items() if param != DORA}
        down, up, alpha, error = _to_lora(name, weights, shapes.get(name), max_rank)
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
    _save(converted, dst, fmt)
    return LoraReport(fmt, True, sum(components.values()), rank, components, notes)


def _to_peft_dora(layers: dict[str, dict], converted: dict, shapes: dict, layout: ModelLayout) -> dict:
    """Plain lora_down/lora_up (scale folded in) plus each layer's DoRA magnitude, in PEFT's layout.

    PEFT's DoRA rescales each output row of W + ΔW to its magnitude, the
    LyCORIS `wd_on_out` decomposition: `dora_scale` of shape (out, 1, ...).
    """
    mapping = _peft_keys(converted, layout)
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
            raise _fail(
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
            raise _fail(f"This DoRA has magnitudes on only some of its {component} layers, which PEFT cannot apply.")
    return peft


def _group_kohya(state: dict) -> dict[str, dict]:
    layers: dict[str, dict] = {}
    for key, tensor in state.items():
        name, _, param = key.partition(".")
        if not param:
            raise _fail(f"Unexpected key {key!r}: not a LoRA layer parameter.")
        layers.setdefault(name, {})[param] = tensor
    known = PLAIN | LOHA | LOKR | {"lora_mid.weight", "diff", DORA}
    for name, params in layers.items():
        for param in params:
            if param in UNSUPPORTED:
                raise _fail(f"This LoRA trains {UNSUPPORTED[param]} ({name}.{param}), which cannot be applied as a LoRA.")
            if param not in known:
                raise _fail(f"Unknown LoRA parameter {name}.{param}: this format is not supported.")
    return layers


def _target_shapes(layers: dict[str, dict], layout: ModelLayout) -> dict[str, tuple[int, ...]]:
    """Kohya layer name → the weight shape of the model layer it modifies (needed to fold conv kernels)."""
    import torch

    probe = {}
    for name in layers:
        probe[f"{name}.lora_down.weight"] = torch.empty((1, 1), device="meta")
        probe[f"{name}.lora_up.weight"] = torch.empty((1, 1), device="meta")
    mapping = _peft_keys(probe, layout)
    shapes = {}
    for name in layers:
        component, path = mapping[f"{name}.lora_down.weight"]
        shape = layout.layers[component].get(path)
        if shape is None:
            raise _incompatible(f"The LoRA layer {name} has no counterpart in SDXL ({component}.{path}): it is not an SDXL LoRA.")
        shapes[name] = shape
    return shapes


def _peft_keys(state: dict, layout: ModelLayout) -> dict[str, tuple[str, str]]:
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
        raise _fail(f"diffusers cannot read this LoRA's layer names ({str(exc)[:200]}).") from None
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
        raise _fail(f"diffusers would not load these layers: {', '.join(unmapped[:5])}.")
    return mapping


def check_fit(state: dict, layout: ModelLayout) -> tuple[dict[str, int], int | None]:
    """Every LoRA layer names a layer of the model and has its shapes; returns layers per component and rank."""
    mapping = _peft_keys(state, layout)
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
            raise _incompatible(f"The LoRA changes {where}, which SDXL does not have: it is not an SDXL LoRA.")
        down, up = shapes.get("down"), shapes.get("up")
        if down is None or up is None:
            raise _fail(f"The LoRA layer for {where} is incomplete (one of its two matrices is missing).")
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
            raise _incompatible(
                f"The LoRA's shapes for {where} ({'x'.join(map(str, up[:1]))}x{'x'.join(map(str, down[1:]))}) do not fit "
                f"SDXL's ({'x'.join(map(str, target))}): it was made for another base model (SD 1.5?)."
            )
        ranks.add(down[0])
        counts[component] = counts.get(component, 0) + 1
    if not pairs:
        raise _fail("The file holds no LoRA layers.")
    _check_beyond_sd15(pairs, layout)
    return counts, max(ranks) if ranks else None


def _check_beyond_sd15(pairs, layout: ModelLayout) -> None:
    """At least one changed layer must be one SD 1.5 lacks or shapes differently (or the second text encoder)."""
    sd15 = ModelLayout.sd15().layers
    for component, path in pairs:
        if component == "text_encoder_2" or sd15[component].get(path) != layout.layers[component][path]:
            return
    raise _incompatible(
        "This LoRA changes only layers SD 1.5 has with the same shapes, none that only SDXL has: it was made "
        "for SD 1.5 or another base model. Look for an SDXL version of it."
    )


# ---------------------------------------------------------------- conversions to lora_down / lora_up


def _to_lora(name: str, params: dict, target: tuple[int, ...], max_rank: int):
    """(down, up, alpha, relative error) for one layer, in the source's dtype, with the scale folded in."""
    import torch

    dtype = next(t.dtype for t in params.values() if t.dim() > 0)
    out_features, in_flat = target[0], math.prod(target[1:])
    kernel = target[2:]
    f32 = {key: tensor.float() for key, tensor in params.items()}
    alpha = f32.get("alpha")
    if "lora_down.weight" in f32:
        down, up = f32["lora_down.weight"], f32["lora_up.weight"]
        rank = down.shape[0]
        if "lora_mid.weight" in f32:
            # CP LoCon: down (r, in, 1, 1), mid (r, r, kh, kw), up (out, r, 1, 1) → one (r, in, kh, kw) kernel.
            down = torch.einsum("rjhw,ji->rihw", f32["lora_mid.weight"], down.reshape(rank, -1))
        scale = (alpha.item() / rank) if alpha is not None else 1.0
        p, q = up.reshape(out_features, rank) * scale, down.reshape(rank, in_flat)
    elif "hada_w1_a" in f32:
        dim = f32["hada_w1_b"].shape[0]
        scale = (alpha.item() / dim) if alpha is not None else 1.0
        if "hada_t1" in f32:
            # CP-decomposed LoHa (conv): build the two full deltas, then their product.
            w1 = _rebuild_tucker(f32["hada_t1"], f32["hada_w1_a"], f32["hada_w1_b"])
            w2 = _rebuild_tucker(f32["hada_t2"], f32["hada_w2_a"], f32["hada_w2_b"])
            return _dense_to_lora((w1 * w2).reshape(out_features, in_flat) * scale, out_features, kernel, max_rank, dtype)
        p, q = _loha_factors(f32)
        p = p * scale
    elif "lokr_w1" in f32 or "lokr_w1_a" in f32:
        return _lokr_to_lora(name, f32, out_features, in_flat, kernel, max_rank, dtype)
    elif "diff" in f32:
        delta = f32["diff"].reshape(out_features, in_flat)
        return _dense_to_lora(delta, out_features, kernel, max_rank, dtype)
    else:
        raise _fail(f"The LoRA layer {name} has no weights.")
    if p.shape[0] != out_features or q.shape[1] != in_flat:
        raise _incompatible(f"The LoRA layer {name} does not fit SDXL's shapes: it was made for another base model.")
    down, up, error = _compress(p, q, max_rank)
    return _finish(down, up, kernel, dtype, error)


def _loha_factors(f32: dict):
    """LoHa's ΔW = (A1·B1) ∘ (A2·B2) is exactly P·Q with P, Q the row-wise Kronecker products of the factors."""
    a1, b1 = f32["hada_w1_a"], f32["hada_w1_b"].reshape(f32["hada_w1_b"].shape[0], -1)
    a2, b2 = f32["hada_w2_a"], f32["hada_w2_b"].reshape(f32["hada_w2_b"].shape[0], -1)
    p = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)  # (out, r1·r2)
    q = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])  # (r1·r2, in)
    return p, q


def _rebuild_tucker(t, wa, wb):
    import torch

    # LyCORIS' CP form: t (r, r, kh, kw), wa (out, r), wb (r, in) → (out, in, kh, kw).
    return torch.einsum("ijhw,jr,ip->prhw", t, wb.reshape(wb.shape[0], -1), wa)


def _lokr_to_lora(name, f32, out_features, in_flat, kernel, max_rank, dtype):
    """LoKr's ΔW = kron(W1, W2): its SVD is the Kronecker product of the two small SVDs."""
    import torch

    w1 = f32["lokr_w1"] if "lokr_w1" in f32 else f32["lokr_w1_a"] @ f32["lokr_w1_b"]
    if "lokr_w2" in f32:
        w2 = f32["lokr_w2"]
    elif "lokr_t2" in f32:
        w2 = _rebuild_tucker(f32["lokr_t2"], f32["lokr_w2_a"], f32["lokr_w2_b"])
    else:
        w2 = f32["lokr_w2_a"] @ f32["lokr_w2_b"].reshape(f32["lokr_w2_b"].shape[0], -1)
    w2 = w2.reshape(w2.shape[0], -1)
    if w1.shape[0] * w2.shape[0] != out_features or w1.shape[1] * w2.shape[1] != in_flat:
        raise _incompatible(f"The LoKr layer {name} does not fit SDXL's shapes: it was made for another base model.")
    # LyCORIS scales by alpha/dim only when a factor is decomposed (the dim is that factor's rank).
    dim = f32["lokr_w2_b"].shape[0] if "lokr_w2_b" in f32 else (f32["lokr_w1_b"].shape[0] if "lokr_w1_b" in f32 else None)
    alpha = f32.get("alpha")
    scale = alpha.item() / dim if (alpha is not None and dim) else 1.0
    u1, s1, v1 = torch.linalg.svd(w1, full_matrices=False)
    u2, s2, v2 = torch.linalg.svd(w2, full_matrices=False)
    products = (s1[:, None] * s2[None, :]).flatten() * abs(scale)
    order = torch.argsort(products, descending=True)
    keep = _rank_to_keep(products[order], max_rank)
    chosen = order[:keep]
    i, j = chosen // s2.shape[0], chosen % s2.shape[0]
    root = products[chosen].sqrt()
    sign = 1.0 if scale >= 0 else -1.0
    # Column k of kron(U1, U2) for the pair (i, j) is kron(u1[:, i], u2[:, j]).
    up = (u1[:, i][:, None, :] * u2[:, j][None, :, :]).reshape(out_features, keep) * root * sign
    down = ((v1[i][:, :, None] * v2[j][:, None, :]).reshape(keep, in_flat)) * root[:, None]
    total = products.square().sum().sqrt()
    error = (products[order[keep:]].square().sum().sqrt() / total).item() if total > 0 else 0.0
    return _finish(down, up, kernel, dtype, error)


def _dense_to_lora(delta, out_features, kernel, max_rank, dtype):
    import torch

    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = _rank_to_keep(s, max_rank)
    root = s[:keep].sqrt()
    total = s.square().sum().sqrt()
    error = (s[keep:].square().sum().sqrt() / total).item() if total > 0 else 0.0
    return _finish(root[:, None] * vh[:keep], u[:, :keep] * root, kernel, dtype, error)


def _compress(p, q, max_rank):
    """P·Q (out×R, R×in) rewritten at its true rank (at most `max_rank`): two QRs and a small SVD."""
    import torch

    qp, rp = torch.linalg.qr(p)
    qq, rq = torch.linalg.qr(q.T)
    u, s, vh = torch.linalg.svd(rp @ rq.T, full_matrices=False)
    keep = _rank_to_keep(s, max_rank)
    root = s[:keep].sqrt()
    total = s.square().sum().sqrt()
    error = (s[keep:].square().sum().sqrt() / total).item() if total > 0 else 0.0
    up = qp @ u[:, :keep] * root
    down = (root[:, None] * vh[:keep]) @ qq.T
    return down, up, error


def _rank_to_keep(singular_values, max_rank: int) -> int:
    """The numerical rank (values above 1e-6 of the largest), capped; at least 1."""
    if singular_values.numel() == 0 or singular_values[0] <= 0:
        return 1
    significant = int((singular_values > singular_values[0] * 1e-6).sum().item())
    return max(1, min(significant, max_rank))


def _finish(down, up, kernel, dtype, error):
    import torch

    rank = down.shape[0]
    if kernel:
        down = down.reshape(rank, -1, *kernel)
        up = up.reshape(up.shape[0], rank, 1, 1)
    # alpha = rank: the scale is already folded into the factors.
    return down.contiguous().to(dtype), up.contiguous().to(dtype), torch.tensor(float(rank), dtype=dtype), error


def _save(state: dict, dst: Path, fmt: str) -> None:
    from safetensors.torch import save_file

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    from safetensors import SafetensorError

    from modal_services.net.transfer.errors import is_disk_full, storage_full

    try:
        save_file(state, str(dst), metadata={"format": "pt", "converted_from": fmt, "converted_by": "ai-toolbox"})
    except OSError as exc:
        dst.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise storage_full(dst.name) from None
        raise
    except SafetensorError as exc:
        # safetensors reports its write errors in its own type, with the OS's words in the text.
        dst.unlink(missing_ok=True)
        if "No space left" in str(exc) or "os error 28" in str(exc) or "Disk quota" in str(exc):
            raise storage_full(dst.name) from None
        raise


# ---------------------------------------------------------------- Flux LoRAs
#
# Flux LoRAs come as diffusers / PEFT (`transformer.….lora_A.weight`), Kohya
# sd-scripts (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, CLIP-L
# as `lora_te1_`), ComfyUI (`diffusion_model.` prefixes) or XLabs
# (`double_blocks.0.processor.qkv_lora1.down.weight`). diffusers' own
# `FluxPipeline.lora_state_dict` converts all of them (or says it cannot); the
# converted layers are then checked against FLUX.1's transformer and CLIP-L,
# built from their configs on the meta device. Nothing is rewritten: diffusers
# loads each of these layouts as it is.

FAMILIES = ("sdxl", "flux")
# FLUX.1-dev's transformer (black-forest-labs/FLUX.1-dev transformer/config.json).
FLUX_TRANSFORMER_CONFIG = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
# Keys only Flux LoRAs have, in one of their layouts.
FLUX_KEY_MARKERS = ("double_blocks", "single_blocks", "single_transformer_blocks", "transformer.transformer_blocks",
                    "lora_transformer_")


class FluxLayout:
    """The Linear layers of a Flux transformer and its CLIP-L text encoder, from configs, on the meta device."""

    def __init__(self, transformer_config: dict, text_encoder_config: dict):
        self._configs = (dict(transformer_config), dict(text_encoder_config))

    @classmethod
    @functools.cache
    def flux1_dev(cls) -> "FluxLayout":
        return cls(FLUX_TRANSFORMER_CONFIG, SDXL_TEXT_ENCODER_CONFIG)

    @classmethod
    def of_pipeline(cls, pipe) -> "FluxLayout":
        return cls(dict(pipe.transformer.config), pipe.text_encoder.config.to_dict())

    @functools.cached_property
    def layers(self) -> dict[str, dict[str, tuple[int, ...]]]:
        import torch
        from diffusers import FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel

        transformer_config, text_config = self._configs
        with torch.device("meta"):
            transformer = FluxTransformer2DModel.from_config(transformer_config)
            text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        return {
            name: {path: tuple(module.weight.shape) for path, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear)}
            for name, model in (("transformer", transformer), ("text_encoder", text_encoder))
        }


def lora_family(path: Path) -> str:
    """"flux" when the file's layer names are a Flux LoRA's, else "sdxl" (read from the header only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise _fail(f"{Path(path).name} is not a readable .safetensors file ({type(exc).__name__}).") from None
    return "flux" if is_flux_layout(keys) else "sdxl"


def is_flux_layout(keys) -> bool:
    return any(marker in key for key in keys for marker in FLUX_KEY_MARKERS)


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
        raise _incompatible(
            f"This is not a Flux LoRA: its layers ({sample}…) are those of an SDXL or SD LoRA. Use it with SDXL."
        )
    fmt = flux_format(state)
    notes = ["DoRA magnitudes are dropped by diffusers"] if any(DORA in key for key in state) else []
    try:
        # The converters pop what they consume: give them a copy.
        converted = FluxPipeline.lora_state_dict(dict(state))
    except (ValueError, KeyError, IndexError, AssertionError, RuntimeError) as exc:
        raise _fail(f"diffusers cannot read this file as a Flux LoRA ({type(exc).__name__}: {str(exc)[:200]}).") from None
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
            raise _incompatible(f"The LoRA changes {key}, which Flux does not have: it is not a Flux LoRA.")
    if not pairs:
        raise _fail("The file holds no LoRA layers.")
    counts: dict[str, int] = {}
    ranks = set()
    for (component, path), shapes in pairs.items():
        target = layout.layers.get(component, {}).get(path)
        if target is None:
            raise _incompatible(f"The LoRA changes {component}.{path}, which Flux does not have: it is not a Flux LoRA.")
        down, up = shapes.get("down"), shapes.get("up")
        if down is None or up is None:
            raise _fail(f"The LoRA layer for {component}.{path} is incomplete (one of its two matrices is missing).")
        if up[0] != target[0] or down[1] != target[1] or up[1] != down[0]:
            raise _incompatible(
                f"The LoRA's shapes for {component}.{path} ({up[0]}x{down[1]}) do not fit this Flux model's "
                f"({target[0]}x{target[1]}): it was made for another base model."
            )
        ranks.add(down[0])
        counts[component] = counts.get(component, 0) + 1
    return counts, max(ranks)
