"""One typed request per job kind: its fields, defaults, limits and messages, defined once (the numbers
and names in `modal_services.jobs.limits`, which the CLI's help reads without pydantic).

Every front end (the cogs, the CLI, the API, the `/settings` defaults) builds
one of these before a job exists, and the worker parses the payload again with
the same model before it loads anything. Discord option ranges are read from
the fields (`validation.field_bounds`), so they cannot drift from what the
worker accepts.

A new job kind follows the same pattern: a `JobRequest` subclass with a
`kind`, its fields typed with the reusable types below (`Prompt`, `Seed`,
`LoraRef`...) or new `Annotated` types carrying their limits and a `title`,
the label its messages use. A new text-to-image model family subclasses
`TextToImageRequest` and adds its size limits and its own knobs.
"""

from __future__ import annotations

import random
import unicodedata
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, ConfigDict, Field, ValidationError, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.encoder_text import readings, with_trigger_words
from modal_services.jobs.limits import (
    ASPECT_BUCKETS, CAPTION_STYLES, CFG, CONTROLNET_STRENGTH, CREATIVITY, DEFAULT_CAPTION_STYLE, DEFAULT_TIMEOUT_SECONDS,
    FLUX_MAX_PIXELS, FLUX_SIDE, GENERATION_STEPS, GUIDANCE, IDENTITY_STRENGTH, IMAGE_COUNT,
    LORA_WEIGHT, MAX_CAPTION_IMAGES, MAX_SEED, MAX_TIMEOUT_SECONDS, SCALE, SDXL_SIDE, SIDE_MULTIPLE,
)
from modal_services.jobs.samplers import sampler_named, unknown_sampler
from modal_services.jobs.validation import Checked, invalid_input
from modal_services.safety.prompt_screen import asks_for_sexual_content, screen_prompt
from modal_services.safety.real_people import REAL_PERSON_REFUSAL

# ------------------------------------------------------------------ reusable field types

# Line breaks and tabs are how people lay out a long prompt; every other control character (NUL, escape
# sequences, C1 codes) is no part of a prompt, and would reach logs, terminals and the text encoders.
ALLOWED_CONTROL_CHARACTERS = "\t\n\r"


def typed_text(text: str) -> str:
    """`text`, refused (the `control_character` error, told in the field's words) when it holds a control
    character other than a line break or a tab."""
    for position, character in enumerate(text):
        if unicodedata.category(character) == "Cc" and character not in ALLOWED_CONTROL_CHARACTERS:
            raise PydanticCustomError("control_character", "contains the control character {code} at position "
                                      "{position}", {"code": f"U+{ord(character):04X}", "position": position})
    return text


TypedText = AfterValidator(typed_text)
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, title="The seed")]
Prompt = Annotated[str, Field(max_length=1000, title="The prompt"), TypedText]
LoraWeight = Annotated[float, Field(ge=LORA_WEIGHT.low, le=LORA_WEIGHT.high, allow_inf_nan=False, title="A LoRA weight")]
Scale = Annotated[float, Field(ge=SCALE.low, le=SCALE.high, allow_inf_nan=False, title="Scale")]
Creativity = Annotated[float, Field(ge=CREATIVITY.low, le=CREATIVITY.high, allow_inf_nan=False, title="Creativity")]
Steps = Annotated[int, Field(ge=1, le=60, title="Steps")]


def known_sampler(text: str) -> str:
    """The sampler table's own name for `text`; any other is refused with every name there is."""
    name = sampler_named(text)
    if name is None:
        raise ValueError(unknown_sampler(text))
    return name


# An SDXL job's sampler (`modal_services.jobs.samplers`); None: the scheduler the checkpoint's config names.
SamplerName = Annotated[str, AfterValidator(known_sampler), Field(title="The sampler")]
IpAdapterScale = Annotated[float, Field(ge=0.0, le=1.5, allow_inf_nan=False, title="The IP-Adapter scale")]

CaptionStyle = Annotated[Literal[tuple(CAPTION_STYLES)], Field(title="The caption style")]
Question = Annotated[str, Field(min_length=1, max_length=500, title="The question"), TypedText]

