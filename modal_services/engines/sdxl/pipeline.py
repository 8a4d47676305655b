"""The SDXL models one warm worker holds for every SDXL job (text-to-image, variations, upscales).

One set of weights serves both jobs: the UNet and text encoders of the
active checkpoint, the VAE, tokenizers and scheduler, plus ControlNet Tile
and IP-Adapter (only the upscaler feeds them). They come from the models
volume (one folder per base model), never from a hub: the checkpoint is a
single-file SDXL checkpoint (Illustrious-XL or one from the library) read
with SDXL's diffusers configs stored on the volume. When a job names
another checkpoint, only the UNet and text encoders are reloaded, so the
switch applies to every job kind at once.

LoRAs arrive resolved (name, path, weight; their trigger words are already in
the request's `encoder_prompt`): the library and
its names are not this module's business. Each job loads its LoRAs as
named PEFT adapters and unloads every one of them when it ends, so a job
without LoRAs runs on exactly the modules and weights of a fresh pipeline.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from modal_services.engines.loading import loading
from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.records import ProgressFn
from modal_services.jobs.requests import ResolvedLora
from modal_services.layout import (
    CHECKPOINTS_SUBDIR,
    CLIP_VIT_H_DIR,
    CONTROLNET_TILE_DIR,
    ILLUSTRIOUS_CHECKPOINT,
    IP_ADAPTER_FILE,
    LORAS_SUBDIR,
    SDXL_CONFIG_DIR,
    SDXL_VAE_DIR,
    Layout,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# What a preview callback receives: a small JPEG of the image as it stands.
PreviewFn = Callable[[bytes], None]

# The library's name for the base checkpoint (its `active_checkpoint` value when nothing else is chosen).
DEFAULT_CHECKPOINT_KEY = "illustrious-xl"
PREVIEW_SIDE = 256
# Loaded once and kept across checkpoint switches.
SHARED_MODELS = ("controlnet", "vae", "image_encoder")

# ComfyUI's fixed linear map from SDXL's (scaled) latent channels to RGB in [-1, 1]:
# a recognisable thumbnail without running the VAE.
SDXL_LATENT_RGB = [
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
]
SDXL_LATENT_RGB_BIAS = [0.1084, -0.0175, -0.0011]


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA as the library resolved it."""

    name: str
    path: Path
    weight: float = 1.0

    @classmethod
    def of(cls, lora: ResolvedLora, lora_folder: Path | None = None) -> "LoraSpec":
        """From a request's `ResolvedLora`; a `file` is looked up in `lora_folder`."""
        try:
            path = Path(lora.path) if lora.path else file_in(lora_folder, lora.file)
        except ValueError:
            raise ToolboxError(
                ErrorCode.INVALID_INPUT, f"LoRA {lora.name!r}: {lora.file!r} is not a library file name."
            ) from None
        weight = lora.weight if lora.weight is not None else 1.0
        return cls(name=lora.name, path=path, weight=weight)


def file_in(folder: Path | None, file: str) -> Path:
    """A library file name inside its folder; anything that could leave the folder is refused."""
    name = str(file)
    if folder is None or not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"not a file name: {name!r}")
    return folder / name


def latent_preview_jpeg(latents, max_side: int = PREVIEW_SIDE, quality: int = 70,
                        factors: list[list[float]] = SDXL_LATENT_RGB, bias: list[float] = SDXL_LATENT_RGB_BIAS) -> bytes:
    """A small JPEG of (1, channels, h, w) latents through a fixed latent->RGB map (SDXL's by default)."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    latents = latents[0].float()
    height, width = latents.shape[-2:]
    shrink = max(height, width) / max_side
    if shrink > 1:
        latents = F.interpolate(latents[None], size=(max(1, round(height / shrink)), max(1, round(width / shrink))), mode="area")[0]
    rgb = torch.einsum("chw,cr->hwr", latents, torch.tensor(factors, device=latents.device)) + torch.tensor(
        bias, device=latents.device
    )
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def retry_smaller_on_oom(work: Callable[[bool], T], can_shrink: bool, retry_stage: str, oom_message: str,
                         progress: ProgressFn) -> T:
    """`work(False)`; after a CUDA out-of-memory error, `work(True)` once (the smaller batch), then CUDA_OOM."""
    import torch

    try:
        return work(False)
    except torch.cuda.OutOfMemoryError as exc:
        if not can_shrink:
            raise ToolboxError(ErrorCode.CUDA_OOM, oom_message) from exc
        log.warning("CUDA OOM: %s", retry_stage)
    torch.cuda.empty_cache()
    progress(0.05, f"out of GPU memory: {retry_stage}")
    try:
        return work(True)
    except torch.cuda.OutOfMemoryError as exc:
        raise ToolboxError(ErrorCode.CUDA_OOM, oom_message) from exc


@contextlib.contextmanager
def job_adapters(pipe, specs: list[LoraSpec], progress: ProgressFn, load: Callable[[LoraSpec, str], None],
                 unload: Callable[[], None]) -> Iterator[None]:
    """A job's LoRAs as named adapters on `pipe` inside the block (`load(spec, name)` loads one); `unload()`
    when it ends, however it ends, so the next job runs on the pipeline's own weights."""
    if specs:
        progress(0.02, "loading LoRAs")
    try:
        names = []
        for index, spec in enumerate(specs):
            if not spec.path.is_file():
                raise ToolboxError(ErrorCode.LORA_LOAD_FAILED, f"The LoRA {spec.name!r} is missing its file ({spec.path.name}).")
            names.append(f"lora{index}")
            load(spec, names[-1])
        if names:
            pipe.set_adapters(names, adapter_weights=[spec.weight for spec in specs])
        yield
    finally:
        if specs:
            unload()


