"""Text-to-image and variations on the worker's shared SDXL models.

diffusers' own SDXL pipelines do the work (`StableDiffusionXLPipeline`, and
`StableDiffusionXLImg2ImgPipeline` for variations), built with `from_pipe`
over the loaded components, so no weight is held twice; prompts reach them
encoded as A1111 encodes them (any length, weights, BREAK: `prompt_encoding.py`).
A request for N
images is one batched call with one generator per image (image i gets seed
+ i): the same images as N calls one by one. The step callback reports
progress, sends small previews, and is where Cancel and the timeout stop
the job between steps.

The result, for every front end (the bot, the CLI, the HTTP API):

    {"images": [PNG bytes, ...] (each with its generation data, `modal_services.image_info.writing`),
     "seeds": [int, ...], "width": int, "height": int,
     "steps": int, "cfg": float, "sampler": str (A1111's name: "Euler a", "DPM++ 2M Karras"),
     "prompt": str (as run: trigger words added),
     "negative_prompt": str, "checkpoint": str (file stem), "loras": [{"name", "weight"}],
     "strength": float | None (variations), "generation_time_seconds": float,
     "notes": [str, ...] (what the reply says about how the prompt was read: Flux's),
     "face": None, or with a face image {"faces_found": int, "pose_faces_found": int | None,
              "identity_strength": float, "controlnet_strength": float}}

With a face image, InstantID (`modal_services.engines.sdxl.instantid`) conditions the
same pipelines' calls on that face; everything else (LoRAs, batches,
previews, Cancel, the timeout, the OOM retry) is this module's as for any
request.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.image_info.writing import with_generation_data
from modal_services.imaging import decode_image, encode_png
from modal_services.jobs.requests import GenerateRequest
from modal_services.engines.sdxl.instantid import FaceInputs, InstantId
from modal_services.jobs.records import ProgressFn
from modal_services.engines.sdxl.request_loras import RequestLoras
from modal_services.engines.sdxl.pipeline import (
    LoraSpec,
    PreviewFn,
    SdxlModels,
    latent_preview_jpeg,
    retry_smaller_on_oom,
)
from modal_services.engines.sdxl.prompt_encoding import SdxlPromptEncoder
from modal_services.engines.sdxl.samplers import job_scheduler, stepping_with, used_sampler

log = logging.getLogger(__name__)

PREVIEW_INTERVAL = 2.0
# A variation's start image is decoded with this bound (the largest request is 1536²).
MAX_START_PIXELS = 4 * 1536 * 1536


def latent_grid(latents):
    """(n, 4, h, w) latents side by side in a grid two wide, as one (1, 4, H, W) latent for a preview."""
    import torch

    if latents.shape[0] == 1:
        return latents
    tiles = list(latents[:4])
    if len(tiles) % 2:
        tiles.append(torch.zeros_like(tiles[0]))
    rows = [torch.cat(tiles[i : i + 2], dim=-1) for i in range(0, len(tiles), 2)]
    return torch.cat(rows, dim=-2)[None]


class StepReports:
    """What happens between denoising steps: the timeout, progress over every image, live previews.

    Cancel arrives through `progress`, which raises CANCELLED once a cancel is asked for.
    """

    def __init__(self, request: GenerateRequest, images: int, deadline: float, progress: ProgressFn,
                 preview: PreviewFn | None, preview_interval: float, render: Callable[[Any], bytes] | None = None):
        """`render`: the step's latents as a preview JPEG (SDXL's latents by default)."""
        self.request = request
        self.render = render or (lambda latents: latent_preview_jpeg(latent_grid(latents)))
        self.images = images
        self.deadline = deadline
        self.progress = progress
        self.preview = preview
        self.preview_interval = preview_interval
        self.last_preview = time.monotonic()

    def callback(self, first_image: int, images: int):
        """diffusers' `callback_on_step_end` for the call making images first_image .. first_image + images - 1."""
        def on_step(pipeline, step: int, timestep, tensors: dict) -> dict:
            if time.monotonic() > self.deadline:
                raise ToolboxError(
                    ErrorCode.TIMEOUT, f"Generating took longer than {self.request.timeout:g} s and was stopped."
                )
            total = pipeline.num_timesteps
            done = first_image * total + images * (step + 1)
            stage = f"step {step + 1}/{total}"
            if images < self.images:
                stage += f" · image {first_image + 1}/{self.images}"
            self.progress(0.05 + 0.9 * done / (total * self.images), stage)
            if self.preview is not None and time.monotonic() - self.last_preview >= self.preview_interval:
                self.preview(self.render(tensors["latents"]))
                self.last_preview = time.monotonic()
            return tensors

        return on_step