Aspect = Annotated[Literal[tuple(ASPECT_BUCKETS)], Field(title="The aspect")]
GenerationPrompt = Annotated[str, Field(min_length=1, max_length=1000, title="The prompt"), TypedText]
Side = Annotated[int, Field(ge=SDXL_SIDE.low, le=SDXL_SIDE.high, multiple_of=SIDE_MULTIPLE)]
GenerationSteps = Annotated[int, Field(ge=GENERATION_STEPS.low, le=GENERATION_STEPS.high, title="Steps")]
Cfg = Annotated[float, Field(ge=CFG.low, le=CFG.high, allow_inf_nan=False, title="CFG")]
ImageCount = Annotated[int, Field(ge=IMAGE_COUNT.low, le=IMAGE_COUNT.high, title="The image count")]
Timeout = Annotated[float, Field(gt=0, le=MAX_TIMEOUT_SECONDS, allow_inf_nan=False, title="The timeout")]
Strength = Annotated[float, Field(ge=0.05, le=1.0, allow_inf_nan=False, title="The variation strength")]
FluxSide = Annotated[int, Field(ge=FLUX_SIDE.low, le=FLUX_SIDE.high, multiple_of=SIDE_MULTIPLE)]
Guidance = Annotated[float, Field(ge=GUIDANCE.low, le=GUIDANCE.high, allow_inf_nan=False, title="The guidance")]
# The front ends shrink a face or pose photo to this before it is sent: face analysis needs no more.
REFERENCE_MAX_SIDE = 1536
IdentityStrength = Annotated[float, Field(ge=IDENTITY_STRENGTH.low, le=IDENTITY_STRENGTH.high, allow_inf_nan=False,
                                          title="The identity strength")]
ControlnetStrength = Annotated[float, Field(ge=CONTROLNET_STRENGTH.low, le=CONTROLNET_STRENGTH.high,
                                            allow_inf_nan=False, title="The ControlNet strength")]

LibraryType = Annotated[Literal["lora", "checkpoint"], Field(title="The model type")]
CIVITAI_API_BASE = "https://civitai.com"


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


class JobRequest(Checked):
    """What a job of `kind` needs; the payload a worker receives is `to_payload()`."""

    model_config = ConfigDict(title="A job")
    kind: ClassVar[str]

    def to_payload(self) -> dict[str, Any]:
        return self.model_dump()


class LoraRef(Checked):
    """A LoRA as a member names it: its library name and, optionally, a weight."""

    model_config = ConfigDict(title="A LoRA")
    name: Annotated[str, Field(min_length=1, max_length=200, title="name")]
    weight: LoraWeight | None = None


class ResolvedLora(LoraRef):
    """A LoRA the library resolved: its file on the LoRA volume (or a path), weight and trigger words."""

    file: str | None = None
    path: str | None = None
    trigger_words: list[str] = []

    @model_validator(mode="after")
    def _located(self) -> "ResolvedLora":
        if not self.file and not self.path:
            raise ValueError(f"LoRA {self.name!r} needs a file or a path.")
        return self

    @model_serializer(mode="wrap")
    def _only_its_location(self, serialize) -> dict[str, Any]:
        """The one of `file` and `path` it has, not the other as None."""
        return {name: value for name, value in serialize(self).items() if value is not None or name not in ("file", "path")}


# LoRAs one job applies, whatever its kind and front end (Discord offers this many slots).
MAX_LORAS_PER_JOB = 3
# The limit and the words of a job's LoRA list, for the lists of names the front ends take too.
LORAS_PER_JOB = Field(max_length=MAX_LORAS_PER_JOB, title="LoRAs per job")
LorasPerJob = Annotated[list[ResolvedLora], LORAS_PER_JOB]


class RegionPrompt(Checked):
    """Words for the tiles whose centre lies in `box` (left, top, right, bottom, in input pixels)."""

    model_config = ConfigDict(title="A region prompt")
    box: Annotated[list[int], Field(min_length=4, max_length=4, title="box")]
    prompt: Annotated[str, Field(max_length=400, title="A region prompt"), TypedText]


# ------------------------------------------------------------------ content safety

SafetyPolicy = Annotated[Literal["block", "spoiler", "off"], Field(title="The safety policy")]
# The classifier's NSFW probability from which an image counts as flagged.
NsfwThreshold = Annotated[float, Field(ge=0.05, le=0.99, allow_inf_nan=False, title="The NSFW threshold")]
DEFAULT_NSFW_THRESHOLD = 0.7
REFUSED_WORD_MAX_CHARS = 100
RefusedWord = Annotated[str, Field(min_length=1, max_length=REFUSED_WORD_MAX_CHARS, title="A refused word")]
RefusedWords = Annotated[list[RefusedWord], Field(max_length=200, title="refused words")]


