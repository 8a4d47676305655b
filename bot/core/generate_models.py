"""The text-to-image models the front ends offer (SDXL, FLUX.1-dev): one row each, and their names.

A new text-to-image family is one more `TextToImageModel` in `GENERATE_MODELS`
(and its aliases in `bot.core.model_names`): its request class says which choices it
takes (a face photo, a LoRA link), and the builder's rules follow from that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bot.core.model_names import DEFAULT_MODEL, MODEL_ALIASES
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.limits import ASPECT_BUCKETS, FLUX_ASPECT_BUCKETS
from modal_services.jobs.requests import FluxGenerateRequest, GenerateRequest, TextToImageRequest


@dataclass(frozen=True, eq=False)
class TextToImageModel:
    """One text-to-image model: what it is called, its request, and what its requests may use."""

    # What people pick and settings keep ("sdxl", "flux").
    key: str
    # What messages call it ("SDXL", "Flux").
    name: str
    # What a list of models shows ("FLUX.1-dev").
    title: str
    request: type[TextToImageRequest]
    # The size buckets it makes, by aspect.
    aspects: dict[str, tuple[int, int]]
    # The request field a person's "cfg" (how closely to follow the prompt) sets, and what results call it.
    cfg_field: str
    cfg_label: str
    # The family of library LoRAs it takes (`LibraryEntry.family`).
    lora_family: str
    # Optional models an admin enables (and downloads) before it runs.
    optional_models: tuple[str, ...] = ()
    # The weights shown with its results; None: the library's active checkpoint, sent with the request.
    checkpoint: dict[str, Any] | None = None

    @property
    def takes_faces(self) -> bool:
        """Whether it keeps a face from a photo (InstantID)."""
        return "face_image" in self.request.model_fields

    @property
    def takes_sampler(self) -> bool:
        """Whether a request may choose its sampler."""
        return "sampler" in self.request.model_fields

    @property
    def takes_lora_url(self) -> bool:
        """Whether a request may bring a LoRA of its own, by link."""
        return "lora_url" in self.request.model_fields


SDXL = TextToImageModel(
    key=DEFAULT_MODEL, name="SDXL", title="SDXL (the server's checkpoint)", request=GenerateRequest,
    aspects=ASPECT_BUCKETS, cfg_field="cfg", cfg_label="CFG", lora_family="sdxl",
)
FLUX = TextToImageModel(
    key="flux", name="Flux", title="FLUX.1-dev", request=FluxGenerateRequest,
    aspects=FLUX_ASPECT_BUCKETS, cfg_field="guidance", cfg_label="guidance", lora_family="flux", optional_models=("flux1-dev",),
    checkpoint={"key": "flux1-dev", "name": "FLUX.1-dev", "file": None},
)
GENERATE_MODELS = {model.key: model for model in (SDXL, FLUX)}
# How messages name a LoRA family.
FAMILY_NAMES = {model.lora_family: model.name for model in GENERATE_MODELS.values()}


def generate_model(name: str | None) -> TextToImageModel:
    """The model a person, a terminal or an API client called `name` (None: SDXL); INVALID_INPUT if none is."""
    key = MODEL_ALIASES.get((name or SDXL.key).strip().lower())
    if key is None:
        # Worded as a request's field names its choices, so an API body's `model` reads the same.
        names = [repr(alias) for alias in MODEL_ALIASES]
        raise ToolboxError(ErrorCode.INVALID_INPUT,
                           f"The model must be one of {', '.join(names[:-1])} or {names[-1]} (got {name!r}).")
    return GENERATE_MODELS[key]


def model_of_kind(kind: str) -> TextToImageModel:
    """The model whose jobs are of `kind` (a job record's kind)."""
    return next(model for model in GENERATE_MODELS.values() if model.request.kind == kind)


def aspect_sizes() -> dict[str, tuple[tuple[int, int], list[TextToImageModel]]]:
    """Every aspect some model makes: its size and the models that make it, in the models' order."""
    sizes: dict[str, tuple[tuple[int, int], list[TextToImageModel]]] = {}
    for model in GENERATE_MODELS.values():
        for aspect, size in model.aspects.items():
            sizes.setdefault(aspect, (size, []))[1].append(model)
    return sizes


def names_of(models: list[TextToImageModel]) -> str:
    """`SDXL`, `SDXL or Flux`: the models that can do something, as a message names them."""
    return " or ".join(model.name for model in models)
