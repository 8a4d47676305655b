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
from typing import Any, Callable, Protocol

from modal_services.job_requests import (
    CaptionRequest,
    DownloadRequest,
    FluxGenerateRequest,
    GenerateRequest,
    JobRequest,
    ModelDeleteRequest,
    ModelImportRequest,
    ModelScanRequest,
    ModelUploadRequest,
    UpscaleRequest,
    VerifyRequest,
)
from modal_services.jobs import ProgressFn, run_job
from modal_services.layout import Layout
from modal_services.state import StateStore


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

    @property
    def kind(self) -> str:
        return self.request.kind


def _caption_engine(layout: Layout) -> Engine:
    from modal_services.caption import CaptionEngine

    return CaptionEngine(layout)


def _caption():
    from modal_services.caption import CaptionEngine

    return CaptionEngine.caption


def _download_engine(layout: Layout) -> Engine:
    from modal_services.downloads import DownloadEngine

    return DownloadEngine(layout)


def _download():
    from modal_services.downloads import DownloadEngine

    return DownloadEngine.download


def _verify():
    from modal_services.downloads import DownloadEngine

    return DownloadEngine.verify


def _model_engine(layout: Layout) -> Engine:
    from modal_services.model_import import ModelEngine

    return ModelEngine(layout)


def _import_model():
    from modal_services.model_import import ModelEngine

    return ModelEngine.import_model


def _upload_model():
    from modal_services.model_import import ModelEngine

    return ModelEngine.upload_model


def _delete_model():
    from modal_services.model_import import ModelEngine

    return ModelEngine.delete_model


def _scan_library():
    from modal_services.model_import import ModelEngine

    return ModelEngine.scan_library


def _sdxl_engine(layout: Layout) -> Engine:
    from modal_services.sdxl_engine import SdxlEngine

    return SdxlEngine(layout)


def _upscale():
    from modal_services.sdxl_engine import SdxlEngine

    return SdxlEngine.upscale


def _generate():
    from modal_services.sdxl_engine import SdxlEngine

    return SdxlEngine.generate


def _flux_engine(layout: Layout) -> Engine:
    from modal_services.flux import FluxEngine

    return FluxEngine(layout)


def _flux_generate():
    from modal_services.flux import FluxEngine

    return FluxEngine.generate


SERVICES: dict[str, ServiceSpec] = {
    spec.kind: spec
    for spec in (
        ServiceSpec(CaptionRequest, "CaptionService", "caption", _caption, _caption_engine),
        ServiceSpec(DownloadRequest, "DownloadService", "download", _download, _download_engine),
        ServiceSpec(VerifyRequest, "DownloadService", "verify", _verify, _download_engine),
        # One GPU class and one engine for every SDXL job: they share the loaded models.
        ServiceSpec(UpscaleRequest, "SdxlService", "upscale", _upscale, _sdxl_engine, previews=True),
        ServiceSpec(GenerateRequest, "SdxlService", "generate", _generate, _sdxl_engine, previews=True),
        # FLUX.1-dev on a GPU class of its own: its weights do not fit beside SDXL's.
        ServiceSpec(FluxGenerateRequest, "FluxService", "generate", _flux_generate, _flux_engine, previews=True),
        # The model library's file work (/models): CivitAI imports, uploads, deletes, scans.
        ServiceSpec(ModelImportRequest, "ModelService", "import_model", _import_model, _model_engine),
        ServiceSpec(ModelUploadRequest, "ModelService", "upload_model", _upload_model, _model_engine),
        ServiceSpec(ModelDeleteRequest, "ModelService", "delete_model", _delete_model, _model_engine),
        ServiceSpec(ModelScanRequest, "ModelService", "scan_library", _scan_library, _model_engine),
    )
}


def run_on_engine(
    engine: Engine, spec: ServiceSpec, payload: dict[str, Any], progress: ProgressFn, **extras: Any
) -> Any:
    """Blocking: check the request (before any model loads), load the engine if needed
    (a missing model fails the job, not the worker), then run."""
    request = spec.request.parse(payload)
    if not engine.loaded:
        progress(0.0, "loading model")
        engine.load()
    return spec.engine_method()(engine, progress=progress, **extras, **request.to_payload())


async def run_service_job(
    store: StateStore, engine: Engine, spec: ServiceSpec, job_id: str, payload: dict[str, Any], executor=None
) -> Any:
    """One job, as every Modal class and the local backend run it: `run_job` over
    `run_on_engine`, with a preview sink for the engines that make previews."""
    extras: dict[str, Any] = {}
    if spec.previews:
        from modal_services.sdxl_previews import PreviewSink

        extras["preview"] = PreviewSink(store, job_id)
    try:
        return await run_job(store, job_id, partial(run_on_engine, engine, spec, payload, **extras), executor)
    finally:
        if spec.previews:
            await extras["preview"].close()