class SafetyContext(Checked):
    """What the worker needs to judge a job's images, from where they will be shown: the server's
    policy for flagged images, whether the destination is age-restricted, the threshold, the
    server's refused words (the worker screens the prompt again), and whether the job starts from
    a photo of a real person (`modal_services.safety.real_people`)."""

    model_config = ConfigDict(title="A safety context")
    policy: SafetyPolicy = "block"
    age_restricted: bool = False
    threshold: NsfwThreshold = DEFAULT_NSFW_THRESHOLD
    refused_words: RefusedWords = []
    # A face photo, or a source image someone uploaded: not one of the bot's own earlier results.
    # The front end that received the image sets it; a face photo sets it whoever built the request.
    real_photo: bool = False

    @property
    def classifies(self) -> bool:
        """Whether the images are classified: always for a real person's photo; otherwise not with the
        policy off, nor for an age-restricted channel."""
        return self.real_photo or (self.policy != "off" and not self.age_restricted)


class SafetyChecked(JobRequest):
    """A job kind whose prompts are screened whenever its request is built (in the front end, and again in
    the worker) and whose images the worker judges by `safety` before they leave it."""

    # The worker's runner acts on it around the engine, which never reads it.
    safety: SafetyContext = Field(default_factory=SafetyContext)

    def screened_prompts(self) -> tuple[list[str], list[str]]:
        """(what the job asks for, what its negative prompt steers away from), exactly as the text
        encoders will read them: trigger words joined as the engine joins them, region prompts included."""
        raise NotImplementedError

    @model_validator(mode="after")
    def _screened(self) -> "SafetyChecked":
        """Refused (INVALID_PROMPT, a ToolboxError pydantic passes through as it is) when the text the
        encoders will read breaks the built-in rule or the server's words, read as written and without
        weighting syntax; or when it is sexual and the job starts from a real person's photo."""
        positive, negative = (readings(texts) for texts in self.screened_prompts())
        screen_prompt(positive, negative, self.safety.refused_words)
        if self.safety.real_photo and asks_for_sexual_content(", ".join(positive), ", ".join(negative)):
            raise ToolboxError(ErrorCode.INVALID_PROMPT, REAL_PERSON_REFUSAL)
        return self


# ------------------------------------------------------------------ the job kinds


class CaptionRequest(JobRequest):
    model_config = ConfigDict(title="A caption job")
    kind: ClassVar[str] = "caption"
    images: Annotated[list[bytes], Field(min_length=1, max_length=MAX_CAPTION_IMAGES, title="images")]
    style: CaptionStyle = DEFAULT_CAPTION_STYLE
    question: Question | None = None


def distinct_loras(request: JobRequest) -> JobRequest:
    """`request`, unless it lists one LoRA twice."""
    names = [lora.name for lora in request.loras]
    if len(set(names)) != len(names):
        raise ValueError("The same LoRA is listed twice.")
    return request


class UpscaleRequest(SafetyChecked):
    model_config = ConfigDict(title="An upscale job")
    kind: ClassVar[str] = "upscale"
    image: Annotated[bytes, Field(title="image")]
    scale: Scale = SCALE.default
    prompt: Prompt = ""
    negative: Prompt = Field("", title="The negative prompt")
    loras: LorasPerJob = []
    creativity: Creativity = CREATIVITY.default
    # Picked here when a request leaves it out, so the result can say which seed it used.
    seed: Seed = Field(default_factory=random_seed)
    # A library file name (or the base checkpoint's key); None: the base checkpoint.
    checkpoint: str | None = None
    steps: Steps = 30
    sampler: SamplerName | None = None
    # Off by default: at the default creativity ControlNet Tile already holds the
    # content, and a whole-image reference pulls the whole composition into each
    # tile as creativity rises. Jobs can turn it up.
    ip_adapter_scale: IpAdapterScale = 0.0
    region_prompts: Annotated[list[RegionPrompt], Field(max_length=64, title="region prompts")] = []

    @model_validator(mode="after")
    def _distinct_loras(self) -> "UpscaleRequest":
        return distinct_loras(self)

    def encoder_prompt(self) -> str:
        """The prompt every tile's text starts with: the prompt after the LoRAs' trigger words."""
        return with_trigger_words(self.prompt.strip(), self.loras)

    def screened_prompts(self) -> tuple[list[str], list[str]]:
        # Each tile reads the prompt and its region's words: all of them together cover every tile.
        return [self.encoder_prompt(), *(region.prompt for region in self.region_prompts)], [self.negative.strip()]

    def with_region_prompts(self, regions: list[dict[str, Any]]) -> "UpscaleRequest":
        """This request with words for the tiles of each region ({box, prompt}), checked and screened as its own."""
        return self.parse({**self.to_payload(), "region_prompts": regions})


