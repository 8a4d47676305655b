"""The upscale engine: SDXL + ControlNet Tile, Mixture-of-Diffusers tiles in latent space.

One job: resize the image to the target size (Lanczos), encode it with a
tiled VAE, add noise for the chosen creativity (img2img strength), then at
every denoising step run UNet + ControlNet Tile on overlapping latent tiles
(batched) and blend their noise predictions (see `tiling.py` for why this
method), step the scheduler once on the whole latent, and finally decode
with a tiled VAE. Each tile tells SDXL where it sits through the
micro-conditioning (original size = the whole image, crop = the tile's
position, target size = the tile), and gets its own piece of the image as
the ControlNet Tile control image.

Models come from the models volume (seed 000's layout), never from a hub:
the checkpoint is a single-file SDXL checkpoint (Illustrious-XL or one from
the library) read with SDXL's diffusers configs stored on the volume. When a
job names another checkpoint, only the UNet and text encoders are reloaded;
ControlNet, VAE, IP-Adapter's image encoder, tokenizers and scheduler stay.

LoRAs arrive resolved (name, path, weight, trigger words): the library and
its names are not this module's business. They are loaded as named PEFT
adapters, kept loaded for the next jobs (least recently used dropped
first), activated per job with `set_adapters`, and disabled when the job
ends; disabled, unfused adapters leave the base weights untouched, so a job
without LoRAs gives exactly a fresh pipeline's output.
"""

from __future__ import annotations

import io
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.imaging import decode_image, encode_png
from modal_services.job_requests import UpscaleRequest, job_method
from modal_services.jobs import ProgressFn
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
from modal_services.sdxl_limits import DEFAULT_MAX_INPUT_PIXELS, DEFAULT_MAX_OUTPUT_PIXELS, check_upscale_size
from modal_services.tiling import MAX_TILE, MIN_OVERLAP, TilePlan, TileBlender, pad_to_plan, plan_tiles

log = logging.getLogger(__name__)

# What a preview callback receives: a small JPEG of the image as it stands.
PreviewFn = Callable[[bytes], None]

# The library's name for the base checkpoint (its `active_checkpoint` value when nothing else is chosen).
DEFAULT_CHECKPOINT_KEY = "illustrious-xl"
DEFAULT_GUIDANCE = 5.0
# VAE tiles: the VAE is the most memory-hungry part per pixel, so its tiles
# are smaller than the UNet's; 128 px of feathered overlap hides the edges of
# each decoded tile.
VAE_TILE = 768
VAE_OVERLAP = 128
# A rough measure of one tile's activations for UNet + ControlNet with CFG in
# fp16 at 1024², used to size tile batches from free GPU memory; an OOM
# retry with one tile at a time backs it up.
BYTES_PER_MEGAPIXEL_TILE = 1.5 * 2**30
MAX_TILE_BATCH = 4
CPU_TILE_BATCH = 4
PREVIEW_SIDE = 256
# Loaded once and kept across checkpoint switches.
SHARED_MODELS = ("controlnet", "vae", "image_encoder")
PREVIEW_INTERVAL = 3.0

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
    trigger_words: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, entry: dict[str, Any], lora_folder: Path | None = None) -> "LoraSpec":
        """From a checked `ResolvedLora` entry; a `file` is looked up in `lora_folder`."""
        name = entry["name"]
        try:
            path = Path(entry["path"]) if entry.get("path") else _file_in(lora_folder, entry["file"])
        except ValueError:
            raise ToolboxError(ErrorCode.INVALID_INPUT, f"LoRA {name!r}: {entry['file']!r} is not a library file name.") from None
        weight = entry["weight"] if entry.get("weight") is not None else 1.0
        words = tuple(word.strip() for word in entry.get("trigger_words") or () if word.strip())
        return cls(name=name, path=path, weight=weight, trigger_words=words)


def _file_in(folder: Path | None, file: str) -> Path:
    """A library file name inside its folder; anything that could leave the folder is refused."""
    name = str(file)
    if folder is None or not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"not a file name: {name!r}")
    return folder / name


