"""The job kinds, and how one job runs on an engine.

A `ServiceSpec` ties a job kind to the Modal class that serves it and to the
engine method that does the work. The Modal classes and the local backend
both run a job through `run_service_job`, so they behave the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol

from modal_services.jobs import ProgressFn, run_job
from modal_services.state import StateStore
from modal_services.layout import CAPTION_MODEL


class Engine(Protocol):
    loaded: bool

    def load(self) -> None: ...


@dataclass(frozen=True)
class ServiceSpec:
    kind: str
    modal_class: str
    method: str
    # (models_dir) -> engine; imports the engine module only when called.
    make_engine: Callable[[Path], Engine]
    # The engine method takes `preview=`: small JPEGs of the work so far, kept under `preview:<job>`.
    previews: bool = False


def _caption_engine(models_dir: Path) -> Engine:
    from modal_services.caption import CaptionEngine

    return CaptionEngine(models_dir / CAPTION_MODEL)


def _download_engine(models_dir: Path) -> Engine:
    # The local backend's: the data dir holds models/, loras/ and the state
    # file side by side (layout.py). The Modal DownloadService builds its own
    # engine over the volumes and the state Dict.
    from modal_services.downloads import DownloadEngine

    return DownloadEngine.for_data_dir(models_dir.parent)


def _model_engine(models_dir: Path) -> Engine:
    # The local backend's, like the download engine's; the Modal ModelService
    # builds its own over the volumes and the state Dict.
    from modal_services.model_import import ModelEngine

    return ModelEngine.for_data_dir(models_dir.parent)


def _sdxl_engine(models_dir: Path) -> Engine:
    from modal_services.sdxl_engine import SdxlEngine

    # models/ and loras/ sit side by side both locally (the data dir) and on
    # Modal (/vol/models, /vol/loras): library files are found under loras/.
    return SdxlEngine(models_dir, loras_dir=models_dir.parent / "loras")


SERVICES: dict[str, ServiceSpec] = {
    "caption": ServiceSpec("caption", "CaptionService", "caption", _caption_engine),
    "download": ServiceSpec("download", "DownloadService", "download", _download_engine),
    "verify": ServiceSpec("verify", "DownloadService", "verify", _download_engine),
    # One GPU class and one engine for every SDXL job: they share the loaded models.
    "upscale": ServiceSpec("upscale", "SdxlService", "upscale", _sdxl_engine, previews=True),
    "generate": ServiceSpec("generate", "SdxlService", "generate", _sdxl_engine, previews=True),
    # The model library's file work (/models): CivitAI imports, uploads, deletes, scans.
    "model_import": ServiceSpec("model_import", "ModelService", "import_model", _model_engine),
    "model_upload": ServiceSpec("model_upload", "ModelService", "upload_model", _model_engine),
    "model_delete": ServiceSpec("model_delete", "ModelService", "delete_model", _model_engine),
    "model_scan": ServiceSpec("model_scan", "ModelService", "scan_library", _model_engine),
}


def run_on_engine(engine: Engine, spec: ServiceSpec, payload: dict[str, Any], progress: ProgressFn) -> Any:
    """Blocking: load the engine if needed (a missing model fails the job, not the worker), then run."""
    if not engine.loaded:
        progress(0.0, "loading model")
        engine.load()
    return getattr(engine, spec.method)(progress=progress, **payload)


async def run_service_job(
    store: StateStore, engine: Engine, spec: ServiceSpec, job_id: str, payload: dict[str, Any], executor=None
) -> Any:
    """One job, as every Modal class and the local backend run it: `run_job` over
    `run_on_engine`, with a preview sink for the engines that make previews."""
    sink = None
    if spec.previews:
        from modal_services.sdxl_previews import PreviewSink

        sink = PreviewSink(store, job_id)
        payload = {**payload, "preview": sink}
    try:
        return await run_job(store, job_id, partial(run_on_engine, engine, spec, payload), executor)
    finally:
        if sink is not None:
            await sink.close()