def generated_images(run: Callable[[int], list[bytes]], count: int, width: int, height: int,
                     progress: ProgressFn) -> list[bytes]:
    """`run(batch)` for all `count` images at once; after a CUDA out-of-memory error once more one image at a
    time. A failure that is not already a ToolboxError is GENERATION_FAILED."""
    try:
        return retry_smaller_on_oom(
            lambda one_at_a_time: run(1 if one_at_a_time else count), count > 1, "retrying one image at a time",
            f"The GPU ran out of memory at {width}×{height}: try a smaller size.", progress,
        )
    except ToolboxError:
        raise
    except Exception as exc:
        log.exception("generating %d image(s) failed", count)
        raise ToolboxError(ErrorCode.GENERATION_FAILED, f"The images could not be generated ({type(exc).__name__}).") from exc


def generation_result(request, images: list[bytes], seeds: list[int], prompt: str, specs: list[LoraSpec],
                      varied: bool, started: float, notes: list[str] = (), **model_fields: Any) -> dict:
    """The result described above, for `request` (SDXL's or Flux's); `model_fields`: cfg, negative_prompt, checkpoint."""
    return {
        "images": images, "seeds": seeds, "width": request.width, "height": request.height, "steps": request.steps,
        "prompt": prompt, "notes": list(notes), "loras": [{"name": spec.name, "weight": spec.weight} for spec in specs],
        "strength": request.strength if varied else None,
        "generation_time_seconds": round(time.monotonic() - started, 3), **model_fields,
    }


# How a request's own LoRA is named in the result's `loras`.
URL_LORA_NAME = "lora_url"


