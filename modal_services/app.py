"""The Modal app: `modal deploy -m modal_services.app`.

Reads top to bottom: settings read at deploy time, the images, the volumes
and the state Dict, then one class per service. Each class is a thin shell:
`@modal.enter` loads its engine once per container, and each method runs one
job through `run_service_job`, the same path the local backend uses.
`reconcile_records` runs daily: the durable records checked against their files (state/reconcile.py).

Deploy-time settings (environment variables of the `modal deploy` command):
TOOLBOX_MODAL_APP (app name), TOOLBOX_CAPTION_GPU (T4 or L4),
TOOLBOX_SCALEDOWN_SECONDS (idle time before a GPU container stops),
TOOLBOX_CAPTION_MAX_CONTAINERS, TOOLBOX_SDXL_GPU (default A10G),
TOOLBOX_SDXL_MAX_CONTAINERS, TOOLBOX_UPSCALE_MAX_MP (output limit, default 16),
TOOLBOX_FACE_PROVIDER (where InstantID's face analysis runs: cpu, the default, or cuda),
TOOLBOX_API_SECRET (the HTTP API's Modal secret, holding TOOLBOX_API_TOKEN),
TOOLBOX_FLUX_GPU (default L40S), TOOLBOX_FLUX_PRECISION (auto | bf16 | fp8 | nf4),
TOOLBOX_FLUX_MAX_CONTAINERS.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable

import modal

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.base_models.downloads import DownloadEngine
from modal_services.engines.caption import CaptionEngine, best_device
from modal_services.engines.flux import FluxEngine, precision_for_gpu
from modal_services.jobs.requests import (CaptionRequest, DownloadRequest, FluxGenerateRequest, GenerateRequest,
                                          JobRequest, ModelDeleteRequest, ModelImportRequest, ModelScanRequest,
                                          ModelUploadRequest, UpscaleRequest, VerifyRequest)
from modal_services.library.imports import ModelEngine
from modal_services.layout import LORAS_MOUNT, LORAS_VOLUME, MODELS_MOUNT, MODELS_VOLUME, Layout, state_dict_name
from modal_services.state.durable import HOME_VOLUMES, LORAS_HOME, MODELS_HOME, DurableStore
from modal_services.state.record_files import FolderFiles, RecordFiles, VolumeFiles
from modal_services.safety.nsfw_classifier import NsfwClassifier
from modal_services.safety.tagger import Tagger
from modal_services.services import SERVICES, run_service_job
from modal_services.state.store import ModalDictStore

log = logging.getLogger(__name__)

APP_NAME = os.environ.get("TOOLBOX_MODAL_APP", "ai-toolbox")
CAPTION_GPU = os.environ.get("TOOLBOX_CAPTION_GPU", "L4")
SCALEDOWN_SECONDS = int(os.environ.get("TOOLBOX_SCALEDOWN_SECONDS", "300"))
CAPTION_MAX_CONTAINERS = int(os.environ.get("TOOLBOX_CAPTION_MAX_CONTAINERS", "4"))

app = modal.App(APP_NAME)

# The GPU image: the ML stack with the CUDA build of torch (right on Modal).
# pydantic: the worker parses each job's request from its payload.
GPU_PACKAGES = ("torch==2.9.1", "torchvision==0.24.1", "transformers>=4.57", "accelerate>=1.0", "safetensors>=0.4",
                "huggingface_hub>=0.34", "pillow>=10.0", "pydantic>=2.7")
gpu_image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install(*GPU_PACKAGES)
    .env({"HF_HUB_OFFLINE": "1"})  # models come from the volume, never from the hub at run time
    .add_local_python_source("modal_services")
)

models_volume = modal.Volume.from_name(MODELS_VOLUME, create_if_missing=True)
state_dict = modal.Dict.from_name(state_dict_name(APP_NAME), create_if_missing=True)


def _store(mounted: dict[str, modal.Volume] | None = None) -> DurableStore:
    """The shared Dict for live state, and the durable records in their homes: as files where this
    container does file work on the home's volume (committed after each write), through the volume's
    client API elsewhere. The GPU services pass no volumes: a commit reloads the volume, which fails
    while a loaded model holds files open, and the API always reads the latest records."""
    mounted = mounted or {}
    mounts = {MODELS_HOME: MODELS_MOUNT, LORAS_HOME: LORAS_MOUNT}
    homes: dict[str, RecordFiles] = {}
    for home, volume_name in HOME_VOLUMES.items():
        mount = mounts.get(home)
        volume = mounted.get(str(mount)) if mount else None
        homes[home] = (FolderFiles(mount, commit=volume.commit) if volume is not None
                       else VolumeFiles(modal.Volume.from_name(volume_name, create_if_missing=True)))
    return DurableStore(ModalDictStore(state_dict), homes)


def _layout(store: DurableStore) -> Layout:
    """What every engine here is built on: the mounted volumes and the shared Dict."""
    return Layout(MODELS_MOUNT, LORAS_MOUNT, store)


def _load_or_stay_up(name: str, load: Callable[[], None]) -> None:
    """Load a model as the container starts. A missing one does not stop the container: each job reports
    the problem, and the next job retries after /setup has put the files on the volume."""
    try:
        load()
    except ToolboxError as error:
        log.warning("%s not loaded: %s", name, error.code.value)


# The caption image adds onnxruntime for the booru tagger (the `tags` style); the CPU build, as Flux's image has.
caption_image = gpu_image.pip_install("onnxruntime>=1.20")


@app.cls(
    image=caption_image,
    gpu=CAPTION_GPU,
    volumes={str(MODELS_MOUNT): models_volume},
    scaledown_window=SCALEDOWN_SECONDS,
    max_containers=CAPTION_MAX_CONTAINERS,
    timeout=600,
    enable_memory_snapshot=True,
)
class CaptionService:
    @modal.enter(snap=True)
    def load_weights(self) -> None:
        """Runs once, before the snapshot: reading ~4 GB of VLM weights and the tagger's 1.3 GB is what cold
        starts then skip."""
        self.store = _store()
        self.engine = CaptionEngine(_layout(self.store), dtype="float16" if CAPTION_GPU == "T4" else "bfloat16")
        _load_or_stay_up("caption engine", self.engine.load_weights)

    @modal.enter(snap=False)
    def move_to_gpu(self) -> None:
        self.engine.move_to(best_device())

    @modal.method()
    async def caption(self, job_id: str, payload: dict) -> list[str]:
        if not self.engine.loaded:
            try:
                await models_volume.reload.aio()  # a model /setup downloaded since this container started
            except Exception:  # refused while the other model's files are open: a fresh container sees it
                log.warning("models volume reload skipped", exc_info=True)
        return await run_service_job(self.store, self.engine, SERVICES[CaptionRequest], job_id, payload)


# The download image: CPU only. Network I/O never runs on a GPU. torch (the CPU build) is there
# only to turn a model published as a pickle into safetensors, tensors only (pickle_weights).
download_image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install("torch==2.9.1", index_url="https://download.pytorch.org/whl/cpu")
    .pip_install("huggingface_hub==2.4.0", "urllib3>=2.0", "certifi", "pydantic>=2.7", "safetensors>=0.4")
    .add_local_python_source("modal_services")
)
loras_volume = modal.Volume.from_name(LORAS_VOLUME, create_if_missing=True)
DOWNLOAD_VOLUMES = (models_volume, loras_volume)
# What every service but the caption one mounts: base models, and LoRAs and library checkpoints.
MODEL_VOLUMES = {str(MODELS_MOUNT): models_volume, str(LORAS_MOUNT): loras_volume}
# DISCORD_TOKEN (required); optionally CIVITAI_TOKEN, HF_TOKEN, TOOLBOX_GUILD_IDS. The bot and the
# workers that fetch with tokens (DownloadService, ModelService) get it, so a token put here is one
# token everywhere; /setup's tokens (on the tokens volume) take precedence.
bot_secret = modal.Secret.from_name(os.environ.get("TOOLBOX_BOT_SECRET", "ai-toolbox-discord"), required_keys=["DISCORD_TOKEN"])


def _commit_volumes() -> None:
    for volume in DOWNLOAD_VOLUMES:
        volume.commit()


def _reload_volumes() -> None:
    for volume in DOWNLOAD_VOLUMES:
        volume.reload()


@app.cls(
    image=download_image,
    volumes=MODEL_VOLUMES,
    scaledown_window=60,
    timeout=3 * 3600,  # ~20 GB of base models, with room for a slow source
    secrets=[bot_secret],
)
class DownloadService:
    @modal.enter()
    def load(self) -> None:
        self.store = _store(MODEL_VOLUMES)
        # Called from the engine's worker threads (blocking forms): commit after
        # each model so other containers see it, reload before checking files.
        self.engine = DownloadEngine(_layout(self.store), commit=_commit_volumes, reload=_reload_volumes)
        self.engine.load()

    @modal.method()
    async def download(self, job_id: str, payload: dict) -> dict:
        return await run_service_job(self.store, self.engine, SERVICES[DownloadRequest], job_id, payload)

    @modal.method()
    async def verify(self, job_id: str, payload: dict) -> dict:
        return await run_service_job(self.store, self.engine, SERVICES[VerifyRequest], job_id, payload)


# The model-library image: CPU only. LoRA checks and conversions need torch,
# diffusers and transformers (layers built on the meta device: no weights, no GPU).
model_image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install("torch==2.9.1", index_url="https://download.pytorch.org/whl/cpu")
    .pip_install("diffusers>=0.35", "transformers>=4.57", "safetensors>=0.4", "urllib3>=2.0", "certifi", "huggingface_hub>=0.34", "pydantic>=2.7")
    .env({"HF_HUB_OFFLINE": "1"})
    .add_local_python_source("modal_services")
)


@app.cls(
    image=model_image,
    volumes=MODEL_VOLUMES,
    scaledown_window=60,
    timeout=3 * 3600,  # a 7 GB checkpoint from a slow CivitAI storage node
    secrets=[bot_secret],
)
class ModelService:
    """/models file work: imports from CivitAI, uploads, deletes and scans of the LoRA volume."""

    @modal.enter()
    def load(self) -> None:
        self.store = _store(MODEL_VOLUMES)
        self.engine = ModelEngine(_layout(self.store), commit=_commit_volumes, reload=_reload_volumes)
        self.engine.load()

    async def _run(self, request: type[JobRequest], job_id: str, payload: dict):
        await loras_volume.reload.aio()  # see files other containers committed
        return await run_service_job(self.store, self.engine, SERVICES[request], job_id, payload)

    @modal.method()
    async def import_model(self, job_id: str, payload: dict) -> dict:
        return await self._run(ModelImportRequest, job_id, payload)

    @modal.method()
    async def upload_model(self, job_id: str, payload: dict) -> dict:
        return await self._run(ModelUploadRequest, job_id, payload)

    @modal.method()
    async def delete_model(self, job_id: str, payload: dict) -> dict:
        return await self._run(ModelDeleteRequest, job_id, payload)

    @modal.method()
    async def scan_library(self, job_id: str, payload: dict) -> dict:
        return await self._run(ModelScanRequest, job_id, payload)


# The older Gradio toolbox kept its manifest in this Dict, as one whole-manifest key.
LEGACY_METADATA_DICT = "ai-toolbox-model-metadata"


@app.function(
    image=model_image,  # the importer's checks and LoRA conversions need torch
    volumes=MODEL_VOLUMES,
    timeout=3 * 3600,  # hashing the checkpoints of a large library
)
def migrate_volumes(dry_run: bool = False) -> dict:
    """The older toolbox's files and indexes on the volumes, brought into this layout (migration.py)."""
    import asyncio

    from modal_services.library.migration import Migration

    try:
        dict_manifest = modal.Dict.from_name(LEGACY_METADATA_DICT).get("manifest")
    except modal.exception.NotFoundError:
        dict_manifest = None  # an install that never had the Dict
    _reload_volumes()
    migration = Migration(_layout(_store(MODEL_VOLUMES)), dict_manifest=dict_manifest, commit=_commit_volumes,
                          dry_run=dry_run)
    return asyncio.run(migration.run()).to_dict()


