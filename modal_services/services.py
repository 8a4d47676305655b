"""The job table: for each request class, the Modal class serving it and the engine method doing it.

`SERVICES` is the one table from a job's request class to where and how it
runs. The Modal classes and the local backend both run a job through
`run_service_job`, so they behave the same. Engine modules are imported only
when a worker runs a job (the bot never loads the ML stack): each engine
class has one loader below, and each row names its engine method on that
class (`lambda: _sdxl().generate`), so "go to definition" from a row reaches
the engine method and "find usages" of an engine method leads back here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Protocol

from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.requests import (
    CaptionRequest,
    DownloadRequest,
    FluxGenerateRequest,
    GenerateRequest,
    JobRequest,
    ModelDeleteRequest,
    ModelImportRequest,
    ModelScanRequest,
    ModelUploadRequest,
    SafetyContext,
    UpscaleRequest,
    VerifyRequest,
)
from modal_services.jobs.records import ProgressFn, run_job
from modal_services.layout import Layout
from modal_services.safety.judge import GENERATED_IMAGES, UPSCALED_IMAGE, ResultImages, judge, obscured
from modal_services.state.store import StateStore

if TYPE_CHECKING:
    from modal_services.base_models.downloads import DownloadEngine
    from modal_services.engines.caption import CaptionEngine
    from modal_services.engines.flux import FluxEngine
    from modal_services.engines.sdxl.engine import SdxlEngine
    from modal_services.library.imports import ModelEngine
    from modal_services.safety.nsfw_classifier import NsfwClassifier
    from modal_services.safety.tagger import Tagger


class Engine(Protocol):
    loaded: bool

    def load(self) -> None: ...


# () -> an engine class, imported when called.
EngineClass = Callable[[], type[Engine]]
# (engine class, layout) -> the engine a worker runs that class's jobs on.
EngineFactory = Callable[[EngineClass, Layout], Engine]


def build_engine(engine_class: EngineClass, layout: Layout) -> Engine:
    """The real engine of `engine_class` on `layout`: the local backend's engine factory unless told otherwise."""
    return engine_class()(layout)


# What the real engines run on: the `engines` extra. A base install (`pip install -e .`) has none of them.
ENGINE_LIBRARIES = ("numpy", "torch", "transformers", "diffusers", "peft", "accelerate", "safetensors", "onnxruntime")
NO_ENGINES_MESSAGE = ("the local backend has no engines: pip install -e '.[engines]' (or set TOOLBOX_BACKEND=modal "
                      "to use a Modal deployment)")


def missing_engine_libraries() -> list[str]:
    """The engine libraries this Python cannot import, found without importing any of them."""
    return [name for name in ENGINE_LIBRARIES if importlib.util.find_spec(name) is None]


# ------------------------------------------------------------------ one loader per engine class


def _caption() -> type[CaptionEngine]:
    from modal_services.engines.caption import CaptionEngine

    return CaptionEngine


def _downloads() -> type[DownloadEngine]:
    from modal_services.base_models.downloads import DownloadEngine

    return DownloadEngine


def _models() -> type[ModelEngine]:
    from modal_services.library.imports import ModelEngine

    return ModelEngine


def _sdxl() -> type[SdxlEngine]:
    from modal_services.engines.sdxl.engine import SdxlEngine

    return SdxlEngine


def _flux() -> type[FluxEngine]:
    from modal_services.engines.flux import FluxEngine

    return FluxEngine


@dataclass(frozen=True)
class ServiceSpec:
    request: type[JobRequest]
    modal_class: str
    engine: EngineClass
    # () -> the engine method doing the work, named on the engine class: `lambda: _sdxl().generate`. It takes
    # (request, progress) and, for a kind with previews, `preview=`.
    method: Callable[[], Callable[..., Any]]
    # The engine method takes `preview=`: small JPEGs of the work so far, kept under `preview:<job>`.
    previews: bool = False
    # Where the result holds its images, for kinds whose images the worker judges (prompt screened, images
    # classified, withheld ones dropped) before anything leaves it; the request is then a `SafetyChecked`.
    judged_images: ResultImages | None = None
    # Its engine method runs models or reads weights (torch and the rest of `ENGINE_LIBRARIES`); the
    # downloads and the library's bookkeeping run on the base install.
    needs_engine_libraries: bool = True

    @property
    def kind(self) -> str:
        return self.request.kind

    @property
    def method_name(self) -> str:
        """The engine method's name, which the Modal class's method for this kind has too (Modal spawns by
        name). Read off `method`'s code (`lambda: _sdxl().generate` names `generate` last), so that the bot,
        which never imports an engine, knows it."""
        return self.method.__code__.co_names[-1]


SERVICES: dict[type[JobRequest], ServiceSpec] = {
    spec.request: spec
    for spec in (
        ServiceSpec(CaptionRequest, "CaptionService", _caption, lambda: _caption().caption),
        ServiceSpec(DownloadRequest, "DownloadService", _downloads, lambda: _downloads().download,
                    needs_engine_libraries=False),
        ServiceSpec(VerifyRequest, "DownloadService", _downloads, lambda: _downloads().verify,
                    needs_engine_libraries=False),
        # One GPU class and one engine for every SDXL job: they share the loaded models.
        ServiceSpec(UpscaleRequest, "SdxlService", _sdxl, lambda: _sdxl().upscale, previews=True,
                    judged_images=UPSCALED_IMAGE),
        ServiceSpec(GenerateRequest, "SdxlService", _sdxl, lambda: _sdxl().generate, previews=True,
                    judged_images=GENERATED_IMAGES),
        # FLUX.1-dev on a GPU class of its own: its weights do not fit beside SDXL's. Its results have
        # the generate result's shape, so they are judged alike.
        ServiceSpec(FluxGenerateRequest, "FluxService", _flux, lambda: _flux().generate, previews=True,
                    judged_images=GENERATED_IMAGES),
        # The model library's file work (/models): CivitAI imports, uploads, deletes, scans.
        ServiceSpec(ModelImportRequest, "ModelService", _models, lambda: _models().import_model),
        ServiceSpec(ModelUploadRequest, "ModelService", _models, lambda: _models().upload_model),
        ServiceSpec(ModelDeleteRequest, "ModelService", _models, lambda: _models().delete_model,
                    needs_engine_libraries=False),
        ServiceSpec(ModelScanRequest, "ModelService", _models, lambda: _models().scan_library,
                    needs_engine_libraries=False),
    )
}


