"""From the settings an image carries to a /generate on this bot: what Image info's button submits.

The image's checkpoint and LoRAs are looked up in the library by CivitAI
model version id (where the image and the entry both have one), else by hash
(CivitAI's AutoV2, or a full sha256), else by name: a checkpoint found is
generated with, LoRAs found are applied, and those not found are named (with
their version ids, for an import). Values outside what a generate request
takes are brought within it, each change said in a note; what this bot cannot
apply (a sampler it does not have, a checkpoint it lacks) is said too.
A prompt too long for a request cannot be remade: `problem` says so. The
result is the parameters the front ends give the one request builder
(`bot.core.build`), which checks them as it checks any /generate.

Discord-free: the cog and `toolbox info` use it alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.core.generate_models import FLUX, SDXL, TextToImageModel
from modal_services.errors import ToolboxError
from modal_services.image_info.model_hashes import AUTOV2_DIGITS
from modal_services.image_info.settings import GenerationSettings, LoraUse, as_float
from modal_services.jobs.requests import MAX_SEED, LoraRef
from modal_services.jobs.samplers import sampler_named
from modal_services.jobs.validation import field_bounds
from modal_services.library.entries import Library, LibraryEntry

# A generate request's sides are multiples of this.
SIDE_STEP = 64
# What A1111 and Forge call Flux's guidance (their CFG scale is 1 for Flux).
FLUX_GUIDANCE_FIELD = "Distilled CFG Scale"


@dataclass
class Remake:
    """The /generate an image's settings make here: `params` as the generate cog keeps a result's (prompt,
    negative, width, height, steps, cfg, sampler, seed, model, loras as [{name: library file, weight}], and
    checkpoint: the library file of the image's, when found), the image's LoRAs found in the library and those
    missing, and notes on what changed; `problem` when none can be made."""

    params: dict[str, Any] = field(default_factory=dict)
    found: list[tuple[LoraUse, LibraryEntry]] = field(default_factory=list)
    missing: list[LoraUse] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problem: str | None = None
    # The image's checkpoint when the library lacks it (its name), and CivitAI's version id for it.
    missing_checkpoint: str | None = None
    missing_checkpoint_version: int | None = None

    def importable(self) -> list[tuple[str, int]]:
        """(name, CivitAI model version id) of each missing resource an import could add."""
        checkpoint = [(self.missing_checkpoint or "", self.missing_checkpoint_version)]
        return [(name, version) for name, version in checkpoint + [(lora.name, lora.version_id) for lora in self.missing]
                if version is not None]


async def plan_generate(settings: GenerationSettings, library: Library) -> Remake:
    """What a /generate with `settings` would be on this bot (nothing is submitted)."""
    model = FLUX if "flux" in (settings.model or "").lower() else SDXL
    remake = Remake()
    remake.problem = _prompt_problem(settings, model)
    if remake.problem:
        return remake
    negative = settings.negative_prompt
    if negative and model is FLUX:
        remake.notes.append("Flux takes no negative prompt: the image's is left out.")
        negative = ""
    remake.params = {"prompt": settings.prompt, "negative": negative or None, "model": model.key,
                     **_size(settings, model, remake.notes), "steps": _within(model, "steps", settings.steps, remake.notes),
                     "cfg": _within(model, model.cfg_field, _guidance(settings, model), remake.notes),
                     "seed": _seed(settings.seed, remake.notes)}
    await _match_loras(settings.loras, library, model, remake)
    remake.params["loras"] = [{"name": entry.file, "weight": _lora_weight(lora, remake.notes)}
                              for lora, entry in remake.found]
    remake.params |= _sampler(settings.sampler, model, remake.notes)
    if model is SDXL and (settings.model or settings.model_hash or settings.model_version_id):
        await _match_checkpoint(settings, library, remake)
    return remake


def _sampler(written: str | None, model: TextToImageModel, notes: list[str]) -> dict[str, str | None]:
    """{"sampler": the image's when this bot has it, else None: the checkpoint's} for a model that takes one,
    else {}; a sampler not applied is said in a note."""
    if not model.takes_sampler:
        if written:
            notes.append(f"Sampler {written}: not applied, {model.name} runs on its own scheduler.")
        return {}
    name = sampler_named(written)
    if written and name is None:
        notes.append(f"Sampler {written}: not one this bot has, the checkpoint's sampler is used.")
    return {"sampler": name}


def _prompt_problem(settings: GenerationSettings, model: TextToImageModel) -> str | None:
    if not settings.prompt.strip():
        return "The image gives no prompt to generate from."
    texts = [("prompt", settings.prompt)] + ([("negative_prompt", settings.negative_prompt)] if model is SDXL else [])
    for name, text in texts:
        longest = field_bounds(model.request, name)[1]
        if len(text) > longest:
            return f"The image's {name.replace('_', ' ')} is {len(text)} characters; a generate request takes at most {longest}."
    return None


def _within(model: TextToImageModel, name: str, value: float | None, notes: list[str]) -> float | None:
    """`value` within the request field's range (None stays None: the default applies), a change noted."""
    if value is None:
        return None
    low, high = field_bounds(model.request, name)
    kept = min(max(value, low), high)
    if kept != value:
        notes.append(f"{_label(name)} {value:g} is outside {low:g}-{high:g} here: {kept:g} is used.")
    return kept


def _label(name: str) -> str:
    return {"steps": "Steps", "cfg": "CFG", "guidance": "Guidance"}.get(name, name)


def _guidance(settings: GenerationSettings, model: TextToImageModel) -> float | None:
    """How closely to follow the prompt: Flux's guidance is A1111's `Distilled CFG Scale` when it wrote one."""
    if model is FLUX:
        return as_float(settings.other.get(FLUX_GUIDANCE_FIELD)) or settings.cfg
    return settings.cfg


def _size(settings: GenerationSettings, model: TextToImageModel, notes: list[str]) -> dict[str, int]:
    """{width, height} within the model's sides (multiples of 64), or {} for the default size."""
    if not settings.width or not settings.height:
        return {}
    low, high = field_bounds(model.request, "width")
    width, height = (min(max(round(side / SIDE_STEP) * SIDE_STEP, low), high) for side in (settings.width, settings.height))
    if (width, height) != (settings.width, settings.height):
        notes.append(f"Size {settings.width}×{settings.height} is not one {model.name} makes: {width}×{height} is used.")
    return {"width": width, "height": height}


def _seed(seed: int | None, notes: list[str]) -> int | None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        notes.append(f"Seed {seed} is outside 0-{MAX_SEED}: a random seed is used.")
        return None
    return seed


def _lora_weight(lora: LoraUse, notes: list[str]) -> float | None:
    """The image's weight within what a LoRA reference takes; None: the library's recommended weight."""
    if lora.weight is None:
        return None
    low, high = field_bounds(LoraRef, "weight")
    kept = min(max(lora.weight, low), high)
    if kept != lora.weight:
        notes.append(f"LoRA {lora.name} at {lora.weight:g} is outside {low:g}-{high:g}: {kept:g} is used.")
    return kept


async def _match_loras(loras: list[LoraUse], library: Library, model: TextToImageModel, remake: Remake) -> None:
    """Each LoRA found in the library (by hash, else by name) or missing; at most a request's number of them."""
    entries = [entry for entry in await library.entries("lora") if not entry.missing]
    most = field_bounds(model.request, "loras")[1]
    for lora in loras:
        entry = (by_version(entries, lora.version_id) or lora_by_hash(entries, lora.hash)
                 or await _lora_by_name(library, lora.name))
        if entry is None:
            remake.missing.append(lora)
        elif len(remake.found) >= most:
            remake.notes.append(f"LoRA {lora.name} is left out: a request takes at most {most}.")
        elif all(entry.file != found.file for _, found in remake.found):
            remake.found.append((lora, entry))


def lora_by_hash(entries: list[LibraryEntry], short_hash: str | None) -> LibraryEntry | None:
    """The entry whose sha256 is `short_hash` (a full sha256, `sha256:<hex>`) or starts with it (AutoV2)."""
    wanted = (short_hash or "").lower().removeprefix("sha256:")
    if len(wanted) not in (AUTOV2_DIGITS, 64):
        return None
    return next((entry for entry in entries if entry.sha256 and entry.sha256.lower().startswith(wanted)), None)


async def _lora_by_name(library: Library, name: str) -> LibraryEntry | None:
    try:
        entry = await library.find(name, kind="lora")
    except ToolboxError:  # none by that name, or several
        return None
    return None if entry.missing else entry


def by_version(entries: list[LibraryEntry], version_id: int | None) -> LibraryEntry | None:
    """The entry imported from CivitAI model version `version_id`."""
    return next((entry for entry in entries if version_id and entry.civitai_version_id == version_id), None)


async def _match_checkpoint(settings: GenerationSettings, library: Library, remake: Remake) -> None:
    """The image's checkpoint from the library (by version id, hash, name) into the params; when it is
    this server's active one, or missing, the active one is used (a missing one is named)."""
    active = await library.active_checkpoint()
    entries = [entry for entry in await library.entries("checkpoint") if not entry.missing]
    entry = (by_version(entries, settings.model_version_id) or lora_by_hash(entries, settings.model_hash)
             or _checkpoint_by_name(entries, settings.model))
    if entry is not None:
        if entry.file != active["file"]:
            remake.params["checkpoint"] = entry.file
        return
    name = settings.model or (f"CivitAI model version {settings.model_version_id}" if settings.model_version_id
                              else settings.model_hash)
    if settings.model and settings.model.lower() in {active["name"].lower(), Path(active["path"]).stem.lower()}:
        return
    remake.missing_checkpoint, remake.missing_checkpoint_version = name, settings.model_version_id
    remake.notes.append(f"Made with the checkpoint {name}, which is not in the library: {active['name']} is used.")


def _checkpoint_by_name(entries: list[LibraryEntry], name: str | None) -> LibraryEntry | None:
    wanted = (name or "").lower()
    return next((entry for entry in entries if wanted and wanted in (entry.name.lower(), Path(entry.file).stem.lower())),
                None)


def setting_pairs(settings: GenerationSettings) -> list[tuple[str, str]]:
    """(label, value) of each setting the image gives besides its prompts, as Image info shows them."""
    pairs = [("Steps", settings.steps), ("Sampler", settings.sampler), ("CFG", settings.cfg), ("Seed", settings.seed),
             ("Size", f"{settings.width}×{settings.height}" if settings.width and settings.height else None),
             ("Denoising strength", settings.denoising_strength),
             ("Model", f"{settings.model} ({settings.model_hash})" if settings.model and settings.model_hash
              else settings.model or settings.model_hash)]
    pairs += [("LoRA", _lora_text(lora)) for lora in settings.loras]
    pairs += list(settings.other.items())
    return [(label, f"{value:g}" if isinstance(value, float) else str(value)) for label, value in pairs if value is not None]


def _lora_text(lora: LoraUse) -> str:
    weight = f" {lora.weight:g}" if lora.weight is not None else ""
    return f"{lora.name}{weight}" + (f" ({lora.hash})" if lora.hash else "")
