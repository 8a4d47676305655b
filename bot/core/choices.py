"""What a person asked for, in words that belong to no one front end: the input of `bot.core.build`.

The Discord cogs, the CLI and the HTTP API each fill one of these from their
own options. `None` (or an empty tuple) means "not given": the request's own
default applies, so a front end with defaults of its own (a server's settings)
fills those in first. Nothing is checked here: `build_generate_request` and
`build_upscale_request` check every value and every rule between them, and
say what is wrong in one message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modal_services.jobs.requests import SafetyContext


@dataclass(frozen=True)
class LoraChoice:
    """A library LoRA by a name a person gave (its display name or its file), at `weight`
    (None: the library's recommended weight). `LoraChoice(**{"name": ..., "weight": ...})` takes the
    `{name, weight}` dicts the front ends keep."""

    name: str
    weight: float | None = None


@dataclass(frozen=True, kw_only=True)
class GenerateChoices:
    """A text-to-image request as asked for; see `bot.core.generate_models` for the models."""

    prompt: str
    # A model's key or alias ("sdxl", "flux", "flux-dev"...); None: SDXL.
    model: str | None = None
    negative: str | None = None
    # A size bucket ("16:9", "1:1 2MP"); used only when `width` and `height` are not given.
    aspect: str | None = None
    width: int | None = None
    height: int | None = None
    count: int | None = None
    steps: int | None = None
    # How closely to follow the prompt: SDXL's CFG, Flux's guidance.
    cfg: float | None = None
    # A sampler's name (`modal_services.jobs.samplers`, SDXL); None: the checkpoint's.
    sampler: str | None = None
    # The first image's seed (image n gets seed + n - 1); None: one is drawn, and reported.
    seed: int | None = None
    loras: tuple[LoraChoice, ...] = ()
    # A library checkpoint by name or file (SDXL: what a remixed image was made with); None: the active one.
    checkpoint: str | None = None
    # A LoRA of this request's own, by https link (SDXL), at `lora_scale`; its sha256 lets a repeat skip the download.
    lora_url: str | None = None
    lora_scale: float | None = None
    lora_sha256: str | None = None
    # Variations: the start image (encoded bytes) and how far they may stray from it.
    variation_image: bytes | None = None
    variation_strength: float | None = None
    # InstantID (SDXL): a face photo every image keeps, a photo whose face sets the pose, and their weights.
    # The front ends shrink both photos to `REFERENCE_MAX_SIDE` first.
    face_image: bytes | None = None
    pose_image: bytes | None = None
    identity_strength: float | None = None
    controlnet_strength: float | None = None
    # Seconds the job may run.
    timeout: float | None = None
    # How the images are judged for where they will be shown; None: as for a channel that is not age-restricted.
    safety: SafetyContext | None = None


@dataclass(frozen=True, kw_only=True)
class UpscaleChoices:
    """An upscale as asked for: the image (encoded, as the front ends re-encode it) and how to upscale it."""

    image: bytes
    scale: float | None = None
    # Words for what the image shows, to guide new detail, and what to avoid.
    prompt: str | None = None
    negative: str | None = None
    loras: tuple[LoraChoice, ...] = ()
    # How much may change: low keeps the image, high repaints it.
    creativity: float | None = None
    seed: int | None = None
    steps: int | None = None
    # None: the scheduler of the checkpoint's config, which the upscaler is tuned on.
    sampler: str | None = None
    ip_adapter_scale: float | None = None
    # Words for the tiles whose centre lies in a box: {"box": [left, top, right, bottom], "prompt": ...}.
    region_prompts: tuple[dict[str, Any], ...] = ()
    safety: SafetyContext | None = None