@app.local_entrypoint()
def migrate(dry_run: bool = False) -> None:
    """`modal run -m modal_services.app::migrate [--dry-run]`: runs beside the volumes, prints the report here."""
    from modal_services.library.migration_report import MigrationReport, render_report

    print(render_report(MigrationReport.from_dict(migrate_volumes.remote(dry_run))))


# SDXL: text-to-image, variations and upscales in one GPU class, on one set of
# loaded models (ControlNet Tile and IP-Adapter on top, for the upscaler):
# a warm container serves both job kinds and a checkpoint switch applies to both.
SDXL_GPU = os.environ.get("TOOLBOX_SDXL_GPU", "A10G")
SDXL_MAX_CONTAINERS = int(os.environ.get("TOOLBOX_SDXL_MAX_CONTAINERS", "2"))
SDXL_DEVICE = "cuda"
# InstantID's face analysis: insightface on onnxruntime, the CUDA build only when asked for (it
# replaces the CPU one: both install the same module). insightface needs opencv-python (with
# its GUI libraries, hence libgl1), never next to opencv-python-headless.
FACE_PROVIDER = os.environ.get("TOOLBOX_FACE_PROVIDER", "cpu")
FACE_PACKAGES = ("insightface==2.1", "onnx>=1.16", "opencv-python>=4.8", "scipy>=1.11",
                 "onnxruntime-gpu>=1.20" if FACE_PROVIDER == "cuda" else "onnxruntime>=1.20")
