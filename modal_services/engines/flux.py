"""FLUX.1-dev text-to-image and variations, with Flux LoRAs.

diffusers' `FluxPipeline` does the work, loaded from `models/flux1-dev/` (the
diffusers layout of black-forest-labs/FLUX.1-dev), and `FluxImg2ImgPipeline`
built over the same components with `from_pipe` for variations. As on SDXL,
a request for N images is one batched call with one generator per image
(image i gets seed + i, the same images as N calls one by one); the step
callback (`StepReports`, shared with SDXL) reports progress, sends previews
and is where Cancel and the timeout stop the job; a CUDA out-of-memory error
is retried once one image at a time. LoRAs are named adapters for one job,
unloaded when it ends, however it ends.

Precision (`TOOLBOX_FLUX_PRECISION`): bf16 where the GPU has the memory (about
36 GB at the peak of a 1024² image), else the transformer quantised: fp8
weight-only (torchao) on GPUs of compute capability 8.9 or more, NF4
(bitsandbytes) on older 24 GB cards. diffusers cannot reliably add LoRA layers
to a quantised transformer, so LoRAs are refused there with the reason.

Prompts: T5 reads up to MAX_SEQUENCE_LENGTH (512) tokens, the most FLUX.1-dev
was trained with (and what this engine has always asked for); CLIP's pooled
embedding reads the first 77, as in every Flux front end. Flux has no use for
A1111's weights or BREAK, so they are removed (`plain_text`) and the reply
says so; a prompt still longer than T5's tokens says where it was cut.

The result has the SDXL generate result's shape (`modal_services.engines.sdxl.generate`),
with `cfg` the guidance, `negative_prompt` empty and `checkpoint` "flux1-dev".
"""

from __future__ import annotations

import logging
import os
import time

from modal_services.engines.loading import loading
from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.engines.sdxl.generate import (
    MAX_START_PIXELS,
    PREVIEW_INTERVAL,
    StepReports,
    generated_images,
    generation_result,
    latent_grid,
)
from modal_services.image_info.writing import with_generation_data
from modal_services.imaging import decode_image, encode_png
from modal_services.jobs.prompt_syntax import plain_text
from modal_services.jobs.requests import FluxGenerateRequest
from modal_services.jobs.records import ProgressFn
from modal_services.layout import FLUX_DIR, LORAS_SUBDIR, Layout
from modal_services.engines.sdxl.pipeline import LoraSpec, PreviewFn, job_adapters, latent_preview_jpeg

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp8", "nf4")
QUANTISED = ("fp8", "nf4")
PRECISION_SETTING = "TOOLBOX_FLUX_PRECISION"
# bf16 weights (transformer 23.8 GB, T5 9.5 GB) peak at about 36 GB for one 1024² image.
BF16_MIN_GPU_GB = 40
# torchao's fp8 kernels pay off from Ada / Hopper on (L4, L40S, H100); older cards get NF4.
FP8_MIN_CAPABILITY = (8, 9)
# FLUX.1-dev was trained with T5 prompts of up to 512 tokens.
MAX_SEQUENCE_LENGTH = 512
# How much of the prompt a note about a cut quotes on each side of it.
QUOTED_CHARACTERS = 40
MODEL_NAME = "flux1-dev"

# ComfyUI's linear map from Flux's 16 latent channels to RGB: a thumbnail without the VAE.
FLUX_LATENT_RGB = [
    [-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433], [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115], [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180], [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499], [-0.1262, -0.0982, -0.0778],
]
FLUX_LATENT_RGB_BIAS = [-0.0329, -0.0718, -0.0851]

# Files `load()` needs, relative to the model folder.
FLUX_REQUIRED_FILES = (
    "model_index.json", "scheduler/scheduler_config.json", "transformer/config.json", "transformer/*.safetensors",
    "text_encoder/config.json", "text_encoder/*.safetensors", "text_encoder_2/config.json",
    "text_encoder_2/*.safetensors", "tokenizer/*", "tokenizer_2/*", "vae/config.json", "vae/*.safetensors",
)


