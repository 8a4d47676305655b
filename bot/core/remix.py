"""Remix a CivitAI image: its published generation data, planned as a /generate on this bot.

`plan_remix` takes the image's id from what a person pasted (anything else is
refused before CivitAI is asked), fetches the image through the CivitAI
client (its token, the egress policy and its caps), reads its `meta` into the
one `GenerationSettings`, and plans it as Image info's button does
(`plan_generate`): the library's checkpoint and LoRAs by version id, hash or
name, values brought within range, what is missing named. The front ends then
generate with `remix_params` (what the person also gave wins over the image's)
and show `Remix.differences`.

Discord-free: the generate cog, the CLI and the HTTP API use it alike.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

from bot.core.choices import GenerateChoices, LoraChoice
from bot.core.generate_models import SDXL, generate_model
from bot.core.image_settings import Remake, plan_generate
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.image_info.civitai_images import image_page, read_civitai_image
from modal_services.image_info.settings import GenerationSettings
from modal_services.library.civitai import CivitaiClient, parse_image_reference
from modal_services.library.entries import Library
from modal_services.state.store import StateStore

# The choices a person gives that take the place of the image's own.
SIZE_CHOICES = ("width", "height")


@dataclass(frozen=True)
class Remix:
    """A CivitAI image's settings (`settings`) and the /generate they make here (`remake`)."""

    image_id: int
    settings: GenerationSettings
    remake: Remake

    @property
    def page(self) -> str:
        return image_page(self.image_id)

    def differences(self) -> list[str]:
        """What the remix does otherwise than the original: values changed, a sampler or checkpoint it
        lacks, LoRAs left out."""
        lines = list(self.remake.notes)
        if self.remake.missing:
            names = ", ".join(lora.name for lora in self.remake.missing)
            lines.append(f"Not in the library, left out: {names}.")
        return lines


async def civitai_client(api_base: str, store: StateStore) -> CivitaiClient:
    """A CivitAI client with the deployment's token (/setup's, else CIVITAI_TOKEN)."""
    from modal_services.base_models.tokens import get_token

    return CivitaiClient(api_base, await get_token(store, "civitai"))


async def plan_remix(reference: str, client: CivitaiClient, library: Library) -> Remix:
    """The remix of the CivitAI image `reference` names (a link or an id); a ToolboxError saying why not
    (not a CivitAI image, not found, CivitAI unreachable or answering nonsense, no prompt published, a
    prompt too long) before anything is submitted."""
    image_id = parse_image_reference(reference)
    item = await asyncio.to_thread(client.image, image_id)
    settings = read_civitai_image(item)
    if not settings.prompt.strip():
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"CivitAI publishes no prompt for image {image_id} (its "
                           "maker may have hidden the generation data): there is nothing to remix.")
    remake = await plan_generate(settings, library)
    if remake.problem:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"CivitAI image {image_id} cannot be remixed: {remake.problem}")
    return Remix(image_id, settings, remake)


def remix_params(remix: Remix, given: dict[str, Any]) -> dict[str, Any]:
    """The remix's /generate parameters (as the generate cog keeps a result's) with each choice the person
    gave (not None, not empty) in place of the image's: an aspect replaces the image's size, LoRAs replace its
    LoRAs, a model other than SDXL drops its checkpoint."""
    chosen = {name: value for name, value in given.items() if value is not None and value != [] and value != ()}
    params = dict(remix.remake.params)
    if "aspect" in chosen:
        params = {name: value for name, value in params.items() if name not in SIZE_CHOICES}
    if "model" in chosen and generate_model(chosen["model"]) is not SDXL:
        params.pop("checkpoint", None)
    return params | chosen


def remixed_choices(remix: Remix, choices: GenerateChoices, given: set[str]) -> GenerateChoices:
    """`choices` (a front end's, the CLI's or the API's) with the remix's value for each choice not `given`."""
    params = remix_params(remix, {name: getattr(choices, name) for name in given})
    loras = tuple(lora if isinstance(lora, LoraChoice) else LoraChoice(**lora) for lora in params.pop("loras", ()))
    known = {name: value for name, value in params.items() if name in GenerateChoices.__dataclass_fields__}
    return replace(choices, **known, loras=loras)