def with_trigger_words(prompt: str, loras: list[LoraSpec]) -> str:
    """Prepend each LoRA's trigger words once; words already in the prompt are not repeated."""
    added: list[str] = []
    for lora in loras:
        for word in lora.trigger_words:
            pattern = r"(?<![\w])" + re.escape(word) + r"(?![\w])"
            if re.search(pattern, prompt, re.IGNORECASE) or any(word.lower() == seen.lower() for seen in added):
                continue
            added.append(word)
    return ", ".join(added + ([prompt] if prompt else []))


def check_regions(regions: list[dict[str, Any]], width: int, height: int) -> list[tuple[tuple[int, int, int, int], str]]:
    """((left, top, right, bottom), prompt) pairs of checked `RegionPrompt` entries, each box inside
    the width x height input."""
    checked = []
    for region in regions:
        left, top, right, bottom = region["box"]
        if not (0 <= left < right <= width and 0 <= top < bottom <= height):
            raise ToolboxError(ErrorCode.INVALID_INPUT, f"Region {region['box']} is not inside the {width}×{height} image.")
        checked.append(((left, top, right, bottom), region["prompt"].strip()))
    return checked


def region_prompt(regions, tile, scale: float) -> str:
    """The words of the first region holding the tile's centre (in input pixels), or ""."""
    x = (tile.x + tile.width / 2) / scale
    y = (tile.y + tile.height / 2) / scale
    for (left, top, right, bottom), text in regions:
        if left <= x < right and top <= y < bottom:
            return text
    return ""