def service_for(request: JobRequest) -> ServiceSpec:
    """The row of the job table that runs `request`."""
    return SERVICES[type(request)]


def service_of_kind(kind: str) -> ServiceSpec | None:
    """The row of the job table for a job record's `kind` (None for a kind no row has)."""
    return next((spec for spec in SERVICES.values() if spec.kind == kind), None)


def run_on_engine(
    engine: Engine, spec: ServiceSpec, payload: dict[str, Any], progress: ProgressFn,
    classifier: "NsfwClassifier | None" = None, tagger: "Tagger | None" = None, **extras: Any,
) -> Any:
    """Blocking: parse the request (the one check in the worker, before any model loads; a judged kind's
    prompts are screened then), check that every model the job needs is installed (all the missing ones
    named in one MODELS_MISSING, which fails the job, not the worker), load the engine if needed, then
    run; a judged kind's images are then tagged (always) and classified (as the context asks) in one
    batch each, and the withheld ones dropped."""
    request = spec.request.parse(payload)
    context = request.safety if spec.judged_images is not None else None
    require_models(spec, engine, request, classifier, tagger)
    if context is not None:
        _load_safety_models(spec, context, classifier, tagger, progress)
    if not engine.loaded:
        progress(0.0, "loading model")
        engine.load()
    # The engine's own method of that name: the real engine's is `spec.method()`, a stand-in's its own.
    result = getattr(engine, spec.method_name)(request, progress, **extras)
    if context is None:
        return result
    progress(1.0, "safety check")
    images, report = judge(spec.judged_images.take(result), context, classifier and classifier.scores, tagger.tag)
    return spec.judged_images.give(result, images, report.to_dict())


def require_models(spec: ServiceSpec, engine: Engine, request: JobRequest, classifier: "NsfwClassifier | None",
                   tagger: "Tagger | None") -> None:
    """MODELS_MISSING naming everything the job needs and the volume lacks (the engine's models for this
    request, the tagger, the classifier where it classifies), before anything loads. Blocking (it looks at
    the files)."""
    context = request.safety if spec.judged_images is not None else None
    # Engines without models of their own (downloads, the library's file work) have no `missing_models`.
    missing = list(getattr(engine, "missing_models", lambda _: [])(request))
    if context is not None:
        judges = [("wd-tagger", tagger)] + ([("nsfw-classifier", classifier)] if context.classifies else [])
        for key, model in judges:
            absent = [] if model is None or model.loaded else model.missing_files()
            if absent:
                missing.append(f"{key} ({', '.join(absent)})")
    if missing:
        raise ToolboxError(ErrorCode.MODELS_MISSING, f"Not installed yet: {'; '.join(missing)}.{_download_hint(missing)}")


def _download_hint(missing: list[str]) -> str:
    """The download to run for the missing models named "<registry key> (<files>)"; one whose entry already
    says its own way out (an optional model to enable) is not repeated."""
    keys = [entry.split(" ", 1)[0].rstrip(",") for entry in missing if not remedies.has_mark(entry)]
    return f" To install them, {remedies.download(*keys)}." if keys else ""


def _load_safety_models(spec: ServiceSpec, context: SafetyContext, classifier: "NsfwClassifier | None",
                        tagger: "Tagger | None", progress: ProgressFn) -> None:
    """The models that judge this job's images, loaded before any GPU work so that a missing one fails the
    job first: the tagger always (its drawn-minor rule never turns off), the classifier where it classifies."""
    needed = [tagger] + ([classifier] if context.classifies else [])
    if any(model is None for model in needed):
        raise ValueError(f"{spec.kind} jobs are judged: run them with the worker's tagger and NSFW classifier")
    if not all(model.loaded for model in needed):
        progress(0.0, "loading the safety classifier")
        for model in needed:
            model.load()


async def run_service_job(
    store: StateStore, engine: Engine, spec: ServiceSpec, job_id: str, payload: dict[str, Any], executor=None,
    classifier: "NsfwClassifier | None" = None, tagger: "Tagger | None" = None,
) -> Any:
    """One job, as every Modal class and the local backend run it: `run_job` over
    `run_on_engine`, with a preview sink for the engines that make previews (a judged kind's blurred, whatever
    its safety context: the drawn-minor rule reads only the finished images), and a judged kind's safety report
    kept in the job record."""
    extras: dict[str, Any] = {}
    if spec.previews:
        from modal_services.engines.sdxl.previews import PreviewSink

        sink = PreviewSink(store, job_id)
        extras["preview"] = obscured(sink) if spec.judged_images is not None else sink
    try:
        work = partial(run_on_engine, engine, spec, payload, classifier=classifier, tagger=tagger, **extras)
        recorded = (lambda result: {"safety": result["safety"]}) if spec.judged_images is not None else None
        return await run_job(store, job_id, work, executor, recorded)
    finally:
        if spec.previews:
            await sink.close()
