"""What the HTTP API accepts and returns, as pydantic models (FastAPI publishes them in /openapi.json).

`GenerateImageRequest` is the SDXL worker contract's request body, field for
field (`prompt`, `negative_prompt`, `lora_url`, `lora_scale`, `width`,
`height`, `steps`, `cfg`, `seed`, `timeout`), plus what the bot also offers:
`count` images in one call and library LoRAs by name. A request that breaks a
limit is refused with 400 before any job exists.

`POST /jobs` takes one of the `*Job` models, told apart by `kind`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Base64Bytes, BaseModel, ConfigDict, Field, HttpUrl

# One decoded image in a request (base64 makes it a third larger on the wire).
MAX_IMAGE_BYTES = 20 * 2**20
# A whole request body: one image at the limit in base64, plus the other fields.
MAX_BODY_BYTES = MAX_IMAGE_BYTES * 4 // 3 + 2**20

MAX_PROMPT_CHARS = 1000
# Each image of a request gets the next seed: the whole range must stay a valid seed.
MAX_SEED = 2**63 - 1 - 4
MAX_LORAS = 3
MAX_CAPTION_IMAGES = 16
DEFAULT_TIMEOUT_SECONDS = 60
MAX_TIMEOUT_SECONDS = 300
CAPTION_STYLES = ("descriptive", "tags", "short")


def _within_image_limit(data: bytes) -> bytes:
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"an image may be at most {MAX_IMAGE_BYTES // 2**20} MB (got {len(data) / 2**20:.1f} MB)")
    return data


def _https_only(url: HttpUrl) -> HttpUrl:
    if url.scheme != "https":
        raise ValueError("lora_url must be an https URL")
    return url


ImageBase64 = Annotated[Base64Bytes, AfterValidator(_within_image_limit)]
Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
NegativePrompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class Strict(BaseModel):
    # A misspelt field is an error, not a silently ignored default.
    model_config = ConfigDict(extra="forbid")


class LoraRef(Strict):
    """A LoRA from the library, by name; its recommended weight unless `weight` is given."""

    name: str = Field(min_length=1, max_length=200)
    weight: float | None = Field(None, ge=-2.0, le=2.0)


class GenerateImageRequest(Strict):
    prompt: Prompt
    negative_prompt: NegativePrompt = ""
    width: int = Field(1024, ge=512, le=1536, multiple_of=64)
    height: int = Field(1024, ge=512, le=1536, multiple_of=64)
    steps: int = Field(28, ge=20, le=50)
    cfg: float = Field(5.5, ge=1.0, le=20.0)
    seed: Seed | None = Field(None, description="random when omitted; always reported in metadata.seed_used")
    count: int = Field(1, ge=1, le=4, description="images in one batched call, seeds seed, seed+1, ...")
    loras: list[LoraRef] = Field(default_factory=list, max_length=MAX_LORAS)
    lora_url: Annotated[HttpUrl, AfterValidator(_https_only)] | None = Field(
        None, description="a .safetensors LoRA to apply to this request only (a presigned URL works)"
    )
    lora_scale: float = Field(1.0, ge=0.0, le=1.0)
    lora_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description="lets a repeat skip the download")
    timeout: float = Field(DEFAULT_TIMEOUT_SECONDS, gt=0, le=MAX_TIMEOUT_SECONDS, description="seconds")


class GenerateJob(GenerateImageRequest):
    kind: Literal["generate"]


class CaptionJob(Strict):
    kind: Literal["caption"]
    images_base64: list[ImageBase64] = Field(min_length=1, max_length=MAX_CAPTION_IMAGES)
    style: Literal[CAPTION_STYLES] = "descriptive"
    question: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)] | None = None


class UpscaleJob(Strict):
    kind: Literal["upscale"]
    image_base64: ImageBase64
    scale: float = Field(2.0, ge=1.0, le=4.0)
    prompt: NegativePrompt = ""
    negative: NegativePrompt = ""
    loras: list[LoraRef] = Field(default_factory=list, max_length=MAX_LORAS)
    creativity: float = Field(0.35, ge=0.05, le=1.0)
    seed: Seed | None = None


JobRequest = Annotated[GenerateJob | CaptionJob | UpscaleJob, Field(discriminator="kind")]
JOB_KINDS = ("generate", "caption", "upscale")


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


class GenerateImageResponse(BaseModel):
    image_base64: str
    images_base64: list[str] | None = Field(None, description="every image, when count > 1")
    image_size: tuple[int, int]
    generation_time_seconds: float
    model_info: ModelInfo
    metadata: GenerationMetadata


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
