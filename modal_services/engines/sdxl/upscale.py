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

The models (checkpoint, VAE, ControlNet Tile, IP-Adapter, each job's LoRAs)
are the worker's shared `SdxlModels`: text-to-image runs on the same ones.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.image_info.writing import MadeWith, sampler_of
from modal_services.imaging import decode_image, encode_png
from modal_services.jobs.requests import RegionPrompt, UpscaleRequest
from modal_services.jobs.records import ProgressFn
from modal_services.engines.sdxl.limits import DEFAULT_MAX_INPUT_PIXELS, DEFAULT_MAX_OUTPUT_PIXELS, check_upscale_size
from modal_services.engines.sdxl.pipeline import (
    PreviewFn,
    SdxlModels,
    latent_preview_jpeg,
    retry_smaller_on_oom,
)
from modal_services.engines.sdxl.prompt_encoding import SdxlPromptEncoder
from modal_services.engines.sdxl.samplers import job_scheduler, step_noise
from modal_services.engines.sdxl.tiling import MAX_TILE, MIN_OVERLAP, TilePlan, TileBlender, pad_to_plan, plan_tiles

log = logging.getLogger(__name__)

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
PREVIEW_INTERVAL = 3.0

def check_regions(regions: list[RegionPrompt], width: int, height: int) -> list[tuple[tuple[int, int, int, int], str]]:
    """((left, top, right, bottom), prompt) pairs of a request's region prompts, each box inside the
    width x height input."""
    checked = []
    for region in regions:
        left, top, right, bottom = region.box
        if not (0 <= left < right <= width and 0 <= top < bottom <= height):
            raise ToolboxError(ErrorCode.INVALID_INPUT, f"Region {region.box} is not inside the {width}×{height} image.")
        checked.append(((left, top, right, bottom), region.prompt.strip()))
    return checked


def region_prompt(regions, tile, scale: float) -> str:
    """The words of the first region holding the tile's centre (in input pixels), or ""."""
    x = (tile.x + tile.width / 2) / scale
    y = (tile.y + tile.height / 2) / scale
    for (left, top, right, bottom), text in regions:
        if left <= x < right and top <= y < bottom:
            return text
    return ""


@dataclass(frozen=True)
class _TileInputs:
    """What every denoising step feeds the tiles, per tile (lists indexed like `tiles`) or shared."""

    latent_plan: TilePlan
    tiles: list  # in latents
    pixel_tiles: list  # in output pixels
    weights: list  # each tile's blending weights, in latents
    texts: list  # each tile's TextConditioning
    time_ids: list  # each tile's micro-conditioning
    control: Any  # the canvas as ControlNet Tile's control image, uint8 (1, 3, H, W)
    image_embeds: Any  # IP-Adapter's, shared by every tile
    negative_image_embeds: Any


class TiledUpscaler:
    """The upscale job, on the SDXL models a worker shares with text-to-image."""

    def __init__(
        self,
        models: SdxlModels,
        max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
        max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS,
        max_tile: int = MAX_TILE,
        min_overlap: int = MIN_OVERLAP,
        vae_tile: int = VAE_TILE,
        vae_overlap: int = VAE_OVERLAP,
        tile_batch: int | None = None,
        guidance_scale: float = DEFAULT_GUIDANCE,
        controlnet_scale: float = 1.0,
        preview_interval: float = PREVIEW_INTERVAL,
    ):
        self.models = models
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
        self.preview_interval = preview_interval

    @property
    def pipe(self):
        return self.models.pipe

    @property
    def device(self) -> str:
        return self.models.device

    @property
    def dtype(self):
        return self.models.dtype

    # ------------------------------------------------------------------ planning

    def plan(self, width: int, height: int) -> TilePlan:
        """The denoising tiles (in output pixels) for an output of width x height."""
        factor = self.pipe.vae_scale_factor if self.pipe is not None else 8
        return plan_tiles(width, height, self.max_tile, self.min_overlap, multiple=8 * factor, align=factor)

    # ------------------------------------------------------------------ the job

    def upscale(self, request: UpscaleRequest, progress: ProgressFn, preview: PreviewFn | None = None) -> bytes:
        """Upscale `request.image` (encoded bytes) by `request.scale`; returns PNG bytes with their generation data.

        `request.region_prompts` (boxes in input pixels, e.g. per-tile
        captions) add words to the prompt of each tile whose centre lies in
        the box: the regions need not match this engine's tiles. The worker
        parsed the request; the sizes, the regions and the LoRA files are
        checked here, before any model work.
        """
        negative = request.negative.strip()
        specs = self.models.lora_specs(request.loras)
        picture = decode_image(request.image, max_pixels=self.max_input_pixels, name="The image").image
        out_width, out_height = check_upscale_size(
            picture.width, picture.height, request.scale, self.max_input_pixels, self.max_output_pixels
        )
        plan = self.plan(out_width, out_height)
        regions = check_regions(request.region_prompts, picture.width, picture.height)
        prompt = request.encoder_prompt()
        tile_texts = [
            ", ".join(part for part in (prompt, region_prompt(regions, tile, request.scale)) if part)
            for tile in plan.tiles
        ]
        checkpoint_path = self.models.checkpoint_path(request.checkpoint)

        # --- models for this job
        self.models.use_checkpoint(checkpoint_path, progress)
        with self.models.loras(specs, progress):
            png = self._run(picture, plan, tile_texts, negative, request, progress, preview)
        return MadeWith(prompt=prompt, negative_prompt=negative, steps=request.steps, cfg=self.guidance_scale,
                        width=out_width, height=out_height, sampler=sampler_of(self.pipe.scheduler, request.sampler),
                        model=checkpoint_path.stem, loras=specs, checkpoint_file=checkpoint_path,
                        models_dir=self.models.models_dir, denoising_strength=request.creativity).tagged(png, request.seed)

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

    def _run(self, picture, plan: TilePlan, tile_texts: list[str], negative: str, request: UpscaleRequest,
             progress: ProgressFn, preview: PreviewFn | None) -> bytes:
        import torch
        from PIL import Image

        # Lanczos to the target size, then edge-padded out to what the tiles
        # cover (one statement, so the intermediate copies are freed at once).
        canvas = pad_to_plan(np.asarray(picture.resize((plan.width, plan.height), Image.Resampling.LANCZOS)), plan)
        batch = self._tile_batch(plan)

        def denoise(one_tile_at_a_time: bool) -> bytes:
            with torch.inference_mode():
                return self._denoise_and_decode(
                    picture, canvas, plan, tile_texts, negative, request,
                    1 if one_tile_at_a_time else batch, progress, preview,
                )

        return retry_smaller_on_oom(
            denoise, batch > 1, "retrying one tile at a time",
            "The GPU ran out of memory even one tile at a time: try a smaller scale.", progress,
        )

    def _denoise_and_decode(self, picture, canvas: np.ndarray, plan: TilePlan, tile_texts: list[str], negative: str,
                            request: UpscaleRequest, batch: int, progress: ProgressFn,
                            preview: PreviewFn | None) -> bytes:
        """The whole denoising: the tiles' inputs, the noised latents of the canvas, then at every step each
        batch of tiles' noise predictions blended into the whole latent's, and the tiled decode."""
        import torch

        pipe, device, dtype = self.pipe, self.device, self.dtype
        inputs = self._tile_inputs(picture, canvas, plan, tile_texts, negative, request.ip_adapter_scale)
        tiles = inputs.tiles
        progress(0.04, "encoding the image")
        latents = self._tiled_encode(canvas, plan).to(device, dtype)
        # A scheduler of this run's own, and one seeded generator for the start noise and each step's.
        scheduler = job_scheduler(request.sampler, pipe.scheduler, [request.seed])
        generator = torch.Generator("cpu").manual_seed(request.seed)
        timesteps, latents = self._noised(scheduler, latents, request.steps, request.creativity, generator)

        batches = [list(range(i, min(i + batch, len(tiles)))) for i in range(0, len(tiles), batch)]
        last_preview = time.monotonic()
        for step, t in enumerate(timesteps):
            noise_pred = torch.zeros(latents.shape, device=device, dtype=torch.float32)
            for members in batches:
                prediction = self._predict_tiles(inputs, members, latents, t, scheduler)
                # Mixture of Diffusers: each tile's prediction, weighted, into the whole latent's.
                for k, i in enumerate(members):
                    rows, columns = tiles[i].slices
                    noise_pred[:, :, rows, columns] += prediction[k : k + 1] * inputs.weights[i]
                done = step * len(tiles) + members[-1] + 1
                progress(
                    0.06 + 0.86 * done / (len(timesteps) * len(tiles)),
                    f"tile {members[-1] + 1}/{len(tiles)} · step {step + 1}/{len(timesteps)}",
                )
            latents = scheduler.step(noise_pred.to(dtype), t, latents, **step_noise(scheduler, generator),
                                     return_dict=False)[0]
            if preview is not None and time.monotonic() - last_preview >= self.preview_interval:
                latent_plan = inputs.latent_plan
                preview(latent_preview_jpeg(latents[:, :, : latent_plan.height, : latent_plan.width]))
                last_preview = time.monotonic()

        progress(0.93, "decoding")
        pixels = self._tiled_decode(latents, plan)
        return encode_png(pixels)

    def _tile_inputs(self, picture, canvas: np.ndarray, plan: TilePlan, tile_texts: list[str], negative: str,
                     ip_scale: float) -> "_TileInputs":
        """What every step feeds the tiles: their text encodings, IP-Adapter embeddings, micro-conditioning
        and control image."""
        import torch

        pipe, device, dtype = self.pipe, self.device, self.dtype
        latent_plan = plan.scaled(pipe.vae_scale_factor)
        # Text: one encoding per distinct prompt (the user's, plus each tile's own words), all of one length.
        encoded = SdxlPromptEncoder(pipe).conditioning(tile_texts, negative, guided=self.guidance_scale > 1.0)
        # IP-Adapter: one embedding of the whole picture, shared by every tile.
        pipe.set_ip_adapter_scale(ip_scale)
        image_embeds, negative_image_embeds = self._image_embeds(picture, ip_scale)
        return _TileInputs(
            latent_plan=latent_plan, tiles=latent_plan.tiles, pixel_tiles=plan.tiles,
            weights=[torch.from_numpy(w).to(device, torch.float32) for w in latent_plan.weights()],
            texts=encoded,
            # Micro-conditioning per tile: original size = the whole image, crop = where the tile sits,
            # target size = the tile.
            time_ids=[
                torch.tensor([[plan.height, plan.width, tile.y, tile.x, tile.height, tile.width]], device=device, dtype=dtype)
                for tile in plan.tiles
            ],
            control=torch.from_numpy(canvas).to(device).permute(2, 0, 1)[None],  # uint8, (1, 3, H, W)
            image_embeds=image_embeds, negative_image_embeds=negative_image_embeds,
        )

    def _noised(self, scheduler, latents, steps: int, creativity: float, generator):
        """(the img2img timesteps of `scheduler`: the last `creativity` share of the schedule, at least one step;
        the latents noised to the first of them, from `generator`)."""
        import torch

        scheduler.set_timesteps(steps, device=self.device)
        denoise_steps = max(1, int(steps * creativity))
        start = (steps - denoise_steps) * scheduler.order
        timesteps = scheduler.timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(self.device, self.dtype)
        return timesteps, scheduler.add_noise(latents, noise, timesteps[:1])

    def _predict_tiles(self, inputs: "_TileInputs", members: list[int], latents, t, scheduler):
        """UNet + ControlNet Tile on the tiles `members` at timestep `t`: their noise predictions (float32,
        guidance applied), one per tile."""
        import torch

        pipe, dtype = self.pipe, self.dtype
        tiles, pixel_tiles = inputs.tiles, inputs.pixel_tiles
        tile_latents = torch.cat([latents[:, :, tiles[i].slices[0], tiles[i].slices[1]] for i in members])
        # ControlNet Tile sees the resized input under the tile, in [0, 1].
        tile_control = torch.cat(
            [inputs.control[:, :, pixel_tiles[i].slices[0], pixel_tiles[i].slices[1]] for i in members]
        ).to(dtype) / 255.0
        texts = [inputs.texts[i] for i in members]
        embeds = torch.cat([text.embeds for text in texts])
        pooled = torch.cat([text.pooled for text in texts])
        ids = torch.cat([inputs.time_ids[i] for i in members])
        ip_embeds = inputs.image_embeds.expand(len(members), -1, -1, -1)
        model_input = tile_latents
        do_cfg = self.guidance_scale > 1.0
        if do_cfg:
            embeds = torch.cat([torch.cat([text.negative_embeds for text in texts]), embeds])
            pooled = torch.cat([torch.cat([text.negative_pooled for text in texts]), pooled])
            ids = torch.cat([ids, ids])
            ip_embeds = torch.cat([inputs.negative_image_embeds.expand(len(members), -1, -1, -1), ip_embeds])
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
        if not do_cfg:
            return prediction
        unconditional, conditional = prediction.chunk(2)
        return unconditional + self.guidance_scale * (conditional - unconditional)

    def _image_embeds(self, picture, ip_scale: float):
        """(positive, negative) IP-Adapter Plus embeddings, (1, 1, tokens, width) each.

        With the scale at 0 the adapter's attention adds nothing, so zeros
        stand in for the image encoder's pass.
        """
        if ip_scale > 0:
            positive, negative = self.pipe.encode_image(picture, self.device, 1, output_hidden_states=True)
            return positive[:, None], negative[:, None]
        zeros = self.models.empty_image_embeds(1)
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
