"""The job kinds: for each, its request, the Modal class serving it and the engine method doing it.

`SERVICES` is the one table from a job kind to where and how it runs. The
Modal classes and the local backend both run a job through `run_service_job`,
so they behave the same. Engine modules are imported only when a worker
runs a job (the bot never loads the ML stack): each kind names its engine
method through a small loader, so "find usages" of an engine method leads
here and from here to the request and the front ends that build it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Protocol

from modal_services.errors import ToolboxError
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
    from modal_services.safety.nsfw_classifier import NsfwClassifier


class Engine(Protocol):
    loaded: bool

    def load(self) -> None: ...


@dataclass(frozen=True)
class ServiceSpec:
    request: type[JobRequest]
    modal_class: str
    # The Modal class's method for this kind (Modal spawns by name); it has the engine method's name.
    modal_method: str
    # () -> the engine method doing the work, e.g. `UpscaleEngine.upscale`.
    engine_method: Callable[[], Callable[..., Any]]
    # (layout) -> the engine the local backend runs this kind on (the Modal classes build theirs).
    make_engine: Callable[[Layout], Engine]
    # The engine method takes `preview=`: small JPEGs of the work so far, kept under `preview:<job>`.
    previews: bool = False
    # Where the result holds its images, for kinds whose images the worker judges (prompt screened, images
    # classified, withheld ones dropped) before anything leaves it; the request is then a `SafetyChecked`.
    judged_images: ResultImages | None = None

    @property
    def kind(self) -> str:
        return self.request.kind


def _caption_engine(layout: Layout) -> Engine:
    from modal_services.engines.caption import CaptionEngine

    return CaptionEngine(layout)


def _caption():
    from modal_services.engines.caption import CaptionEngine

    return CaptionEngine.caption


def _download_engine(layout: Layout) -> Engine:
    from modal_services.base_models.downloads import DownloadEngine

    return DownloadEngine(layout)


def _download():
    from modal_services.base_models.downloads import DownloadEngine

    return DownloadEngine.download


def _verify():
    from modal_services.base_models.downloads import DownloadEngine

    return DownloadEngine.verify


def _model_engine(layout: Layout) -> Engine:
    from modal_services.library.imports import ModelEngine

    return ModelEngine(layout)


def _import_model():
    from modal_services.library.imports import ModelEngine

    return ModelEngine.import_model


def _upload_model():
    from modal_services.library.imports import ModelEngine

    return ModelEngine.upload_model


def _delete_model():
    from modal_services.library.imports import ModelEngine

    return ModelEngine.delete_model


def _scan_library():
    from modal_services.library.imports import ModelEngine

    return ModelEngine.scan_library


def _sdxl_engine(layout: Layout) -> Engine:
    from modal_services.engines.sdxl.engine import SdxlEngine

    return SdxlEngine(layout)


def _upscale():
    from modal_services.engines.sdxl.engine import SdxlEngine

    return SdxlEngine.upscale


def _generate():
    from modal_services.engines.sdxl.engine import SdxlEngine

    return SdxlEngine.generate


def _flux_engine(layout: Layout) -> Engine:
    from modal_services.engines.flux import FluxEngine

    return FluxEngine(layout)


def _flux_generate():
    from modal_services.engines.flux import FluxEngine

    return FluxEngine.generate


SERVICES: dict[str, ServiceSpec] = {
    spec.kind: spec
    for spec in (
        ServiceSpec(CaptionRequest, "CaptionService", "caption", _caption, _caption_engine),
        ServiceSpec(DownloadRequest, "DownloadService", "download", _download, _download_engine),
        ServiceSpec(VerifyRequest, "DownloadService", "verify", _verify, _download_engine),
        # One GPU class and one engine for every SDXL job: they share the loaded models.
        ServiceSpec(UpscaleRequest, "SdxlService", "upscale", _upscale, _sdxl_engine, previews=True,
                    judged_images=UPSCALED_IMAGE),
        ServiceSpec(GenerateRequest, "SdxlService", "generate", _generate, _sdxl_engine, previews=True,
                    judged_images=GENERATED_IMAGES),
        # FLUX.1-dev on a GPU class of its own: its weights do not fit beside SDXL's. Its results have
        # the generate result's shape, so they are judged alike.
        ServiceSpec(FluxGenerateRequest, "FluxService", "generate", _flux_generate, _flux_engine, previews=True,
                    judged_images=GENERATED_IMAGES),
        # The model library's file work (/models): CivitAI imports, uploads, deletes, scans.
        ServiceSpec(ModelImportRequest, "ModelService", "import_model", _import_model, _model_engine),
        ServiceSpec(ModelUploadRequest, "ModelService", "upload_model", _upload_model, _model_engine),
        ServiceSpec(ModelDeleteRequest, "ModelService", "delete_model", _delete_model, _model_engine),
        ServiceSpec(ModelScanRequest, "ModelService", "scan_library", _scan_library, _model_engine),
    )
}


def run_on_engine(
    engine: Engine, spec: ServiceSpec, payload: dict[str, Any], progress: ProgressFn,
    classifier: "NsfwClassifier | None" = None, **extras: Any,
) -> Any:
    """Blocking: check the request (before any model loads; a judged kind's prompts are screened then),
    load the engine if needed (a missing model fails the job, not the worker), then run; a judged kind's
    images are then classified in one batch and the withheld ones dropped."""
    request = spec.request.parse(payload)
    context = request.safety if spec.judged_images is not None else None
    if context is not None and context.classifies:
        if classifier is None:
            raise ValueError(f"{spec.kind} jobs are judged: run them with the worker's NSFW classifier")
        if not classifier.loaded:
            progress(0.0, "loading the safety classifier")
            classifier.load()  # a missing classifier fails the job before any GPU work
    if not engine.loaded:
        progress(0.0, "loading model")
        engine.load()
    result = spec.engine_method()(engine, progress=progress, **extras, **request.engine_payload())
    if context is None:
        return result
    progress(1.0, "safety check")
    images, report = judge(spec.judged_images.take(result), context, classifier and classifier.scores)
    return spec.judged_images.give(result, images, report.to_dict())


async def run_service_job(
    store: StateStore, engine: Engine, spec: ServiceSpec, job_id: str, payload: dict[str, Any], executor=None,
    classifier: "NsfwClassifier | None" = None,
) -> Any:
    """One job, as every Modal class and the local backend run it: `run_job` over
    `run_on_engine`, with a preview sink for the engines that make previews (blurred while the
    images are still to be classified), and a judged kind's safety report kept in the job record."""
    extras: dict[str, Any] = {}
    if spec.previews:
        from modal_services.engines.sdxl.previews import PreviewSink

        sink = PreviewSink(store, job_id)
        extras["preview"] = obscured(sink) if _classified(spec, payload) else sink
    try:
        work = partial(run_on_engine, engine, spec, payload, classifier=classifier, **extras)
        recorded = (lambda result: {"safety": result["safety"]}) if spec.judged_images is not None else None
        return await run_job(store, job_id, work, executor, recorded)
    finally:
        if spec.previews:
            await sink.close()


def _classified(spec: ServiceSpec, payload: dict[str, Any]) -> bool:
    """Whether this job's images will be classified (a payload the request refuses counts: the job fails anyway)."""
    if spec.judged_images is None:
        return False
    try:
        return SafetyContext.parse(payload.get("safety") or {}).classifies
    except ToolboxError:
        return True
