"""What the HTTP API accepts and returns, as pydantic models (FastAPI publishes them in /openapi.json).

`GenerateImageRequest` is the SDXL worker contract's request body, field for
field (`prompt`, `negative_prompt`, `lora_url`, `lora_scale`, `width`,
`height`, `steps`, `cfg`, `seed`, `timeout`), plus what the bot also offers:
`count` images in one call, library LoRAs by name, and InstantID's
`reference_image_base64` (a face to keep), `pose_image_base64`,
`identity_strength` and `controlnet_strength`; and `remix`, a CivitAI image
whose published settings fill what the body leaves out. A request that
breaks a limit is refused with 400 before any job exists.

`POST /jobs` takes a `JobBody`: one of the `*Job` models, told apart by `kind`.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal

from annotated_types import MultipleOf
from pydantic import (AfterValidator, Base64Bytes, BaseModel, ConfigDict, Field, HttpUrl, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from bot.core.generate_models import GENERATE_MODELS, MODEL_ALIASES, SDXL, TextToImageModel
from modal_services.jobs.requests import (
    CaptionRequest,
    CaptionStyle,
    Creativity,
    GenerateRequest,
    GenerationPrompt,
    GenerationSteps,
    ImageCount,
    LORAS_PER_JOB,
    LoraRef,
    Prompt,
    Question,
    SamplerName,
    Scale,
    Seed,
    Timeout,
    UpscaleRequest,
)
from modal_services.jobs.limits import MAX_REMIX_REFERENCE_CHARS
from modal_services.jobs.samplers import SAMPLER_NAMES
from modal_services.jobs.validation import constraint_bounds, field_bounds
from modal_services.net.egress import plain_http_allowed

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
    """https, or plain http to a host the deployment allows (TOOLBOX_ALLOWED_HOSTS: storage on its LAN)."""
    if url.scheme != "https" and not plain_http_allowed(str(url)):
        raise ValueError("lora_url must be an https URL (plain http only to a host in TOOLBOX_ALLOWED_HOSTS)")
    return url


RemixReference = Annotated[str, Field(min_length=1, max_length=MAX_REMIX_REFERENCE_CHARS)]
# What a generate body without a prompt or a remix has as its prompt while it is validated.
PROMPT_NOT_GIVEN = object()
ImageBase64 = Annotated[Base64Bytes, AfterValidator(_within_image_limit)]
LoraUrl = Annotated[HttpUrl, AfterValidator(_https_only),
                    Field(description="a .safetensors LoRA to apply to this request only (a presigned URL works)")]


def _default(request: type[BaseModel], name: str):
    return request.model_fields[name].default


def _titled_default(request: type[BaseModel], name: str):
    """A request field's default and its own title (a message's words: "The negative prompt", not the type's
    "The prompt")."""
    return Field(_default(request, name), title=request.model_fields[name].title)


def _field_type(request: type[BaseModel], name: str):
    """A request field's type with its limits, for a wire field that mirrors it."""
    field = request.model_fields[name]
    return Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation


LoraScale = _field_type(GenerateRequest, "lora_scale")
LoraSha256 = _field_type(GenerateRequest, "lora_sha256")
IdentityStrength = _field_type(GenerateRequest, "identity_strength")
ControlnetStrength = _field_type(GenerateRequest, "controlnet_strength")


# ------------------------------------------------------------------ what differs by model

# The request field a generate body's field sets, for each model: `cfg` is Flux's `guidance`.
ModelField = Callable[[TextToImageModel], str]


def _model_limits(model: TextToImageModel, name: str) -> str:
    """One model's range and default for a request field, in words: `SDXL: 512-1536 in steps of 64 (1024)`."""
    field = model.request.model_fields[name]
    low, high = constraint_bounds(field)
    step = next((rule.multiple_of for rule in field.metadata if isinstance(rule, MultipleOf)), None)
    steps = f" in steps of {step}" if step else ""
    whole = f" and at most {model.request.max_pixels / 1e6:.1f} MP (width × height)" if name in ("width", "height") and \
        model.request.max_pixels else ""
    return f"{model.name} (`{model.key}`): {low:g}-{high:g}{steps}{whole}, {field.default:g} when omitted"


def _each_model(field_of: ModelField, what: str) -> str:
    """A body field's description: what it is, then each model's own limits (checked when the request is built)."""
    return f"{what}. " + "; ".join(_model_limits(model, field_of(model)) for model in GENERATE_MODELS.values())


def _any_model(field_of: ModelField) -> Any:
    """A body field's type: every value some model takes (the lowest minimum to the highest maximum); the
    model's own range is checked when the request is built, with its message."""
    fields = [model.request.model_fields[field_of(model)] for model in GENERATE_MODELS.values()]
    lows, highs = zip(*(constraint_bounds(field) for field in fields))
    steps = {rule.multiple_of for field in fields for rule in field.metadata if isinstance(rule, MultipleOf)}
    number = fields[0].annotation
    limits = {"ge": min(lows), "le": max(highs), **({"allow_inf_nan": False} if number is float else {}),
              **({"multiple_of": steps.pop()} if len(steps) == 1 else {})}
    return Annotated[number, Field(**limits)]


def _sampler_field(default: str) -> Any:
    return Field(None, title="The sampler", description=f"SDXL's sampler, as A1111 names it: {', '.join(SAMPLER_NAMES)} "
                 f"(any case; A1111's k_ names too); {default} when omitted")


def _same(name: str) -> ModelField:
    return lambda model: name


def _cfg(model: TextToImageModel) -> str:
    return model.cfg_field


