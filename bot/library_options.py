"""The LoRA options the SDXL commands share: autocomplete from the library, and the slots as a list."""

from __future__ import annotations

import discord
from discord import app_commands

from modal_services.library import Library

LORA_SLOTS = 3


def bot_library(bot) -> Library:
    settings = bot.settings
    return Library.for_backend(bot.backend.store, settings.backend == "local", settings.loras_dir, settings.models_dir)


async def lora_autocomplete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """Library LoRAs matching what has been typed, answered from the state store only."""
    choices = await bot_library(interaction.client).choices(current, kind="lora")
    return [app_commands.Choice(name=label[:100], value=value) for label, value in choices]


def lora_slots(*slots: tuple[str | None, float | None]) -> list[dict]:
    """(name, weight) option pairs -> [{name, weight}] for the filled ones."""
    return [{"name": name, "weight": weight} for name, weight in slots if name]