def latent_preview_jpeg(latents, max_side: int = PREVIEW_SIDE, quality: int = 70) -> bytes:
    """A small JPEG of (1, 4, h, w) SDXL latents through the fixed latent->RGB map."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    latents = latents[0].float()
    height, width = latents.shape[-2:]
    shrink = max(height, width) / max_side
    if shrink > 1:
        latents = F.interpolate(latents[None], size=(max(1, round(height / shrink)), max(1, round(width / shrink))), mode="area")[0]
    factors = torch.tensor(SDXL_LATENT_RGB, device=latents.device)
    bias = torch.tensor(SDXL_LATENT_RGB_BIAS, device=latents.device)
    rgb = torch.einsum("chw,cr->hwr", latents, factors) + bias
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


class UpscaleEngine:
    def __init__(
        self,
        layout: Layout,
        device: str | None = None,
        max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
        max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS,
        max_tile: int = MAX_TILE,
        min_overlap: int = MIN_OVERLAP,
        vae_tile: int = VAE_TILE,
        vae_overlap: int = VAE_OVERLAP,
        tile_batch: int | None = None,
        guidance_scale: float = DEFAULT_GUIDANCE,
        controlnet_scale: float = 1.0,
        lora_cache_size: int = 6,
        preview_interval: float = PREVIEW_INTERVAL,
    ):
        self.models_dir = layout.models_dir
        # The LoRA volume's root (loras/ and checkpoints/ inside), where library entries given by file name are found.
        self.loras_dir = layout.loras_dir
        self.device = device
        self.max_input_pixels = max_input_pixels
        self.max_output_pixels = max_output_pixels
        self.max_tile = max_tile
        self.min_overlap = min_overlap
        self.vae_tile = vae_tile
        self.vae_overlap = vae_overlap
        # None: sized from free GPU memory (CUDA) or CPU_TILE_BATCH.
        self.tile_batch = tile_batch
        self.guidance_scale = guidance_scale
        self.controlnet_scale = controlnet_scale
        self.lora_cache_size = lora_cache_size
        self.preview_interval = preview_interval
        self.loaded = False
        # Where the weights are now: `device`, or host memory while staged for a snapshot.
        self.placement: str | None = None
        self.pipe = None
        self.checkpoint: Path | None = None
        self.dtype = None
        # (path, size, mtime) -> adapter name, most recently used last.
        self._adapters: OrderedDict[tuple[str, int, float], str] = OrderedDict()
        self._adapter_serial = 0

    # ------------------------------------------------------------------ files

    @property
    def default_checkpoint(self) -> Path:
        return self.models_dir / ILLUSTRIOUS_CHECKPOINT

    @property
    def config_dir(self) -> Path:
        return self.models_dir / SDXL_CONFIG_DIR

    def missing_files(self) -> list[str]:
        """The base-model files `load()` needs that are not on the volume, by registry key."""
        needed = {
            "illustrious-xl": [ILLUSTRIOUS_CHECKPOINT],
            "sdxl-base (configs)": [f"{SDXL_CONFIG_DIR}/model_index.json"],
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

    # ------------------------------------------------------------------ loading

    def load(self, staging_device: str | None = None) -> None:
        """Load every model onto `device`, or only into `staging_device` (host memory, for a memory
        snapshot taken before the GPU is attached; the first job then moves them: `place()`)."""
        missing = self.missing_files()
        if missing:
            raise ToolboxError(
                ErrorCode.MODELS_MISSING,
                "The upscaler's base models are not all installed. An admin can download them with /setup "
                "(or `toolbox setup`). Missing: " + "; ".join(missing),
            )
        import torch
        from diffusers import AutoencoderKL, ControlNetModel
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        # fp16 on GPU (the VAE is the fp16-fix one, so it stays in fp16 too); fp32 on CPU.
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        try:
            self._shared = {
                "controlnet": ControlNetModel.from_pretrained(self.models_dir / CONTROLNET_TILE_DIR, torch_dtype=self.dtype),
                "vae": AutoencoderKL.from_pretrained(self.models_dir / SDXL_VAE_DIR, torch_dtype=self.dtype),
                "image_encoder": CLIPVisionModelWithProjection.from_pretrained(
                    self.models_dir / CLIP_VIT_H_DIR, dtype=self.dtype
                ),
                "feature_extractor": CLIPImageProcessor.from_pretrained(self.models_dir / CLIP_VIT_H_DIR),
            }
        except Exception as exc:
            log.exception("loading the upscaler's base models from %s failed", self.models_dir)
            raise ToolboxError(
                ErrorCode.MODEL_LOAD_FAILED,
                f"The upscaler's base models could not be loaded ({type(exc).__name__}). Try /setup → Verify.",
            ) from exc
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
            self._adapters.clear()
            if self.placement.startswith("cuda"):
                torch.cuda.empty_cache()
        try:
            pipe = StableDiffusionXLControlNetImg2ImgPipeline.from_single_file(
                str(path), config=str(self.config_dir), local_files_only=True, torch_dtype=self.dtype, **reuse
            )
            ip_adapter = self.models_dir / IP_ADAPTER_FILE
            pipe.load_ip_adapter(str(ip_adapter.parent), subfolder="", weight_name=ip_adapter.name, image_encoder_folder=None)
        except Exception as exc:
            log.exception("loading checkpoint %s failed", path)
            raise ToolboxError(
                ErrorCode.MODEL_LOAD_FAILED,
                f"The checkpoint {path.name} could not be loaded as an SDXL checkpoint ({type(exc).__name__}).",
            ) from exc
        pipe.to(self.placement)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.checkpoint = path

    def checkpoint_path(self, checkpoint: str | None) -> Path:
        """None or the default's key -> Illustrious; a bare file name -> the library's checkpoints; else a path."""
        if not checkpoint or checkpoint == DEFAULT_CHECKPOINT_KEY:
            return self.default_checkpoint
        if Path(checkpoint).is_absolute():
            return Path(checkpoint)
        try:
            return _file_in(self.loras_dir / CHECKPOINTS_SUBDIR if self.loras_dir else None, checkpoint)
        except ValueError:
            raise ToolboxError(ErrorCode.INVALID_INPUT, f"{checkpoint!r} is not a checkpoint file name.") from None

    # ------------------------------------------------------------------ planning

    def plan(self, width: int, height: int) -> TilePlan:
        """The denoising tiles (in output pixels) for an output of width x height."""
        factor = self.pipe.vae_scale_factor if self.pipe is not None else 8
        return plan_tiles(width, height, self.max_tile, self.min_overlap, multiple=8 * factor, align=factor)

    # ------------------------------------------------------------------ the job

    @job_method(UpscaleRequest)
    def upscale(
        self,
        image: bytes,
        scale: float,
        prompt: str,
        negative: str,
        loras: list[dict[str, Any]],
        creativity: float,
        seed: int,
        checkpoint: str | None,
        steps: int,
        ip_adapter_scale: float,
        region_prompts: list[dict[str, Any]],
        progress: ProgressFn | None = None,
        preview: PreviewFn | None = None,
    ) -> bytes:
        """Upscale `image` (encoded bytes) by `scale`; returns PNG bytes.

        `region_prompts` ([{"box": [left, top, right, bottom], "prompt": ...}]
        in input pixels, e.g. per-tile captions) add words to the prompt of
        each tile whose centre lies in the box: the regions need not match
        this engine's tiles. Everything about the request is checked before
        any model work: the request's fields by `UpscaleRequest`, then the
        sizes, the regions and the LoRA files here.
        """
        progress = progress or (lambda fraction, stage: None)
        prompt, negative = prompt.strip(), negative.strip()
        lora_folder = self.loras_dir / LORAS_SUBDIR if self.loras_dir else None
        specs = [LoraSpec.from_dict(entry, lora_folder) for entry in loras]
        picture = decode_image(image, max_pixels=self.max_input_pixels, name="The image").image
        out_width, out_height = check_upscale_size(
            picture.width, picture.height, scale, self.max_input_pixels, self.max_output_pixels
        )
        plan = self.plan(out_width, out_height)
        regions = check_regions(region_prompts, picture.width, picture.height)
        prompt = with_trigger_words(prompt, specs)
        tile_texts = [
            ", ".join(part for part in (prompt, region_prompt(regions, tile, scale)) if part)
            for tile in plan.tiles
        ]
        checkpoint_path = self.checkpoint_path(checkpoint)

        # --- models for this job
        if self.placement != self.device:
            progress(0.01, "moving the models to the GPU")
            self.place()
        if checkpoint_path != self.checkpoint:
            progress(0.01, f"switching checkpoint to {checkpoint_path.stem}")
            self._load_checkpoint(checkpoint_path)
        if specs:
            progress(0.02, "loading LoRAs")
        try:
            self._activate_loras(specs)
            return self._run(
                picture, plan, tile_texts, negative, creativity, seed, steps, ip_adapter_scale, progress, preview
            )
        finally:
            self._deactivate_loras()

    # ------------------------------------------------------------------ LoRAs

    def _activate_loras(self, specs: list[LoraSpec]) -> None:
        names = [self._adapter_for(spec) for spec in specs]
        if names:
            self.pipe.enable_lora()
            self.pipe.set_adapters(names, adapter_weights=[spec.weight for spec in specs])

    def _adapter_for(self, spec: LoraSpec) -> str:
        try:
            stat = spec.path.stat()
        except OSError:
            raise ToolboxError(ErrorCode.LORA_LOAD_FAILED, f"The LoRA {spec.name!r} is missing its file ({spec.path.name}).") from None
        key = (str(spec.path), stat.st_size, stat.st_mtime)
        if key in self._adapters:
            self._adapters.move_to_end(key)
            return self._adapters[key]
        while len(self._adapters) >= self.lora_cache_size:
            _, oldest = self._adapters.popitem(last=False)
            self.pipe.delete_adapters(oldest)
        self._adapter_serial += 1
        name = f"lora{self._adapter_serial}"
        try:
            self.pipe.load_lora_weights(str(spec.path), adapter_name=name)
        except Exception as exc:
            log.warning("LoRA %s (%s) failed to load: %s", spec.name, spec.path, exc)
            self._drop_partial_adapter(name)
            reason = "its weights do not fit SDXL (is it an SD 1.5 or Flux LoRA?)" if "size mismatch" in str(exc) else (
                f"{type(exc).__name__}: {str(exc)[:160]}"
            )
            raise ToolboxError(ErrorCode.LORA_LOAD_FAILED, f"The LoRA {spec.name!r} could not be loaded: {reason}.") from exc
        self._adapters[key] = name
        return name

    def _drop_partial_adapter(self, name: str) -> None:
        """A failed load can leave the adapter on some modules: remove it wherever it got."""
        if any(name in names for names in self.pipe.get_list_adapters().values()):
            self.pipe.delete_adapters(name)

    def _deactivate_loras(self) -> None:
        if self._adapters:
            self.pipe.disable_lora()

    # ------------------------------------------------------------------ denoising

    def _tile_batch(self, plan: TilePlan) -> int:
        if self.tile_batch is not None:
            return max(1, self.tile_batch)
        if not self.device.startswith("cuda"):
            return CPU_TILE_BATCH
        import torch

        free, _ = torch.cuda.mem_get_info()
        per_tile = BYTES_PER_MEGAPIXEL_TILE * plan.tile_width * plan.tile_height / 2**20
        return int(max(1, min(MAX_TILE_BATCH, 0.8 * free // per_tile)))

    def _run(self, picture, plan, tile_texts, negative, creativity, seed, steps, ip_scale, progress, preview):
        import torch
        from PIL import Image

        # Lanczos to the target size, then edge-padded out to what the tiles
        # cover (one statement, so the intermediate copies are freed at once).
        canvas = pad_to_plan(np.asarray(picture.resize((plan.width, plan.height), Image.Resampling.LANCZOS)), plan)
        batch = self._tile_batch(plan)
        try:
            with torch.inference_mode():
                return self._denoise_and_decode(
                    picture, canvas, plan, tile_texts, negative, creativity, seed, steps, ip_scale, batch,
                    progress, preview,
                )
        except torch.cuda.OutOfMemoryError as exc:
            if batch == 1:
                raise ToolboxError(
                    ErrorCode.CUDA_OOM, "The GPU ran out of memory even one tile at a time: try a smaller scale."
                ) from exc
            log.warning("CUDA OOM with %d tiles per UNet call: retrying one tile at a time", batch)
        torch.cuda.empty_cache()
        progress(0.05, "out of GPU memory: retrying one tile at a time")
        try:
            with torch.inference_mode():
                return self._denoise_and_decode(
                    picture, canvas, plan, tile_texts, negative, creativity, seed, steps, ip_scale, 1,
                    progress, preview,
                )
        except torch.cuda.OutOfMemoryError as exc:
            raise ToolboxError(
                ErrorCode.CUDA_OOM, "The GPU ran out of memory even one tile at a time: try a smaller scale."
            ) from exc

    def _denoise_and_decode(
        self, picture, canvas, plan, tile_texts, negative, creativity, seed, steps, ip_scale, batch,
        progress, preview,
    ) -> bytes:
        import torch

        pipe = self.pipe
        device, dtype = self.device, self.dtype
        factor = pipe.vae_scale_factor
        latent_plan = plan.scaled(factor)
        tiles, pixel_tiles = latent_plan.tiles, plan.tiles
        weights = [torch.from_numpy(w).to(device, torch.float32) for w in latent_plan.weights()]
        do_cfg = self.guidance_scale > 1.0

        # Text: one encoding per distinct prompt (the user's, plus each tile's own words).
        encoded = {}
        for text in dict.fromkeys(tile_texts):
            embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
                prompt=text, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=do_cfg, negative_prompt=negative or None,
            )
            encoded[text] = (embeds, negative_embeds, pooled, negative_pooled)

        # IP-Adapter: one embedding of the whole picture, shared by every tile.
        pipe.set_ip_adapter_scale(ip_scale)
        image_embeds, negative_image_embeds = self._image_embeds(picture, ip_scale)

        # Micro-conditioning per tile: original size = the whole image, crop =
        # where the tile sits, target size = the tile.
        time_ids = [
            torch.tensor([[plan.height, plan.width, tile.y, tile.x, tile.height, tile.width]], device=device, dtype=dtype)
            for tile in pixel_tiles
        ]

        progress(0.04, "encoding the image")
        latents = self._tiled_encode(canvas, plan).to(device, dtype)

        # Timesteps for img2img: the last `creativity` share of the schedule (at least one step).
        scheduler = pipe.scheduler
        scheduler.set_timesteps(steps, device=device)
        denoise_steps = max(1, int(steps * creativity))
        start = (steps - denoise_steps) * scheduler.order
        timesteps = scheduler.timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(device, dtype)
        latents = scheduler.add_noise(latents, noise, timesteps[:1])

        batches = [list(range(i, min(i + batch, len(tiles)))) for i in range(0, len(tiles), batch)]
        control = torch.from_numpy(canvas).to(device).permute(2, 0, 1)[None]  # uint8, (1, 3, H, W)
        last_preview = time.monotonic()
        for step, t in enumerate(timesteps):
            noise_pred = torch.zeros(latents.shape, device=device, dtype=torch.float32)
            for members in batches:
                tile_latents = torch.cat([latents[:, :, tiles[i].slices[0], tiles[i].slices[1]] for i in members])
                # ControlNet Tile sees the resized input under the tile, in [0, 1].
                tile_control = torch.cat(
                    [control[:, :, pixel_tiles[i].slices[0], pixel_tiles[i].slices[1]] for i in members]
                ).to(dtype) / 255.0
                texts = [encoded[tile_texts[i]] for i in members]
                embeds = torch.cat([e[0] for e in texts])
                pooled = torch.cat([e[2] for e in texts])
                ids = torch.cat([time_ids[i] for i in members])
                ip_embeds = image_embeds.expand(len(members), -1, -1, -1)
                model_input = tile_latents
                if do_cfg:
                    embeds = torch.cat([torch.cat([e[1] for e in texts]), embeds])
                    pooled = torch.cat([torch.cat([e[3] for e in texts]), pooled])
                    ids = torch.cat([ids, ids])
                    ip_embeds = torch.cat([negative_image_embeds.expand(len(members), -1, -1, -1), ip_embeds])
                    model_input = torch.cat([tile_latents, tile_latents])
                    tile_control = torch.cat([tile_control, tile_control])
                model_input = scheduler.scale_model_input(model_input, t)
                conditions = {"text_embeds": pooled, "time_ids": ids}
                down_residuals, mid_residual = pipe.controlnet(
                    model_input, t, encoder_hidden_states=embeds, controlnet_cond=tile_control,
                    conditioning_scale=self.controlnet_scale, added_cond_kwargs=conditions, return_dict=False,
                )
                prediction = pipe.unet(
                    model_input, t, encoder_hidden_states=embeds,
                    down_block_additional_residuals=down_residuals, mid_block_additional_residual=mid_residual,
                    added_cond_kwargs={**conditions, "image_embeds": [ip_embeds]}, return_dict=False,
                )[0].float()
                if do_cfg:
                    unconditional, conditional = prediction.chunk(2)
                    prediction = unconditional + self.guidance_scale * (conditional - unconditional)
                # Mixture of Diffusers: each tile's prediction, weighted, into the whole latent's.
                for k, i in enumerate(members):
                    rows, columns = tiles[i].slices
                    noise_pred[:, :, rows, columns] += prediction[k : k + 1] * weights[i]
                done = step * len(tiles) + members[-1] + 1
                progress(
                    0.06 + 0.86 * done / (len(timesteps) * len(tiles)),
                    f"tile {members[-1] + 1}/{len(tiles)} · step {step + 1}/{len(timesteps)}",
                )
            latents = scheduler.step(noise_pred.to(dtype), t, latents, return_dict=False)[0]
            if preview is not None and time.monotonic() - last_preview >= self.preview_interval:
                preview(latent_preview_jpeg(latents[:, :, : latent_plan.height, : latent_plan.width]))
                last_preview = time.monotonic()

        progress(0.93, "decoding")
        pixels = self._tiled_decode(latents, plan)
        return encode_png(pixels)

    def _image_embeds(self, picture, ip_scale: float):
        """(positive, negative) IP-Adapter Plus embeddings, (1, 1, tokens, width) each.

        With the scale at 0 the adapter's attention adds nothing, so zeros
        stand in for the image encoder's pass.
        """
        import torch

        encoder = self.pipe.image_encoder
        if ip_scale > 0:
            positive, negative = self.pipe.encode_image(picture, self.device, 1, output_hidden_states=True)
            return positive[:, None], negative[:, None]
        size, patch = encoder.config.image_size, encoder.config.patch_size
        tokens = (size // patch) ** 2 + 1
        zeros = torch.zeros(1, 1, tokens, encoder.config.hidden_size, device=self.device, dtype=self.dtype)
        return zeros, zeros

    # ------------------------------------------------------------------ tiled VAE

    def _vae_plan(self, plan: TilePlan) -> TilePlan:
        """VAE tiles over the same padded canvas as the denoising tiles (latent-aligned)."""
        factor = self.pipe.vae_scale_factor
        return plan_tiles(
            plan.covered_width, plan.covered_height, max_tile=self.vae_tile, min_overlap=self.vae_overlap,
            multiple=factor, align=factor,
        )

    def _tiled_encode(self, canvas: np.ndarray, plan: TilePlan):
        """(1, 4, h, w) scaled latents of the padded canvas, encoded tile by tile and blended."""
        import torch

        vae = self.pipe.vae
        vae_plan = self._vae_plan(plan)
        latent_plan = vae_plan.scaled(self.pipe.vae_scale_factor)
        blender = TileBlender(latent_plan, channels=vae.config.latent_channels)
        for pixel_tile, latent_tile in zip(vae_plan.tiles, latent_plan.tiles):
            rows, columns = pixel_tile.slices
            tile = torch.from_numpy(np.ascontiguousarray(canvas[rows, columns])).to(self.device)
            tile = tile.permute(2, 0, 1)[None].to(self.dtype) / 127.5 - 1.0
            # The distribution's mode, not a sample: the noise comes from the seeded generator only.
            latent = vae.encode(tile).latent_dist.mode()
            blender.add(latent_tile, latent[0].permute(1, 2, 0).float().cpu().numpy())
        latents = torch.from_numpy(np.ascontiguousarray(blender.canvas)).permute(2, 0, 1)[None]
        return self._normalize_latents(latents)

    def _tiled_decode(self, latents, plan: TilePlan):
        """The output image (PIL, plan.width x plan.height), decoded tile by tile and blended."""
        from PIL import Image

        vae = self.pipe.vae
        vae_plan = self._vae_plan(plan)
        latent_plan = vae_plan.scaled(self.pipe.vae_scale_factor)
        latents = self._denormalize_latents(latents)
        blender = TileBlender(vae_plan, channels=3)
        for pixel_tile, latent_tile in zip(vae_plan.tiles, latent_plan.tiles):
            rows, columns = latent_tile.slices
            decoded = vae.decode(latents[:, :, rows, columns], return_dict=False)[0]
            blender.add(pixel_tile, ((decoded[0].float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).cpu().numpy())
        # In place: at 4096² each float copy of the canvas would be another 200 MB.
        pixels = blender.canvas
        np.rint(pixels, out=pixels)
        np.clip(pixels, 0, 255, out=pixels)
        return Image.fromarray(pixels[: plan.height, : plan.width].astype(np.uint8))

    def _latent_stats(self, latents):
        import torch

        config = self.pipe.vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            shape = (1, len(config.latents_mean), 1, 1)
            return (torch.tensor(config.latents_mean).view(shape).to(latents), torch.tensor(config.latents_std).view(shape).to(latents))
        return None, None

    def _normalize_latents(self, latents):
        mean, std = self._latent_stats(latents)
        factor = self.pipe.vae.config.scaling_factor
        return (latents - mean) * factor / std if mean is not None else latents * factor

    def _denormalize_latents(self, latents):
        mean, std = self._latent_stats(latents)
        factor = self.pipe.vae.config.scaling_factor
        return latents * std / factor + mean if mean is not None else latents / factor
