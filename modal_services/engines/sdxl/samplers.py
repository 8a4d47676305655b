"""Each SDXL denoising run's scheduler: a new one, built from the loaded pipeline's own scheduler config.

The loaded pipeline's scheduler is never stepped nor changed: it is the
config every job's scheduler starts from (`from_config(config, **options)`
makes a new config), and a run steps a scheduler no other run has touched,
so nothing of one job (a sampler's options, its step index, its last model
outputs, a Brownian tree) reaches the next. A run that names no sampler gets
a new scheduler of the config's own class (SDXL's: EulerDiscreteScheduler,
A1111's "Euler").

Seeded noise: the ancestral and `sde-dpmsolver++` schedulers draw each step's
noise from the generators a run passes to `step` (one per image, seeded like
the image); DPMSolverSDEScheduler draws it from torchsde's Brownian tree,
seeded by its `noise_sampler_seed` (random when None), which is set to the
images' seeds, one tree per image. So an image is the same whatever batch it
is made in, and the same seed gives the same pixels.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

from modal_services.image_info.infotext import joined_sampler
from modal_services.image_info.writing import sampler_of
from modal_services.jobs.samplers import SAMPLERS


def job_scheduler(sampler: str | None, base: Any, seeds: list[int]) -> Any:
    """A new scheduler for one run making the images of `seeds`: the table's `sampler` built on `base`'s config,
    or (None) a new one of `base`'s own class."""
    import diffusers

    if sampler is None:
        scheduler = type(base).from_config(base.config)
    else:
        chosen = SAMPLERS[sampler]
        scheduler = getattr(diffusers, chosen.scheduler).from_config(base.config, **chosen.options)
    if hasattr(scheduler, "noise_sampler_seed"):
        # A list: one Brownian tree per image (diffusers' BatchedBrownianTree), each from the image's seed.
        scheduler.noise_sampler_seed = list(seeds)
    return scheduler


def used_sampler(sampler: str | None, base: Any) -> str:
    """What a result reports: the sampler the job named, else the A1111 name of `base`'s own scheduler."""
    return sampler or joined_sampler(*sampler_of(base))


@contextlib.contextmanager
def stepping_with(pipe: Any, scheduler: Any) -> Iterator[None]:
    """`pipe` (a pipeline sharing the loaded one's components) steps with `scheduler` inside the block, and with
    the scheduler it had after it, however the block ends."""
    own = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = own


def step_noise(scheduler: Any, generator: Any) -> dict[str, Any]:
    """The `generator` argument of `scheduler.step`, for the schedulers whose steps draw noise from one
    (as diffusers' pipelines pass it): {} for the others."""
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