def choose_precision(setting: str | None, on_gpu: bool, memory_gb: float = 0.0,
                     capability: tuple[int, int] = (0, 0)) -> str:
    """The precision to load at: the setting, or for `auto` the best the GPU holds (fp32 on a CPU)."""
    wanted = (setting or "auto").strip().lower()
    if wanted not in PRECISIONS:
        raise ToolboxError(
            ErrorCode.INVALID_INPUT, f"{PRECISION_SETTING} is one of {', '.join(PRECISIONS)}, not {setting!r}."
        )
    if not on_gpu:
        if wanted in QUANTISED:
            raise ToolboxError(ErrorCode.MODEL_LOAD_FAILED, f"Flux at {wanted} needs a CUDA GPU; this worker has none.")
        return "fp32" if wanted == "auto" else wanted
    if wanted != "auto":
        return wanted
    if memory_gb >= BF16_MIN_GPU_GB:
        return "bf16"
    return "fp8" if tuple(capability) >= FP8_MIN_CAPABILITY else "nf4"


# (memory in GB, compute capability) of the GPU types a worker is deployed on, by Modal's names.
GPU_SPECS = {
    "T4": (16, (7, 5)), "L4": (24, (8, 9)), "A10G": (24, (8, 6)), "A10": (24, (8, 6)), "L40S": (48, (8, 9)),
    "A100": (40, (8, 0)), "A100-40GB": (40, (8, 0)), "A100-80GB": (80, (8, 0)), "H100": (80, (9, 0)),
    "H200": (141, (9, 0)), "B200": (180, (10, 0)),
}


def precision_for_gpu(gpu: str, setting: str | None) -> str:
    """`choose_precision` for a GPU named as at deploy time ("L40S", "a10g", "H100:2"), before any is attached."""
    memory_gb, capability = GPU_SPECS.get(gpu.split(":")[0].upper(), (0, (0, 0)))
    return choose_precision(setting, True, memory_gb, capability)


def gpu_precision(setting: str | None, device: str) -> str:
    """`choose_precision` for the GPU torch sees (the local backend on someone's own machine)."""
    import torch

    if not device.startswith("cuda"):
        return choose_precision(setting, on_gpu=False)
    properties = torch.cuda.get_device_properties(torch.device(device))
    return choose_precision(setting, True, properties.total_memory / 1e9, (properties.major, properties.minor))


def transformer_quantization(precision: str):
    """diffusers' quantisation config for the transformer at `precision` (None: unquantised)."""
    import torch

    if precision == "fp8":
        from diffusers import TorchAoConfig
        from torchao.quantization import Float8WeightOnlyConfig

        return TorchAoConfig(Float8WeightOnlyConfig())
    if precision == "nf4":
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return None


def flux_preview_jpeg(latents, height: int, width: int, vae_scale_factor: int) -> bytes:
    """A small JPEG of packed Flux latents (n, tokens, channels): unpacked, up to four in a grid."""
    from diffusers import FluxPipeline

    unpacked = FluxPipeline._unpack_latents(latents, height, width, vae_scale_factor)
    channels = unpacked.shape[1]
    if channels == len(FLUX_LATENT_RGB):
        factors, bias = FLUX_LATENT_RGB, FLUX_LATENT_RGB_BIAS
    else:
        # A VAE of another width (a distilled or a test model): grey from the channels' mean.
        factors, bias = [[1.0 / channels] * 3] * channels, [0.0, 0.0, 0.0]
    return latent_preview_jpeg(latent_grid(unpacked), factors=factors, bias=bias)


def flux_prompt(prompt: str, t5_tokenizer) -> tuple[str, list[str]]:
    """(the text Flux reads for `prompt`, what the reply says about it): A1111's weights and BREAK removed
    with a note; a note saying where T5 stops reading a prompt longer than MAX_SEQUENCE_LENGTH tokens."""
    text = plain_text(prompt)
    notes = []
    if text != prompt:
        notes.append("Flux does not use prompt weights or BREAK: the prompt was read without them "
                     "(write \\( and \\) for a bracket Flux should see).")
    tokens = t5_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    read = MAX_SEQUENCE_LENGTH - 1  # the end token takes the last place
    if len(tokens.input_ids) > read:
        cut = tokens.offset_mapping[read][0]
        notes.append(f"The prompt is longer than the {MAX_SEQUENCE_LENGTH} tokens Flux reads: it was read up to "
                     f"“…{text[:cut][-QUOTED_CHARACTERS:].lstrip()}”, and from "
                     f"“{text[cut:][:QUOTED_CHARACTERS].rstrip()}…” on it was left out.")
    return text, notes