sdxl_image = (
    gpu_image.apt_install("libgl1", "libglib2.0-0")
    .pip_install("diffusers>=0.35", "peft>=0.17", "torchsde==0.2.6", *FACE_PACKAGES)
    .run_commands("pip uninstall -y onnxruntime" if FACE_PROVIDER == "cuda" else "true")
    .env({
        # The output limit the bot checks too (sdxl_limits): the worker gets the deploy-time value.
        "TOOLBOX_UPSCALE_MAX_MP": os.environ.get("TOOLBOX_UPSCALE_MAX_MP", "16"),
        "TOOLBOX_FACE_PROVIDER": FACE_PROVIDER,
    })
)


async def _volumes_for_job(engine, classifier: NsfwClassifier, tagger: Tagger) -> None:
    """What a GPU job reads fresh: the base models while the engine, its NSFW classifier or its tagger is not
    loaded yet (/setup may just have put them there), and the LoRAs and checkpoints imported since this
    container started."""
    if not engine.loaded:
        await models_volume.reload.aio()
    elif not (classifier.loaded and tagger.loaded):
        try:
            await models_volume.reload.aio()  # a classifier or tagger downloaded since this container started
        except Exception:  # refused while the engine's files are open: the classifier waits for a fresh container
            log.warning("models volume reload skipped", exc_info=True)
    try:
        await loras_volume.reload.aio()
    except Exception:  # reload refuses while a file is open; the files already seen still work
        log.warning("LoRA volume reload skipped", exc_info=True)


