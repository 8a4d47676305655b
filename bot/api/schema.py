"""What the HTTP API accepts and returns, as pydantic models (FastAPI publishes them in /openapi.json).

`GenerateImageRequest` is the SDXL worker contract's request body, field for
field (`prompt`, `negative_prompt`, `lora_url`, `lora_scale`, `width`,
`height`, `steps`, `cfg`, `seed`, `timeout`), plus what the bot also offers:
`count` images in one call, library LoRAs by name, and InstantID's
`reference_image_base64` (a face to keep), `pose_image_base64`,
`identity_strength` and `controlnet_strength`. A request that breaks a
limit is refused with 400 before any job exists.

`POST /jobs` takes a `JobBody`: one of the `*Job` models, told apart by `kind`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Base64Bytes, BaseModel, ConfigDict, Field, HttpUrl

from bot.core.generate_models import MODEL_ALIASES, SDXL
from modal_services.jobs.requests import (
    CaptionRequest,
    CaptionStyle,
    Cfg,
    Creativity,
    GenerateRequest,
    GenerationPrompt,
    GenerationSteps,
    ImageCount,
    LoraRef,
    Prompt,
    Question,
    Scale,
    Seed,
    FluxSide,
    Timeout,
    UpscaleRequest,
)
from modal_services.jobs.validation import field_bounds

# The contract's version, published in /health and /openapi.json.
API_VERSION = "1"
# One decoded image in a request (base64 makes it a third larger on the wire).
MAX_IMAGE_BYTES = 20 * 2**20
# A whole request body: one image at the limit in base64, plus the other fields.
MAX_BODY_BYTES = MAX_IMAGE_BYTES * 4 // 3 + 2**20


def _within_image_limit(data: bytes) -> bytes:
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"an image may be at most {MAX_IMAGE_BYTES // 2**20} MB (got {len(data) / 2**20:.1f} MB)")
    return data


def _https_only(url: HttpUrl) -> HttpUrl:
    if url.scheme != "https":
        raise ValueError("lora_url must be an https URL")
    return url


ImageBase64 = Annotated[Base64Bytes, AfterValidator(_within_image_limit)]
LoraUrl = Annotated[HttpUrl, AfterValidator(_https_only),
                    Field(description="a .safetensors LoRA to apply to this request only (a presigned URL works)")]


def _default(request: type[BaseModel], name: str):
    return request.model_fields[name].default


def _field_type(request: type[BaseModel], name: str):
    """A request field's type with its limits, for a wire field that mirrors it."""
    field = request.model_fields[name]
    return Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation


LoraScale = _field_type(GenerateRequest, "lora_scale")
LoraSha256 = _field_type(GenerateRequest, "lora_sha256")
IdentityStrength = _field_type(GenerateRequest, "identity_strength")
ControlnetStrength = _field_type(GenerateRequest, "controlnet_strength")


class Strict(BaseModel):
    # A misspelt field is an error, not a silently ignored default.
    model_config = ConfigDict(extra="forbid")


class GenerateImageRequest(Strict):
    """The SDXL worker contract's request: GenerateRequest's fields, limits and defaults, with library
    `loras` by name."""

    prompt: GenerationPrompt
    model: Literal[tuple(MODEL_ALIASES)] = Field(
        SDXL.key, title="The model", description="flux-dev: FLUX.1-dev (if the bot's admin enabled it): guidance `cfg` 1-10 (3.5 when "
        "omitted), no negative prompt, sizes up to about 2 MP (2048 a side), library Flux LoRAs only")
    negative_prompt: Prompt = _default(GenerateRequest, "negative_prompt")
    width: FluxSide = Field(_default(GenerateRequest, "width"), description="SDXL: 512-1536; Flux: up to 2048")
    height: FluxSide = Field(_default(GenerateRequest, "height"), description="SDXL: 512-1536; Flux: up to 2048")
    steps: GenerationSteps = _default(GenerateRequest, "steps")
    cfg: Cfg = _default(GenerateRequest, "cfg")
    seed: Seed | None = Field(None, description="random when omitted; always reported in metadata.seed_used")
    count: ImageCount = Field(_default(GenerateRequest, "count"),
                              description="images in one batched call, seeds seed, seed+1, ...")
    loras: list[LoraRef] = Field(default_factory=list, max_length=field_bounds(GenerateRequest, "loras")[1])
    lora_url: LoraUrl | None = None
    lora_scale: LoraScale = _default(GenerateRequest, "lora_scale")
    lora_sha256: LoraSha256 = Field(None, description="lets a repeat skip the download")
    timeout: Timeout = Field(_default(GenerateRequest, "timeout"), description="seconds")
    safety_check: bool = Field(True, description="classify the images and withhold those flagged NSFW; "
                                                 "false returns them unchecked")
    reference_image_base64: ImageBase64 | None = Field(
        None, description="InstantID: a photo of a person whose face every image keeps (its largest face)")
    pose_image_base64: ImageBase64 | None = Field(
        None, description="with a reference image: a photo whose largest face sets the pose (default: the reference's)")
    identity_strength: IdentityStrength = Field(_default(GenerateRequest, "identity_strength"),
                                                description="how strongly the face is kept")
    controlnet_strength: ControlnetStrength = Field(_default(GenerateRequest, "controlnet_strength"),
                                                    description="how closely the pose is followed")