Side = _any_model(_same("width"))
AnyCfg = _any_model(_cfg)


class Strict(BaseModel):
    # A misspelt field is an error, not a silently ignored default.
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data: Any) -> Any:
        """A field sent as null is a field not sent: its default applies (the contract's clients send
        `"negative_prompt": null` for "none"); a required one is then named as missing."""
        if isinstance(data, dict):
            return {name: value for name, value in data.items() if value is not None}
        return data


class GenerateImageRequest(Strict):
    """The SDXL worker contract's request: GenerateRequest's fields, limits and defaults, with library
    `loras` by name."""

    # Messages name the job as the request classes do ("A generate job needs a prompt.").
    model_config = ConfigDict(title=GenerateRequest.model_config["title"])
    remix: RemixReference | None = Field(
        None, description="A CivitAI image (https://civitai.com/images/<id>, or its id): its published prompt, "
        "negative prompt, size, steps, CFG, seed, checkpoint and LoRAs (the library's matches) are used for every "
        "field this body does not give; what differs from the original is listed in the result's `notes`")
    prompt: GenerationPrompt | None = Field(None, description="required without `remix`")
    model: Literal[tuple(MODEL_ALIASES)] = Field(
        SDXL.key, title="The model", description="`flux-dev` (also `flux`, `flux1-dev`): FLUX.1-dev, if the bot's "
        "admin enabled it: no negative_prompt, no lora_url, library Flux LoRAs only. width, height and cfg give each "
        "model's limits")
    negative_prompt: Prompt = _titled_default(GenerateRequest, "negative_prompt")
    width: Side = Field(_default(GenerateRequest, "width"), title="The width",
                        description=_each_model(_same("width"), "Pixels"))
    height: Side = Field(_default(GenerateRequest, "height"), title="The height",
                         description=_each_model(_same("height"), "Pixels"))
    steps: GenerationSteps = _default(GenerateRequest, "steps")
    cfg: AnyCfg | None = Field(None, title="CFG", description=_each_model(
        _cfg, "How closely to follow the prompt: SDXL's CFG, Flux's guidance; the model's default when omitted"))
    sampler: SamplerName | None = _sampler_field("the checkpoint's (its library entry's, else the base checkpoint's)")
    seed: Seed | None = Field(None, description="random when omitted; always reported in metadata.seed_used")
    count: ImageCount = Field(_default(GenerateRequest, "count"),
                              description="images in one batched call, seeds seed, seed+1, ...")
    loras: Annotated[list[LoraRef], LORAS_PER_JOB] = Field(default_factory=list)
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


    @model_validator(mode="before")
    @classmethod
    def _prompt_unless_remix(cls, data: Any) -> Any:
        """A body with neither a prompt nor a remix: its prompt marked as not given, for `_given` to name."""
        if isinstance(data, dict) and data.get("prompt") is None and data.get("remix") is None:
            return {**data, "prompt": PROMPT_NOT_GIVEN}
        return data

    @field_validator("prompt", mode="before")
    @classmethod
    def _given(cls, prompt: Any) -> Any:
        """A prompt is required, unless a remix gives one: named as any missing field is."""
        if prompt is PROMPT_NOT_GIVEN:
            raise PydanticCustomError("missing", "Field required")
        return prompt


class GenerateJob(GenerateImageRequest):
    kind: Literal["generate"]


class CaptionJob(Strict):
    """A caption job: its fields, limits and defaults are CaptionRequest's, the images base64."""

    model_config = ConfigDict(title=CaptionRequest.model_config["title"])

    kind: Literal["caption"]
    images_base64: list[ImageBase64] = Field(min_length=1, max_length=field_bounds(CaptionRequest, "images")[1])
    style: CaptionStyle = _default(CaptionRequest, "style")
    question: Question | None = None


class UpscaleJob(Strict):
    """An upscale job: UpscaleRequest's fields, limits and defaults, the image base64 and LoRAs by library name."""

    model_config = ConfigDict(title=UpscaleRequest.model_config["title"])

    kind: Literal["upscale"]
    image_base64: ImageBase64
    scale: Scale = _default(UpscaleRequest, "scale")
    prompt: Prompt = _default(UpscaleRequest, "prompt")
    negative: Prompt = _titled_default(UpscaleRequest, "negative")
    loras: Annotated[list[LoraRef], LORAS_PER_JOB] = Field(default_factory=list)
    creativity: Creativity = _default(UpscaleRequest, "creativity")
    sampler: SamplerName | None = _sampler_field("the checkpoint config's scheduler (Euler)")
    seed: Seed | None = Field(None, description="random when omitted")
    tile_captions: bool = Field(False, description="tag each tile the upscaler will denoise (a caption job, run first: "
                                                   "POST /jobs answers once it is done) and add its tags to that tile's "
                                                   "prompt: slower, more fitting detail")
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
    seed_used: int = Field(description="image_base64's seed")
    actual_steps: int
    actual_cfg: float
    sampler: str | None = Field(None, description="SDXL: the sampler the images were made with, as A1111 names it; absent for Flux")
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
    image_base64: str = Field(description="the first image the safety check kept (when it kept none, the answer is "
                                          "422 CONTENT_WITHHELD instead)")
    images_base64: list[str | None] | None = Field(None, description="every image, when count > 1 (null where withheld)")
    image_size: tuple[int, int]
    generation_time_seconds: float
    model_info: ModelInfo
    metadata: GenerationMetadata
    nsfw_score: float | None = Field(None, description="image_base64's NSFW score (null when not checked)")
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