class FluxEngine:
    """FLUX.1-dev loaded once per worker, and each job's LoRAs."""

    def __init__(self, layout: Layout, device: str | None = None, precision: str | None = None,
                 preview_interval: float = PREVIEW_INTERVAL):
        self.model_dir = layout.models_dir / FLUX_DIR
        self.lora_folder = layout.loras_dir / LORAS_SUBDIR if layout.loras_dir else None
        self.device = device
        # The setting; `self.precision` is what it resolved to at load.
        self.precision_setting = precision if precision is not None else os.environ.get(PRECISION_SETTING, "auto")
        self.precision: str | None = None
        self.preview_interval = preview_interval
        self.loaded = False
        self.placement: str | None = None
        self.pipe = None
        self._img2img = None

    # ------------------------------------------------------------------ loading

    def missing_files(self) -> list[str]:
        return [pattern for pattern in FLUX_REQUIRED_FILES if not any(self.model_dir.glob(pattern))]

    def missing_models(self, request: FluxGenerateRequest) -> list[str]:
        """What a job needs that the volume lacks: FLUX.1-dev's files until it is loaded."""
        missing = [] if self.loaded else self.missing_files()
        return [f"flux1-dev, an optional model ({', '.join(missing)}; {remedies.enable('flux1-dev')})"] if missing else []

    def resolve_precision(self) -> str:
        import torch

        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = gpu_precision(self.precision_setting, self.device)
        return self.precision

    @property
    def can_stage(self) -> bool:
        """Whether the weights can wait in host memory (for a memory snapshot): a quantised
        transformer is quantised as it loads onto the GPU, so it cannot."""
        return self.precision not in QUANTISED

    def load(self, staging_device: str | None = None) -> None:
        """Load onto `device`, or only into `staging_device` (host memory, before a GPU is attached; `place()` moves it)."""
        missing = self.missing_files()
        if missing:
            raise ToolboxError(
                ErrorCode.MODELS_MISSING,
                f"FLUX.1-dev is not installed (missing in {FLUX_DIR}/: {', '.join(missing)}): "
                f"{remedies.enable('flux1-dev')}.",
            )
        import torch
        from diffusers import FluxImg2ImgPipeline, FluxPipeline, FluxTransformer2DModel

        if self.precision is None:
            self.resolve_precision()
        dtype = torch.float32 if self.precision == "fp32" else torch.bfloat16
        quantization = transformer_quantization(self.precision)
        with loading("FLUX.1-dev", self.model_dir, at=f" at {self.precision}"):
            parts = {}
            if quantization is not None:
                parts["transformer"] = FluxTransformer2DModel.from_pretrained(
                    self.model_dir, subfolder="transformer", quantization_config=quantization, dtype=dtype,
                    local_files_only=True,
                )
            pipe = FluxPipeline.from_pretrained(self.model_dir, dtype=dtype, local_files_only=True, **parts)
        self.placement = staging_device if (staging_device and self.can_stage) else self.device
        pipe.to(self.placement)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        # from_pipe casts the shared components to its `dtype` (float32 unless told).
        self._img2img = FluxImg2ImgPipeline.from_pipe(pipe, dtype=dtype)
        self._img2img.set_progress_bar_config(disable=True)
        self.loaded = True

    def place(self) -> None:
        """Move staged weights to `device` (a no-op once they are there)."""
        if self.placement != self.device:
            self.pipe.to(self.device)
            self.placement = self.device

    # ------------------------------------------------------------------ the job

    def generate(self, request: FluxGenerateRequest, progress: ProgressFn, preview: PreviewFn | None = None) -> dict:
        """One FluxGenerateRequest's images (the request parsed by the worker)."""
        started = time.monotonic()
        specs = [LoraSpec.of(lora, self.lora_folder) for lora in request.loras]
        if specs and self.precision in QUANTISED:
            raise ToolboxError(
                ErrorCode.LORA_LOAD_FAILED,
                f"LoRAs cannot be used with Flux on this worker: its transformer is quantised to {self.precision}, "
                "and diffusers cannot apply LoRAs to it reliably. Generate without LoRAs, or deploy Flux at bf16 "
                f"({PRECISION_SETTING}=bf16 on a GPU with {BF16_MIN_GPU_GB} GB or more).",
            )
        start_image = None
        if request.image is not None:
            start_image = decode_image(request.image, max_pixels=MAX_START_PIXELS, name="The start image").image
        seeds = [request.seed + index for index in range(request.count)]
        prompt, notes = flux_prompt(request.encoder_prompt(), self.pipe.tokenizer_2)
        if self.placement != self.device:
            progress(0.01, "moving the models to the GPU")
            self.place()
        with self.loras(specs, progress):
            deadline = started + request.timeout
            images = generated_images(
                lambda batch: self._run(request, prompt, seeds, start_image, batch, deadline, progress, preview),
                len(seeds), request.width, request.height, progress,
            )
        result = generation_result(request, images, seeds, prompt, specs, start_image is not None, started,
                                   notes=notes, cfg=request.guidance, negative_prompt="", checkpoint=MODEL_NAME)
        return with_generation_data(result, self.pipe.scheduler, specs, distilled_guidance=True)

    def loras(self, specs: list[LoraSpec], progress: ProgressFn):
        """The job's LoRAs active inside the block; all unloaded when it ends, however it ends."""
        # The unload also restores any layer a LoRA widened (diffusers does that for Flux Control LoRAs).
        return job_adapters(self.pipe, specs, progress, self._load_adapter,
                            lambda: self.pipe.unload_lora_weights(reset_to_overwritten_params=True))

    def _load_adapter(self, spec: LoraSpec, name: str) -> None:
        try:
            self.pipe.load_lora_weights(str(spec.path), adapter_name=name)
        except Exception as exc:
            log.warning("Flux LoRA %s (%s) failed to load: %s", spec.name, spec.path, exc)
            raise ToolboxError(
                ErrorCode.LORA_LOAD_FAILED,
                f"The LoRA {spec.name!r} could not be loaded into Flux ({type(exc).__name__}: {str(exc)[:160]}).",
            ) from exc

    def _run(self, request: FluxGenerateRequest, prompt: str, seeds: list[int], start_image, batch: int,
             deadline: float, progress: ProgressFn, preview: PreviewFn | None) -> list[bytes]:
        import torch
        from PIL import Image

        if start_image is None:
            pipe, inputs = self.pipe, {}
        else:
            start = start_image.convert("RGB").resize((request.width, request.height), Image.Resampling.LANCZOS)
            pipe, inputs = self._img2img, {"image": start, "strength": request.strength}
        scale = self.pipe.vae_scale_factor
        steps = StepReports(
            request, len(seeds), deadline, progress, preview, self.preview_interval,
            render=lambda latents: flux_preview_jpeg(latents, request.height, request.width, scale),
        )
        images: list[bytes] = []
        for chunk in [seeds[i : i + batch] for i in range(0, len(seeds), batch)]:
            on_step = steps.callback(first_image=chunk[0] - seeds[0], images=len(chunk))
            with torch.inference_mode():
                output = pipe(
                    prompt=prompt, width=request.width, height=request.height, num_inference_steps=request.steps,
                    guidance_scale=request.guidance, num_images_per_prompt=len(chunk),
                    generator=[torch.Generator("cpu").manual_seed(seed) for seed in chunk],
                    max_sequence_length=MAX_SEQUENCE_LENGTH, callback_on_step_end=on_step, **inputs,
                )
            images += [encode_png(image) for image in output.images]
        return images