@app.cls(
    image=sdxl_image,
    gpu=SDXL_GPU,
    # Base models from the models volume; LoRAs and library checkpoints from the LoRA volume.
    volumes=MODEL_VOLUMES,
    scaledown_window=SCALEDOWN_SECONDS,
    max_containers=SDXL_MAX_CONTAINERS,
    timeout=1800,  # a 4x upscale to 16 MP on an A10G, with a checkpoint switch
    # Cold starts: ~11 GB of fp16 weights read from the volume once, into host
    # memory, and restored from the snapshot afterwards; only the copy to the GPU remains.
    enable_memory_snapshot=True,
)
class SdxlService:
    @modal.enter(snap=True)
    def load(self) -> None:
        from modal_services.engines.sdxl.engine import SdxlEngine

        self.store = _store()
        # Named, not detected: the snapshot is taken before the GPU is attached. Both job kinds run on it.
        self.engine = SdxlEngine(_layout(self.store), device=SDXL_DEVICE)
        # Judges this container's images, loaded with the engine: part of the same snapshot and cold start.
        self.classifier = NsfwClassifier(MODELS_MOUNT, SDXL_DEVICE)
        self.tagger = Tagger(MODELS_MOUNT, SDXL_DEVICE)
        _load_or_stay_up("SDXL engine", lambda: self.engine.load(staging_device="cpu"))
        _load_or_stay_up("NSFW classifier", lambda: self.classifier.load(staging_device="cpu"))
        _load_or_stay_up("booru tagger", lambda: self.tagger.load(staging_device="cpu"))

    @modal.enter(snap=False)
    def place(self) -> None:
        if self.engine.loaded:
            self.engine.place()
        if self.classifier.loaded:
            self.classifier.place()
        self.tagger.place()

    async def _run(self, request: type[JobRequest], job_id: str, payload: dict):
        await _volumes_for_job(self.engine, self.classifier, self.tagger)
        return await run_service_job(self.store, self.engine, SERVICES[request], job_id, payload,
                                     classifier=self.classifier, tagger=self.tagger)

    @modal.method()
    async def upscale(self, job_id: str, payload: dict) -> dict:
        return await self._run(UpscaleRequest, job_id, payload)

    @modal.method()
    async def generate(self, job_id: str, payload: dict) -> dict:
        return await self._run(GenerateRequest, job_id, payload)


