"""The numbers and names the job requests accept, as plain constants: ranges, defaults, sizes, styles.

The request models (`modal_services.jobs.requests`) build their fields from
these, and the `toolbox` help shows them, so both say the same thing. This
module imports nothing heavy (no pydantic): `toolbox --help` reads it and
returns at once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bounds:
    """A numeric option's inclusive range and its default (None where the default is computed)."""

    low: float
    high: float
    default: float | None = None

    def describe(self) -> str:
        """The range and default as help texts show them: `1.5-4 (default 2)`, `-2 to 2`."""
        joiner = " to " if self.low < 0 else "-"
        default = "" if self.default is None else f" (default {_number(self.default)})"
        return f"{_number(self.low)}{joiner}{_number(self.high)}{default}"


def _number(value: float) -> str:
    """`2`, `1.5`, `4294967295`: whole numbers in full, the others as short as they go."""
    return str(int(value)) if value == int(value) else f"{value:g}"


MAX_SEED = 2**32 - 1
SEED = Bounds(0, MAX_SEED)
LORA_WEIGHT = Bounds(-2.0, 2.0)

# Upscales.
SCALE = Bounds(1.5, 4.0, 2.0)
CREATIVITY = Bounds(0.05, 1.0, 0.35)

# Text-to-image (SDXL's sides and CFG, Flux's sides and guidance).
GENERATION_STEPS = Bounds(20, 50, 28)
IMAGE_COUNT = Bounds(1, 4, 1)
SIDE_MULTIPLE = 64
SDXL_SIDE = Bounds(512, 1536, 1024)
FLUX_SIDE = Bounds(512, 2048, 1024)
CFG = Bounds(1.0, 20.0, 5.5)
GUIDANCE = Bounds(1.0, 10.0, 3.5)
IDENTITY_STRENGTH = Bounds(0.0, 1.5, 0.8)
CONTROLNET_STRENGTH = Bounds(0.0, 1.5, 0.8)
# Seconds from a job's start: more than 0, at most this. Requests that name none get the default;
# the bot and the CLI give the most.
MAX_TIMEOUT_SECONDS = 300.0
DEFAULT_TIMEOUT_SECONDS = 60.0
# A CivitAI image to remix, as pasted: a link with its query fits in far fewer characters.
MAX_REMIX_REFERENCE_CHARS = 300

# SDXL's training buckets (width, height), about one megapixel each: the sizes it composes best at.
ASPECT_BUCKETS = {
    "1:1": (1024, 1024),
    "4:5": (896, 1152),
    "5:4": (1152, 896),
    "2:3": (832, 1216),
    "3:2": (1216, 832),
    "9:16": (768, 1344),
    "16:9": (1344, 768),
    "9:21": (640, 1536),
    "21:9": (1536, 640),
}
# FLUX.1-dev's sizes: SDXL's buckets at about one megapixel, and larger ones up to about two.
FLUX_ASPECT_BUCKETS = {
    **ASPECT_BUCKETS,
    "1:1 2MP": (1408, 1408),
    "16:9 2MP": (1920, 1088),
    "9:16 2MP": (1088, 1920),
}
FLUX_MAX_PIXELS = 1920 * 1088

# Captions: each style and what it gives (shown as the Discord choice), and the images one job takes.
CAPTION_STYLES = {
    "descriptive": "a detailed paragraph",
    "tags": "booru tags with their rating (the WD tagger), as LoRA trainers use them",
    "short": "one sentence, good alt text",
    "prompt": "a generation prompt in booru tags (Illustrious)",
}
DEFAULT_CAPTION_STYLE = "descriptive"
MAX_CAPTION_IMAGES = 64