class SdxlModels:
    """The loaded SDXL components, the active checkpoint, and each job's LoRAs."""

    def __init__(self, layout: Layout, device: str | None = None):
        self.models_dir = layout.models_dir
        # The LoRA volume's root (loras/ and checkpoints/ inside), where library entries given by file name are found.
        self.loras_dir = layout.loras_dir
        self.device = device
        self.loaded = False
        # Where the weights are now: `device`, or host memory while staged for a snapshot.
        self.placement: str | None = None
        # A StableDiffusionXLControlNetImg2ImgPipeline with IP-Adapter: the superset every job draws on.
        self.pipe = None
        self.checkpoint: Path | None = None
        self.dtype = None
        self._shared: dict[str, Any] = {}

    # ------------------------------------------------------------------ files

    @property
    def default_checkpoint(self) -> Path:
        return self.models_dir / ILLUSTRIOUS_CHECKPOINT

    @property
    def config_dir(self) -> Path:
        return self.models_dir / SDXL_CONFIG_DIR

    @property
    def lora_folder(self) -> Path | None:
        return self.loras_dir / LORAS_SUBDIR if self.loras_dir else None

    def missing_files(self) -> list[str]:
        """The base-model files `load()` needs that are not on the volume, by registry key."""
        needed = {
            "illustrious-xl": [ILLUSTRIOUS_CHECKPOINT],
            "sdxl-base": [f"{SDXL_CONFIG_DIR}/model_index.json"],
            "controlnet-tile": [f"{CONTROLNET_TILE_DIR}/config.json", f"{CONTROLNET_TILE_DIR}/*.safetensors"],
            "sdxl-vae": [f"{SDXL_VAE_DIR}/config.json", f"{SDXL_VAE_DIR}/*.safetensors"],
            "ip-adapter": [IP_ADAPTER_FILE],
            "clip-vit-h": [f"{CLIP_VIT_H_DIR}/config.json", f"{CLIP_VIT_H_DIR}/*.safetensors"],
        }
        missing = []
        for key, patterns in needed.items():
            absent = [p for p in patterns if not any(self.models_dir.glob(p))]
            if absent:
                missing.append(f"{key} ({', '.join(absent)})")
        return missing

    def checkpoint_path(self, checkpoint: str | None) -> Path:
        """None or the default's key -> Illustrious; a bare file name -> the library's checkpoints; else a path."""
        if not checkpoint or checkpoint == DEFAULT_CHECKPOINT_KEY:
            return self.default_checkpoint
        if Path(checkpoint).is_absolute():
            return Path(checkpoint)
        try:
            return file_in(self.loras_dir / CHECKPOINTS_SUBDIR if self.loras_dir else None, checkpoint)
        except ValueError:
            raise ToolboxError(ErrorCode.INVALID_INPUT, f"{checkpoint!r} is not a checkpoint file name.") from None

    def lora_specs(self, loras: list[ResolvedLora]) -> list[LoraSpec]:
        """The request's LoRAs, found on the LoRA volume."""
        return [LoraSpec.of(lora, self.lora_folder) for lora in loras]

    # ------------------------------------------------------------------ loading

    def load(self, staging_device: str | None = None) -> None:
        """Load every model onto `device`, or only into `staging_device` (host memory, for a memory
        snapshot taken before the GPU is attached; the first job then moves them: `place()`)."""
        missing = self.missing_files()
        if missing:
            raise ToolboxError(
                ErrorCode.MODELS_MISSING,
                f"The SDXL base models are not all installed (missing: {'; '.join(missing)}): "
                f"{remedies.download()}.",
            )
        import torch
        from diffusers import AutoencoderKL, ControlNetModel
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        # fp16 on GPU (the VAE is the fp16-fix one, so it stays in fp16 too); fp32 on CPU.
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        with loading("the SDXL base models", self.models_dir):
            self._shared = {
                "controlnet": ControlNetModel.from_pretrained(self.models_dir / CONTROLNET_TILE_DIR, torch_dtype=self.dtype),
                "vae": AutoencoderKL.from_pretrained(self.models_dir / SDXL_VAE_DIR, torch_dtype=self.dtype),
                "image_encoder": CLIPVisionModelWithProjection.from_pretrained(
                    self.models_dir / CLIP_VIT_H_DIR, dtype=self.dtype
                ),
                "feature_extractor": CLIPImageProcessor.from_pretrained(self.models_dir / CLIP_VIT_H_DIR),
            }
        self.placement = staging_device or self.device
        for model in SHARED_MODELS:
            self._shared[model].to(self.placement).eval()
        self._load_checkpoint(self.default_checkpoint)
        self.loaded = True

    def place(self) -> None:
        """Move staged models to `device` (a no-op once they are there)."""
        if self.placement == self.device:
            return
        for model in SHARED_MODELS:
            self._shared[model].to(self.device)
        self.pipe.to(self.device)
        self.placement = self.device

    def use_checkpoint(self, path: Path, progress: ProgressFn) -> None:
        """Models on the device and `path` the active checkpoint, before a job's first step."""
        if self.placement != self.device:
            progress(0.01, "moving the models to the GPU")
            self.place()
        if path != self.checkpoint:
            progress(0.01, f"switching checkpoint to {path.stem}")
            self._load_checkpoint(path)

    def _load_checkpoint(self, path: Path) -> None:
        """Build the pipeline around a single-file checkpoint, reusing every other loaded part."""
        import torch
        from diffusers import StableDiffusionXLControlNetImg2ImgPipeline

        if not path.is_file():
            raise ToolboxError(ErrorCode.MODELS_MISSING, f"The checkpoint file {path.name} is not on the volume.")
        reuse = dict(self._shared)
        if self.pipe is not None:
            # Tokenizers and scheduler are the same for every SDXL checkpoint.
            reuse.update(tokenizer=self.pipe.tokenizer, tokenizer_2=self.pipe.tokenizer_2, scheduler=self.pipe.scheduler)
            # Free the old UNet and text encoders before loading new ones: two
            # SDXL UNets do not fit next to each other on a 24 GB GPU.
            self.pipe = None
            self.checkpoint = None
            if self.placement.startswith("cuda"):
                torch.cuda.empty_cache()
        with loading(f"the checkpoint {path.name}", path, at=" as an SDXL checkpoint", hint=""):
            pipe = StableDiffusionXLControlNetImg2ImgPipeline.from_single_file(
                str(path), config=str(self.config_dir), local_files_only=True, torch_dtype=self.dtype, **reuse
            )
            ip_adapter = self.models_dir / IP_ADAPTER_FILE
            pipe.load_ip_adapter(str(ip_adapter.parent), subfolder="", weight_name=ip_adapter.name, image_encoder_folder=None)
        pipe.to(self.placement)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.checkpoint = path

    def model_layout(self):
        """The loaded UNet's and text encoders' layers, what a LoRA is checked against."""
        from modal_services.library.lora_formats.layouts import ModelLayout

        return ModelLayout.of_pipeline(self.pipe)

    def empty_image_embeds(self, count: int):
        """`count` zero IP-Adapter Plus image embeddings, (count, 1, tokens, width): what a job
        without an image reference feeds the IP-Adapter (its attention adds nothing at scale 0)."""
        import torch

        config = self.pipe.image_encoder.config
        tokens = (config.image_size // config.patch_size) ** 2 + 1
        return torch.zeros(count, 1, tokens, config.hidden_size, device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ LoRAs

    def loras(self, specs: list[LoraSpec], progress: ProgressFn):
        """The job's LoRAs active inside the block; every adapter unloaded when it ends, however it ends."""
        return job_adapters(self.pipe, specs, progress, self._load_adapter, self.pipe.unload_lora_weights)

    def _load_adapter(self, spec: LoraSpec, name: str) -> None:
        try:
            self.pipe.load_lora_weights(str(spec.path), adapter_name=name)
        except Exception as exc:
            log.warning("LoRA %s (%s) failed to load: %s", spec.name, spec.path, exc)
            reason = "its weights do not fit SDXL (is it an SD 1.5 or Flux LoRA?)" if "size mismatch" in str(exc) else (
                f"{type(exc).__name__}: {str(exc)[:160]}"
            )
            raise ToolboxError(ErrorCode.LORA_LOAD_FAILED, f"The LoRA {spec.name!r} could not be loaded: {reason}.") from exc