# FLUX.1-dev: a GPU class of its own (~34 GB of weights, which do not fit beside SDXL's).
# The precision is chosen at deploy time from the GPU it runs on (the snapshot is
# taken before a GPU is attached, so it cannot be detected then): bf16 on 40 GB
# and more, else the transformer quantised (fp8 from compute capability 8.9, NF4 below).
FLUX_GPU = os.environ.get("TOOLBOX_FLUX_GPU", "L40S")
FLUX_MAX_CONTAINERS = int(os.environ.get("TOOLBOX_FLUX_MAX_CONTAINERS", "2"))
FLUX_DEVICE = "cuda"
FLUX_PRECISION = precision_for_gpu(FLUX_GPU, os.environ.get("TOOLBOX_FLUX_PRECISION", "auto"))
# torchao (fp8) and bitsandbytes (NF4) only where the precision needs them.
FLUX_QUANTISERS = {"fp8": ("torchao>=0.13",), "nf4": ("bitsandbytes>=0.46",)}
flux_image = gpu_image.pip_install("diffusers>=0.35", "peft>=0.17", "sentencepiece>=0.2", "onnxruntime>=1.20",
                                   *FLUX_QUANTISERS.get(FLUX_PRECISION, ()))


@app.cls(
    image=flux_image,
    gpu=FLUX_GPU,
    volumes=MODEL_VOLUMES,
    scaledown_window=SCALEDOWN_SECONDS,
    max_containers=FLUX_MAX_CONTAINERS,
    timeout=1800,
    # Cold starts: at bf16 the ~34 GB are read into host memory once and restored from the
    # snapshot afterwards. A quantised transformer is quantised as it loads onto the GPU, so it
    # loads after the restore instead.
    enable_memory_snapshot=True,
)
class FluxService:
    @modal.enter(snap=True)
    def load(self) -> None:
        self.store = _store()
        self.engine = FluxEngine(_layout(self.store), device=FLUX_DEVICE)
        # Chosen from the GPU's name, not detected: no GPU is attached yet.
        self.engine.precision = FLUX_PRECISION
        # Judges this container's images, as SdxlService's does its own.
        self.classifier = NsfwClassifier(MODELS_MOUNT, FLUX_DEVICE)
        self.tagger = Tagger(MODELS_MOUNT, FLUX_DEVICE)
        _load_or_stay_up("NSFW classifier", lambda: self.classifier.load(staging_device="cpu"))
        _load_or_stay_up("booru tagger", lambda: self.tagger.load(staging_device="cpu"))
        if self.engine.can_stage:
            _load_or_stay_up("Flux engine", lambda: self.engine.load(staging_device="cpu"))

    @modal.enter(snap=False)
    def place(self) -> None:
        if self.engine.loaded:
            self.engine.place()
        else:
            _load_or_stay_up("Flux engine", self.engine.load)
        if self.classifier.loaded:
            self.classifier.place()
        self.tagger.place()

    @modal.method()
    async def generate(self, job_id: str, payload: dict) -> dict:
        await _volumes_for_job(self.engine, self.classifier, self.tagger)
        return await run_service_job(self.store, self.engine, SERVICES[FluxGenerateRequest], job_id, payload,
                                     classifier=self.classifier, tagger=self.tagger)


# The bot itself: one always-on container on a slim image (the package's base
# dependencies: discord.py, modal, Pillow... never torch). It talks to the
# services above through the same ModalBackend as a bot run elsewhere.
bot_image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install_from_pyproject(str(Path(__file__).resolve().parent.parent / "pyproject.toml"))
    .add_local_python_source("bot", "cogs", "modal_services")
)


