"""The text-to-image request: every field's range and message, defined once.

The bot derives its /generate option ranges from these fields, the CLI and
the engine validate with `parse_generate_request`, so the three refuse the
same requests with the same words. Plain pydantic (no torch): the bot
imports it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from modal_services.errors import ErrorCode, ToolboxError

MAX_PROMPT_CHARS = 1000
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 512, 1536, 64
MIN_STEPS, MAX_STEPS, DEFAULT_STEPS = 20, 50, 28
MIN_CFG, MAX_CFG, DEFAULT_CFG = 1.0, 20.0, 5.5
MAX_COUNT = 4
MAX_LORAS = 3
DEFAULT_TIMEOUT, MAX_TIMEOUT = 60.0, 300.0
# Each image of a request gets the next seed: the whole range must stay a valid seed.
MAX_SEED = 2**63 - 1 - MAX_COUNT
DEFAULT_STRENGTH = 0.35

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

# The words people see for a field, in messages.
LABELS = {
    "prompt": "The prompt",
    "negative_prompt": "The negative prompt",
    "width": "The width",
    "height": "The height",
    "steps": "Steps",
    "cfg": "CFG",
    "seed": "The seed",
    "count": "The image count",
    "loras": "LoRAs",
    "timeout": "The timeout",
    "strength": "The variation strength",
}


class GenerateRequest(BaseModel):
    """One text-to-image job; with `image`, a variation of it (img2img at `strength`)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    width: int = Field(1024, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE)
    height: int = Field(1024, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE)
    steps: int = Field(DEFAULT_STEPS, ge=MIN_STEPS, le=MAX_STEPS)
    cfg: float = Field(DEFAULT_CFG, ge=MIN_CFG, le=MAX_CFG)
    # None: a random one, reported with the result.
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    count: int = Field(1, ge=1, le=MAX_COUNT)
    # Library LoRAs as the bot resolved them: {name, file | path, weight, trigger_words}.
    loras: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_LORAS)
    # A library checkpoint file name; None for the default.
    checkpoint: str | None = None
    timeout: float = Field(DEFAULT_TIMEOUT, gt=0, le=MAX_TIMEOUT)
    image: bytes | None = None
    strength: float = Field(DEFAULT_STRENGTH, ge=0.05, le=1.0)

    @field_validator("seed", "count", "width", "height", "steps", mode="before")
    @classmethod
    def _whole_numbers_only(cls, value: Any) -> Any:
        # pydantic takes True for 1 and 2.0 for 2; a request that says so is a mistake.
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("must be a whole number")
        return value


def parse_generate_request(fields: dict[str, Any]) -> GenerateRequest:
    """The request, or INVALID_PROMPT / INVALID_INPUT naming the first field at fault."""
    try:
        return GenerateRequest.model_validate(fields)
    except ValidationError as exc:
        problem = exc.errors(include_url=False, include_input=False)[0]
        field = str(problem["loc"][0]) if problem["loc"] else ""
        code = ErrorCode.INVALID_PROMPT if field in ("prompt", "negative_prompt") else ErrorCode.INVALID_INPUT
        label = LABELS.get(field, field or "The request")
        message = problem["msg"].replace("Value error, ", "")
        for subject in ("Input should", "String should", "List should"):
            message = message.replace(subject, "should")
        if problem["type"] == "missing":
            message = "is missing"
        elif field == "prompt" and problem["type"] == "string_too_short":
            message = "is empty"
        elif problem["type"] == "extra_forbidden":
            label, message = f"{field!r}", "is not a field of a generate request"
        raise ToolboxError(code, f"{label} {message}.") from None


def bounds(field: str) -> tuple[Any, Any]:
    """(lowest, highest) value a numeric field allows: what front ends offer as their own ranges."""
    low = high = None
    for rule in GenerateRequest.model_fields[field].metadata:
        low = getattr(rule, "ge", low)
        high = getattr(rule, "le", high)
    return low, high
