"""The one settings object every reader fills, whatever tool made the image.

Every value comes from a file someone else made: strings lose their control
characters (newlines and tabs stay in prompts) and are cut to a bound, numbers
that are not finite or not numbers read as absent. What a reader cannot place
in a field is kept in `other`, as written, to be shown and never used.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Bounds on what is kept from an image: far above any real prompt, far below what could hurt.
MAX_PROMPT_CHARS = 20_000
MAX_VALUE_CHARS = 300
MAX_OTHER_FIELDS = 40
MAX_LORAS = 20
# Longer digit strings are not numbers anyone generated with (and Python refuses to parse huge ones).
MAX_NUMBER_CHARS = 40


def clean_text(value: Any, limit: int = MAX_VALUE_CHARS, keep_lines: bool = False) -> str:
    """`value` as text without control characters (newlines and tabs kept with `keep_lines`), at most `limit`."""
    text = str(value) if value is not None else ""
    allowed = "\n\t" if keep_lines else ""
    text = "".join(ch if ch in allowed or unicodedata.category(ch)[0] != "C" else " " for ch in text[: limit * 2])
    return text.strip()[:limit]


def as_int(value: Any) -> int | None:
    """An integer from a number or its text ("28", "28.0"), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    number = as_float(value)
    return int(number) if number is not None and number.is_integer() else None


def as_float(value: Any) -> float | None:
    """A finite number from a number or its text, else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = str(value).strip()
        if not text or len(text) > MAX_NUMBER_CHARS:
            return None
        try:
            number = float(text)
        except ValueError:
            return None
    return number if math.isfinite(number) else None


def as_id(value: Any) -> int | None:
    """A CivitAI id (a positive integer JavaScript can hold), else None."""
    number = as_int(value)
    return number if number is not None and 0 < number < 2**53 else None


@dataclass
class LoraUse:
    """A LoRA an image names: its name there, weight, hash (AutoV2, A1111's own, or a full sha256) and
    CivitAI model version id (where CivitAI published one)."""

    name: str
    weight: float | None = None
    hash: str | None = None
    version_id: int | None = None

    def __post_init__(self) -> None:
        self.name = clean_text(self.name, 200)
        self.weight = as_float(self.weight)
        self.hash = clean_text(self.hash, 80).lower() or None
        self.version_id = as_id(self.version_id)


@dataclass
class GenerationSettings:
    """How an image says it was made. `source` names the format read ("A1111/Forge", "ComfyUI"...);
    `sampler` is A1111's name with its schedule type joined ("DPM++ 2M Karras")."""

    source: str
    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = None
    sampler: str | None = None
    cfg: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    model: str | None = None
    model_hash: str | None = None
    # The checkpoint's CivitAI model version id, where CivitAI published one.
    model_version_id: int | None = None
    loras: list[LoraUse] = field(default_factory=list)
    denoising_strength: float | None = None
    other: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.source = clean_text(self.source, 40)
        self.prompt = clean_text(self.prompt, MAX_PROMPT_CHARS, keep_lines=True)
        self.negative_prompt = clean_text(self.negative_prompt, MAX_PROMPT_CHARS, keep_lines=True)
        self.steps, self.seed = as_int(self.steps), as_int(self.seed)
        self.width, self.height = as_int(self.width), as_int(self.height)
        self.cfg, self.denoising_strength = as_float(self.cfg), as_float(self.denoising_strength)
        self.sampler = clean_text(self.sampler) or None
        self.model = clean_text(self.model) or None
        self.model_hash = clean_text(self.model_hash, 80).lower() or None
        self.model_version_id = as_id(self.model_version_id)
        self.loras = [lora if isinstance(lora, LoraUse) else LoraUse(**lora) for lora in self.loras[:MAX_LORAS]]
        self.other = {clean_text(key, 80): clean_text(value) for key, value in list(self.other.items())[:MAX_OTHER_FIELDS]}

    @property
    def empty(self) -> bool:
        """Whether it says nothing at all (no prompt, no setting)."""
        return not (self.prompt or self.negative_prompt or self.loras or any(
            getattr(self, name) is not None for name in ("steps", "sampler", "cfg", "seed", "width", "model")))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationSettings":
        known = {item.name for item in fields(cls)}
        return cls(**{name: value for name, value in data.items() if name in known})