@app.function(
    image=bot_image,  # CPU only; the result retention is a server setting the bot's code reads
    volumes=MODEL_VOLUMES,
    schedule=modal.Period(days=1),
    timeout=3600,  # thousands of result records, each read through the records volume's API
)
def reconcile_records() -> dict:
    """Daily: every durable record read from its file, the Dict's cache re-warmed, drift (an entry without
    a file, a file without an entry) logged and kept for /status, and result buttons' records past their
    server's retention removed, and finished jobs past TOOLBOX_JOB_RETENTION_HOURS. Nothing waits on it: the files are the truth."""
    import asyncio

    from bot.guild_settings import result_retention_days
    from bot.result_params import sweep_result_params
    from modal_services.jobs.records import job_retention_seconds, sweep_finished_jobs
    from modal_services.state.reconcile import reconcile

    _reload_volumes()  # see what other containers committed
    store = _store(MODEL_VOLUMES)

    async def run():
        await store.copy_cached_records()
        report = await reconcile(store)
        await sweep_result_params(store, result_retention_days)
        await sweep_finished_jobs(store, job_retention_seconds())
        return report

    report = asyncio.run(run())
    if report.leftovers_removed:
        _commit_volumes()  # the removals, made on the mounted volumes
    return report.to_dict()


def run_until_stopped(supervisor, stop: threading.Event) -> None:
    """The bot's thread: a failure retrying cannot fix (a refused token) ends it with one log line."""
    try:
        supervisor.run(stop)
    except ToolboxError as error:
        log.error("the bot stopped: %s: %s", error.code.value, error.message)


@app.cls(image=bot_image, secrets=[bot_secret], min_containers=1, max_containers=1)
class DiscordBot:
    """The gateway connection lives in a thread for the container's life; the supervisor
    reconnects after crashes and before the 24-hour limit."""

    @modal.enter()
    def connect(self) -> None:
        from bot.runner import bot_supervisor
        from bot.settings import Settings

        settings = Settings.load(environ={**os.environ, "TOOLBOX_BACKEND": "modal", "TOOLBOX_MODAL_APP": APP_NAME})
        self.stop = threading.Event()
        self.thread = threading.Thread(target=run_until_stopped, args=(bot_supervisor(settings), self.stop),
                                       name="discord-bot")
        self.thread.start()

    @modal.exit()
    def disconnect(self) -> None:
        # Modal stops the container with SIGTERM and runs this: the bot closes gracefully within 10 s.
        self.stop.set()
        self.thread.join(timeout=15)

    @modal.method()
    def alive(self) -> bool:
        return self.thread.is_alive()


# The HTTP API: the FastAPI app of `toolbox serve` as a web endpoint, on a CPU
# container with the bot's slim image; it spawns the classes above through
# ModalBackend, as the bot does. One container (cheap: it only waits on
# others' work, up to API_MAX_INPUTS requests at once) keeps each token's
# concurrency cap in one place. Modal ends a web request after 150 s, so
# /generate-image waits at most API_SYNC_LIMIT_SECONDS and longer work goes
# through /jobs. `modal deploy` prints the endpoint's URL.
API_SYNC_LIMIT_SECONDS = 140
API_MAX_INPUTS = 200
api_secret = modal.Secret.from_name(os.environ.get("TOOLBOX_API_SECRET", "ai-toolbox-api"), required_keys=["TOOLBOX_API_TOKEN"])


@app.function(image=bot_image, secrets=[api_secret], max_containers=1, timeout=API_SYNC_LIMIT_SECONDS + 30)
@modal.concurrent(max_inputs=API_MAX_INPUTS)
@modal.asgi_app()
def api():
    from bot.api import api_for_settings
    from bot.settings import Settings

    settings = Settings.load(environ={**os.environ, "TOOLBOX_BACKEND": "modal", "TOOLBOX_MODAL_APP": APP_NAME})
    if not settings.api_token:
        raise ToolboxError(ErrorCode.PERMISSION_DENIED, "The API secret has an empty TOOLBOX_API_TOKEN: the API will not start without one.")
    return api_for_settings(settings, settings.api_token, sync_limit_seconds=API_SYNC_LIMIT_SECONDS)
