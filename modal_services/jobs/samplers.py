"""The samplers an SDXL job may name, by the names A1111, Forge and CivitAI taught people, and the diffusers
scheduler each one is.

One table: the front ends offer its names (the CLI's help reads this module
without torch or pydantic), the request refuses any other, the engine builds
the scheduler from the class and options (`engines.sdxl.samplers`), and the
PNG's generation data writes each as A1111 writes it. The mapping follows
diffusers' schedulers overview ("A1111/k-diffusion → Diffusers"): Karras is
`use_karras_sigmas=True`, A1111's "2M SDE" is DPMSolverMultistepScheduler
with `algorithm_type="sde-dpmsolver++"`, its "SDE" DPMSolverSDEScheduler
(which draws its noise from torchsde's Brownian tree).

`infotext` is the (Sampler, Schedule type) pair the PNG carries. A1111 from
1.9 on gives DPM++ 2M and DPM++ SDE the Karras schedule when none is written
(DPM++ 2M SDE the exponential one), so the plain forms name their "Uniform"
schedule: written otherwise, A1111 would remake them with another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# What an edit gives as a checkpoint's sampler to clear it (the base checkpoint's applies again).
NO_SAMPLER = "none"
# Longer is no sampler's name; a request's text is cut to this before it is quoted back.
MAX_SAMPLER_CHARS = 40


@dataclass(frozen=True)
class Sampler:
    name: str
    # The diffusers scheduler class (by name: this module imports no diffusers) and its options.
    scheduler: str
    options: dict[str, object] = field(default_factory=dict)
    infotext: tuple[str, str | None] = ("", None)
    # A1111's own short names for it (`k_euler_a`), as its API and old infotexts write them.
    aliases: tuple[str, ...] = ()


KARRAS = {"use_karras_sigmas": True}
SDE = {"algorithm_type": "sde-dpmsolver++"}

SAMPLERS: dict[str, Sampler] = {sampler.name: sampler for sampler in (
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", infotext=("Euler a", None),
            aliases=("k_euler_a", "k_euler_ancestral")),
    Sampler("Euler", "EulerDiscreteScheduler", infotext=("Euler", None), aliases=("k_euler",)),
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", infotext=("DPM++ 2M", "Uniform"), aliases=("k_dpmpp_2m",)),
    Sampler("DPM++ 2M Karras", "DPMSolverMultistepScheduler", KARRAS, infotext=("DPM++ 2M", "Karras"),
            aliases=("k_dpmpp_2m_ka",)),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", SDE, infotext=("DPM++ 2M SDE", "Uniform"),
            aliases=("k_dpmpp_2m_sde",)),
    Sampler("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler", {**SDE, **KARRAS},
            infotext=("DPM++ 2M SDE", "Karras"), aliases=("k_dpmpp_2m_sde_ka",)),
    Sampler("DPM++ SDE", "DPMSolverSDEScheduler", infotext=("DPM++ SDE", "Uniform"), aliases=("k_dpmpp_sde",)),
    Sampler("DPM++ SDE Karras", "DPMSolverSDEScheduler", KARRAS, infotext=("DPM++ SDE", "Karras"),
            aliases=("k_dpmpp_sde_ka",)),
    Sampler("UniPC", "UniPCMultistepScheduler", infotext=("UniPC", None)),
    Sampler("DDIM", "DDIMScheduler", infotext=("DDIM", None)),
)}
SAMPLER_NAMES = tuple(SAMPLERS)


def _spellings(sampler: Sampler) -> tuple[str, ...]:
    """Every way a sampler is written: its name, its aliases, and its infotext pair joined ("DPM++ 2M Uniform")."""
    written, schedule = sampler.infotext
    return (sampler.name, *sampler.aliases, f"{written} {schedule}" if schedule else written)


_BY_SPELLING = {spelling.casefold(): sampler.name for sampler in SAMPLERS.values() for spelling in _spellings(sampler)}


def sampler_named(text: str | None) -> str | None:
    """The table's name for `text` (any case, an A1111 alias, or A1111's sampler and schedule type joined), or
    None when it is none of them."""
    return _BY_SPELLING.get(" ".join((text or "").split()).casefold())


def unknown_sampler(text: str) -> str:
    """The one message for a sampler that is not in the table, with every name there is."""
    shown = text if len(text) <= MAX_SAMPLER_CHARS else text[:MAX_SAMPLER_CHARS] + "…"
    return f"The sampler must be one of {', '.join(SAMPLER_NAMES)} (got {shown!r})."