# The one message of a pose without a face, in the request and on every front end.
POSE_NEEDS_A_FACE = "A pose image is used only with a face photo: add the face to keep."


class TextToImageRequest(SafetyChecked):
    """What every text-to-image family's request has: a prompt, `count` images from `seed` on, LoRAs,
    a timeout, and with `image`, variations of that image (img2img at `strength`).

    A family subclasses it with its `kind`, its sizes (`width` and `height`, with the family's limits)
    and its own knobs; `parse`, the LoRA check and prompt screening come with the base.
    """

    model_config = ConfigDict(str_strip_whitespace=True)
    # Problems with these fields are INVALID_PROMPT, the rest INVALID_INPUT.
    prompt_fields: ClassVar[tuple[str, ...]] = ("prompt", "negative_prompt")
    # Width × height at most, beyond each side's own range; None: the sides' ranges are the only limit.
    max_pixels: ClassVar[int | None] = None
    prompt: GenerationPrompt
    negative_prompt: Prompt = Field("", title="The negative prompt")
    steps: GenerationSteps = GENERATION_STEPS.default
    # Image n of the request gets seed + n - 1; picked here when left out, and reported with the result.
    seed: Seed = Field(default_factory=random_seed)
    count: ImageCount = IMAGE_COUNT.default
    loras: LorasPerJob = []
    # Seconds from the job's start; the bot and the CLI give the most.
    timeout: Timeout = DEFAULT_TIMEOUT_SECONDS
    # A variation's start image (encoded bytes), resized to width x height.
    image: bytes | None = None
    strength: Strength = 0.35

    @model_validator(mode="after")
    def _distinct_loras(self) -> "TextToImageRequest":
        return distinct_loras(self)

    def encoder_prompt(self) -> str:
        """The prompt as the encoders read it: after the LoRAs' trigger words."""
        return with_trigger_words(self.prompt, self.loras)

    def screened_prompts(self) -> tuple[list[str], list[str]]:
        return [self.encoder_prompt()], [self.negative_prompt]

    @classmethod
    def parse(cls, payload: dict[str, Any]) -> "TextToImageRequest":
        """The request `payload` describes; INVALID_PROMPT for a problem with its prompts, INVALID_INPUT otherwise."""
        try:
            return cls.model_validate(payload)
        except ValidationError as error:
            problem = invalid_input(error, cls)
            location = error.errors(include_url=False)[0]["loc"]
            if location and location[0] in cls.prompt_fields:
                problem = ToolboxError(ErrorCode.INVALID_PROMPT, problem.message)
            raise problem from None