class GenerateJob(GenerateImageRequest):
    kind: Literal["generate"]


class CaptionJob(Strict):
    """A caption job: its fields, limits and defaults are CaptionRequest's, the images base64."""

    kind: Literal["caption"]
    images_base64: list[ImageBase64] = Field(min_length=1, max_length=field_bounds(CaptionRequest, "images")[1])
    style: CaptionStyle = _default(CaptionRequest, "style")
    question: Question | None = None


class UpscaleJob(Strict):
    """An upscale job: UpscaleRequest's fields, limits and defaults, the image base64 and LoRAs by library name."""

    kind: Literal["upscale"]
    image_base64: ImageBase64
    scale: Scale = _default(UpscaleRequest, "scale")
    prompt: Prompt = _default(UpscaleRequest, "prompt")
    negative: Prompt = _default(UpscaleRequest, "negative")
    loras: list[LoraRef] = Field(default_factory=list, max_length=field_bounds(UpscaleRequest, "loras")[1])
    creativity: Creativity = _default(UpscaleRequest, "creativity")
    seed: Seed | None = Field(None, description="random when omitted")
    safety_check: bool = Field(True, description="classify the result and withhold it if flagged NSFW")


JobBody = Annotated[GenerateJob | CaptionJob | UpscaleJob, Field(discriminator="kind")]
# Each kind of POST /jobs body, by its tag.
JOB_BODIES: dict[str, type[Strict]] = {"generate": GenerateJob, "caption": CaptionJob, "upscale": UpscaleJob}


class ModelInfo(BaseModel):
    base_model: str
    lora_applied: bool
    lora_scale: float | None
    loras: list[dict] = Field(default_factory=list, description="every LoRA applied: name and weight")


class GenerationMetadata(BaseModel):
    seed_used: int
    actual_steps: int
    actual_cfg: float
    seeds_used: list[int] = Field(description="one per image")


class SafetyInfo(BaseModel):
    checked: bool = Field(description="false when the request said safety_check: false")
    nsfw_scores: list[float | None] = Field(description="one per image, 0..1; null when not checked")
    withheld: list[int] = Field(description="0-based positions of the images withheld (null in the response)")
    threshold: float
    note: str


class FaceInfo(BaseModel):
    faces_found: int = Field(description="faces in the reference photo (the largest was used)")
    pose_faces_found: int | None = Field(None, description="faces in the pose photo, when one was given")
    identity_strength: float
    controlnet_strength: float


class GenerateImageResponse(BaseModel):
    image_base64: str | None = Field(description="null when the first image was withheld")
    images_base64: list[str | None] | None = Field(None, description="every image, when count > 1 (null where withheld)")
    image_size: tuple[int, int]
    generation_time_seconds: float
    model_info: ModelInfo
    metadata: GenerationMetadata
    nsfw_score: float | None = Field(None, description="the first image's NSFW score (null when not checked)")
    safety: SafetyInfo
    face: FaceInfo | None = Field(None, description="with a reference image: what was read from it")
    notes: list[str] = Field([], description="how the model read the prompt, when it is worth saying "
                                             "(Flux: weights removed, where a long prompt was cut)")


class ErrorResponse(BaseModel):
    error: str
    error_code: str
    details: str | None = None
    retry_after: int | None = None


class JobAccepted(BaseModel):
    job_id: str


class JobView(BaseModel):
    job_id: str
    kind: str
    status: Literal["queued", "running", "done", "error", "cancelled"]
    progress: float
    stage: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: ErrorResponse | None = None
    result: dict | None = Field(None, description="when done: the kind's result (for generate, /generate-image's body)")
