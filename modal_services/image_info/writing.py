"""Every result PNG a worker makes carries how it was made, in A1111's `parameters` text chunk.

So CivitAI, A1111/Forge's PNG Info, ComfyUI and the toolbox's own Image info
read it: the prompt as the encoders read it (trigger words added) with each
LoRA as `<lora:name:weight>`, the negative prompt, then Steps, Sampler (and
Schedule type), CFG scale, Seed, Size, Model hash (CivitAI's AutoV2),
Model, Denoising strength (variations, upscales), Lora hashes and Version, in
A1111's order. A hash is written only where the toolbox recorded the file's
sha256 (`model_hashes`). The chunk is added to the encoded PNG as it is: no
pixel is encoded again.

The sampler is the result's own `sampler` when it names one, written as the
sampler table says A1111 writes it (`modal_services.jobs.samplers`), else
what the pipeline's scheduler is called in A1111 ("Euler" for EulerDiscreteScheduler).
A guidance-distilled model (Flux) is written as Forge writes it: `CFG scale: 1`
and its guidance as `Distilled CFG Scale`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from modal_services import __version__
from modal_services.image_info.containers import with_png_text
from modal_services.image_info.infotext import infotext, lora_alias, lora_tags, split_sampler
from modal_services.image_info.model_hashes import autov2, recorded_sha256
from modal_services.image_info.reading import PARAMETERS_KEY
from modal_services.jobs.samplers import SAMPLERS

VERSION = f"AI Toolbox {__version__}"
# diffusers' schedulers by A1111's names; DPMSolverMultistepScheduler's depends on its configuration.
SCHEDULER_SAMPLERS = {
    "EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler a", "HeunDiscreteScheduler": "Heun",
    "LMSDiscreteScheduler": "LMS", "KDPM2DiscreteScheduler": "DPM2", "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "DPMSolverSDEScheduler": "DPM++ SDE", "DPMSolverSinglestepScheduler": "DPM++ 2S", "DDIMScheduler": "DDIM",
    "UniPCMultistepScheduler": "UniPC", "PNDMScheduler": "PLMS", "LCMScheduler": "LCM",
    "DEISMultistepScheduler": "DEIS", "FlowMatchEulerDiscreteScheduler": "Euler",
}
# The sigma schedules diffusers' schedulers take as options, by A1111's schedule types.
SCHEDULE_OPTIONS = {"use_karras_sigmas": "Karras", "use_exponential_sigmas": "Exponential", "use_beta_sigmas": "Beta"}


class UsedLora(Protocol):
    """A LoRA a job ran with (`LoraSpec`): its name in the result, its file and weight."""

    name: str
    path: Path
    weight: float


@dataclass(frozen=True)
class MadeWith:
    """What one job's images were made with; each image adds its seed."""

    prompt: str
    negative_prompt: str
    steps: int
    cfg: float
    width: int
    height: int
    sampler: tuple[str, str | None]
    model: str
    loras: Sequence[UsedLora]
    checkpoint_file: Path | None = None
    models_dir: Path | None = None
    denoising_strength: float | None = None
    # `cfg` is a distilled model's guidance, not classifier-free guidance.
    distilled_guidance: bool = False

    def text(self, seed: int) -> str:
        """The `parameters` text of the image made from `seed`."""
        checkpoint_sha256 = recorded_sha256(self.checkpoint_file, self.models_dir) if self.checkpoint_file else None
        hashes = [(lora.name, autov2(recorded_sha256(lora.path, self.models_dir))) for lora in self.loras]
        lora_hashes = ", ".join(f"{lora_alias(name)}: {short}" for name, short in hashes if short)
        sampler, schedule = self.sampler
        prompt = " ".join(part for part in (self.prompt, lora_tags([(l.name, l.weight) for l in self.loras])) if part)
        cfg, distilled = (1, self.cfg) if self.distilled_guidance else (self.cfg, None)
        return infotext(prompt, self.negative_prompt, {
            "Steps": self.steps, "Sampler": sampler, "Schedule type": schedule, "CFG scale": f"{cfg:g}",
            "Seed": seed, "Size": f"{self.width}x{self.height}", "Model hash": autov2(checkpoint_sha256),
            "Model": self.model, "Denoising strength": self.denoising_strength,
            "Distilled CFG Scale": None if distilled is None else f"{distilled:g}", "Lora hashes": lora_hashes or None,
            "Version": VERSION,
        })

    def tagged(self, png: bytes, seed: int) -> bytes:
        return with_png_text(png, PARAMETERS_KEY, self.text(seed))


def sampler_of(scheduler: Any, named: str | None = None) -> tuple[str, str | None]:
    """(sampler, schedule type) in A1111's names: `named` when the job named one, else the scheduler's."""
    if named:
        return SAMPLERS[named].infotext if named in SAMPLERS else split_sampler(named)
    config = getattr(scheduler, "config", {}) or {}
    kind = type(scheduler).__name__
    if kind == "DPMSolverMultistepScheduler":
        order = {1: "1", 2: "2M", 3: "3M"}.get(config.get("solver_order", 2), "2M")
        sde = " SDE" if str(config.get("algorithm_type", "")).startswith("sde") else ""
        sampler = f"DPM++ {order}{sde}"
    else:
        sampler = SCHEDULER_SAMPLERS.get(kind, kind.removesuffix("Scheduler"))
    schedule = next((name for option, name in SCHEDULE_OPTIONS.items() if config.get(option)), None)
    return sampler, schedule


def with_generation_data(result: dict, scheduler: Any, loras: Sequence[UsedLora], checkpoint_file: Path | None = None,
                         models_dir: Path | None = None, distilled_guidance: bool = False) -> dict:
    """A text-to-image result (`engines.sdxl.generate`'s shape) whose every image carries its `parameters`;
    `distilled_guidance`: the result's `cfg` is a guidance-distilled model's guidance (Flux)."""
    made = MadeWith(
        prompt=result["prompt"], negative_prompt=result.get("negative_prompt") or "", steps=result["steps"],
        cfg=result["cfg"], width=result["width"], height=result["height"],
        sampler=sampler_of(scheduler, result.get("sampler")), model=result["checkpoint"], loras=loras,
        checkpoint_file=checkpoint_file, models_dir=models_dir, denoising_strength=result.get("strength"),
        distilled_guidance=distilled_guidance,
    )
    return {**result, "images": [made.tagged(png, seed) for png, seed in zip(result["images"], result["seeds"])]}