class GenerateRequest(TextToImageRequest):
    """SDXL text-to-image on a library checkpoint; with `face_image`, InstantID keeps that person's face."""

    model_config = ConfigDict(title="A generate job")
    kind: ClassVar[str] = "generate"
    width: Side = Field(SDXL_SIDE.default, title="The width")
    height: Side = Field(SDXL_SIDE.default, title="The height")
    cfg: Cfg = CFG.default
    sampler: SamplerName | None = None
    # A library file name (or the base checkpoint's key); None: the base checkpoint.
    checkpoint: str | None = None
    # A LoRA of the request's own: an https link (presigned or not) to a .safetensors file, at
    # `lora_scale`; with its sha256, a repeat uses the copy this worker already has.
    lora_url: Annotated[str, Field(min_length=8, max_length=4000, title="The LoRA URL")] | None = None
    lora_scale: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False, title="The LoRA scale")] = 1.0
    lora_sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$", title="The LoRA sha256")] | None = None
    # InstantID: the person in `face_image` (encoded bytes; its largest face) in every image, posed
    # as the largest face in `pose_image` when given; the face adapter's and IdentityNet's weights.
    face_image: bytes | None = None
    pose_image: bytes | None = None
    identity_strength: IdentityStrength = IDENTITY_STRENGTH.default
    controlnet_strength: ControlnetStrength = CONTROLNET_STRENGTH.default

    @model_validator(mode="before")
    @classmethod
    def _a_face_is_a_real_person(cls, data: Any) -> Any:
        """A face photo shows a real, identifiable person, whoever built the request: its safety says so."""
        if isinstance(data, dict) and data.get("face_image") is not None:
            safety = data.get("safety") or {}
            safety = safety.model_dump() if isinstance(safety, SafetyContext) else safety
            # A safety that is not a mapping is left for the field's own check to refuse.
            if isinstance(safety, dict):
                data = {**data, "safety": {**safety, "real_photo": True}}
        return data

    @model_validator(mode="after")
    def _pose_needs_a_face(self) -> "GenerateRequest":
        if self.pose_image is not None and self.face_image is None:
            raise ValueError(POSE_NEEDS_A_FACE)
        return self


class FluxGenerateRequest(TextToImageRequest):
    """FLUX.1-dev text-to-image.

    Flux is guidance-distilled: one pass per step steered by `guidance`, and no
    negative prompt (one given is refused rather than silently ignored).
    """

    model_config = ConfigDict(title="A Flux generate job")
    kind: ClassVar[str] = "flux_generate"
    prompt_fields: ClassVar[tuple[str, ...]] = ("prompt",)
    max_pixels: ClassVar[int | None] = FLUX_MAX_PIXELS
    width: FluxSide = Field(FLUX_SIDE.default, title="The width")
    height: FluxSide = Field(FLUX_SIDE.default, title="The height")
    guidance: Guidance = GUIDANCE.default

    @model_validator(mode="after")
    def _checked(self) -> "FluxGenerateRequest":
        if self.negative_prompt:
            raise ValueError("Flux has no negative prompt: leave it out and describe what you want instead.")
        if self.width * self.height > self.max_pixels:
            raise ValueError(
                f"{self.width}×{self.height} is more than Flux's {self.max_pixels / 1e6:.1f} megapixels: choose a smaller size."
            )
        return self

    def screened_prompts(self) -> tuple[list[str], list[str]]:
        return [self.encoder_prompt()], []


class DownloadRequest(JobRequest):
    """Base models to download (all missing ones when empty)."""

    model_config = ConfigDict(title="A download job")
    kind: ClassVar[str] = "download"
    keys: list[str] = []


class VerifyRequest(DownloadRequest):
    """Base models whose files to re-check (all when empty)."""

    model_config = ConfigDict(title="A verify job")
    kind: ClassVar[str] = "verify"


class ModelImportRequest(JobRequest):
    model_config = ConfigDict(title="An import")
    kind: ClassVar[str] = "model_import"
    ref: Annotated[str, Field(min_length=1, max_length=500, title="The CivitAI reference")]
    api_base: str = CIVITAI_API_BASE
    # The server whose admins add it (they may then edit and delete it); None: shared, the operators'.
    guild_id: int | None = None


class ModelUploadRequest(JobRequest):
    model_config = ConfigDict(title="An upload")
    kind: ClassVar[str] = "model_upload"
    url: str
    filename: Annotated[str, Field(min_length=1, max_length=255, title="The file name")]
    type: LibraryType
    size_bytes: Annotated[int, Field(ge=1, title="The file size")] | None = None
    name: Annotated[str, Field(min_length=1, max_length=100, title="The display name")] | None = None
    trigger_words: Annotated[str, Field(max_length=1000, title="The trigger words")] | None = None
    api_base: str = CIVITAI_API_BASE
    # As in ModelImportRequest.
    guild_id: int | None = None


class ModelDeleteRequest(JobRequest):
    model_config = ConfigDict(title="A delete")
    kind: ClassVar[str] = "model_delete"
    name: Annotated[str, Field(min_length=1, title="The model")]


class ModelScanRequest(JobRequest):
    model_config = ConfigDict(title="A scan")
    kind: ClassVar[str] = "model_scan"
    adopt: bool = False
    api_base: str = CIVITAI_API_BASE