class TextToImage:
    def __init__(self, models: SdxlModels, request_loras: RequestLoras, instant_id: InstantId,
                 preview_interval: float = PREVIEW_INTERVAL):
        self.models = models
        self.request_loras = request_loras
        self.instant_id = instant_id
        self.preview_interval = preview_interval
        # (the loaded pipeline they were made from, text-to-image, img2img)
        self._pipes: tuple[Any, Any, Any] | None = None

    def generate(self, request: GenerateRequest, progress: ProgressFn, preview: PreviewFn | None = None) -> dict:
        """One GenerateRequest's images; returns the result described above.

        The worker parsed the request; the start image, the LoRA files, the
        checkpoint and the faces are checked here, before any denoising.
        """
        started = time.monotonic()
        specs = self.models.lora_specs(request.loras)
        start_image = None
        if request.image is not None:
            start_image = decode_image(request.image, max_pixels=MAX_START_PIXELS, name="The start image").image
        checkpoint_path = self.models.checkpoint_path(request.checkpoint)
        seeds = [request.seed + index for index in range(request.count)]
        prompt = request.encoder_prompt()
        faces = None
        if request.face_image is not None:
            progress(0.01, "reading the face")
            faces = self.instant_id.read(request.face_image, request.pose_image)

        # --- models for this job
        self.models.use_checkpoint(checkpoint_path, progress)
        if faces is not None:
            progress(0.02, "loading InstantID")
            self.instant_id.load()
        deadline = started + request.timeout
        if request.lora_url is not None:
            progress(0.02, "fetching the LoRA")
            # The job's Cancel and what is left of its timeout end the fetch too.
            path = self.request_loras.fetch(
                request.lora_url, request.lora_sha256, self.models.model_layout(), deadline_at=deadline,
                progress=lambda done, total: progress(0.02, f"fetching the LoRA · {done / 2**20:.0f} MiB"),
            )
            specs.append(LoraSpec(URL_LORA_NAME, path, weight=request.lora_scale))
        with self.models.loras(specs, progress):
            images = generated_images(
                lambda batch: self._run(request, prompt, seeds, start_image, faces, batch, deadline, progress, preview),
                len(seeds), request.width, request.height, progress,
            )
        face = None if faces is None else {
            **faces.summary(), "identity_strength": request.identity_strength,
            "controlnet_strength": request.controlnet_strength,
        }
        result = generation_result(request, images, seeds, prompt, specs, start_image is not None, started,
                                   cfg=request.cfg, negative_prompt=request.negative_prompt,
                                   sampler=used_sampler(request.sampler, self.models.pipe.scheduler),
                                   checkpoint=checkpoint_path.stem, face=face)
        return with_generation_data(result, self.models.pipe.scheduler, specs, checkpoint_path, self.models.models_dir)

    def _pipelines(self):
        """Text-to-image and img2img pipelines over the loaded components (rebuilt after a checkpoint switch)."""
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        source = self.models.pipe
        if self._pipes is None or self._pipes[0] is not source:
            # from_pipe casts the shared components to its `dtype` (float32 unless told): keep them in theirs.
            text_to_image = StableDiffusionXLPipeline.from_pipe(source, dtype=self.models.dtype)
            img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(source, dtype=self.models.dtype)
            for pipe in (text_to_image, img2img):
                pipe.set_progress_bar_config(disable=True)
            self._pipes = (source, text_to_image, img2img)
        return self._pipes[1], self._pipes[2]

    def _run(self, request: GenerateRequest, prompt: str, seeds: list[int], start_image, faces: FaceInputs | None,
             batch: int, deadline: float, progress: ProgressFn, preview: PreviewFn | None) -> list[bytes]:
        import torch
        from PIL import Image

        guided = request.cfg > 1  # negative and positive under classifier-free guidance, else positive alone
        if faces is None:
            text_to_image, img2img = self._pipelines()
            # IP-Adapter is loaded for the upscaler; here it is off and its image input is empty.
            text_to_image.set_ip_adapter_scale(0.0)
            image_embeds = [self.models.empty_image_embeds(2 if guided else 1)]
        else:
            text_to_image, img2img = self.instant_id.pipelines()
        chunks = [seeds[i : i + batch] for i in range(0, len(seeds), batch)]
        if start_image is None:
            pipe, inputs = text_to_image, {"width": request.width, "height": request.height}
        else:
            start = start_image.convert("RGB").resize((request.width, request.height), Image.Resampling.LANCZOS)
            pipe, inputs = img2img, {"image": start, "strength": request.strength}

        def conditioning(images: int):
            """The call's image conditioning: the empty IP-Adapter input, or InstantID's face."""
            if faces is None:
                return contextlib.nullcontext({"ip_adapter_image_embeds": image_embeds})
            return self.instant_id.conditioned(
                pipe, faces, images, request.width, request.height, guided, request.identity_strength,
                request.controlnet_strength, variation=start_image is not None,
            )

        with torch.inference_mode():
            text = SdxlPromptEncoder(pipe).conditioning([prompt], request.negative_prompt, guided)[0]
        steps = StepReports(request, len(seeds), deadline, progress, preview, self.preview_interval)
        images: list[bytes] = []
        for chunk in chunks:
            on_step = steps.callback(first_image=chunk[0] - seeds[0], images=len(chunk))
            # Each call steps a scheduler of its own: nothing of another call's carries into it.
            scheduler = job_scheduler(request.sampler, self.models.pipe.scheduler, chunk)
            with conditioning(len(chunk)) as condition, stepping_with(pipe, scheduler), torch.inference_mode():
                output = pipe(
                    **text.pipeline_arguments(), num_inference_steps=request.steps, guidance_scale=request.cfg,
                    num_images_per_prompt=len(chunk),
                    generator=[torch.Generator("cpu").manual_seed(seed) for seed in chunk],
                    callback_on_step_end=on_step, **inputs, **condition,
                )
            images += [encode_png(image) for image in output.images]
        return images
