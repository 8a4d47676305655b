"""The model library as the cogs reach it, and the LoRA options the image commands share: autocomplete
from the library, and the slots as a list."""

from __future__ import annotations

import discord
from discord import app_commands

from bot.core.library import library_for
from modal_services.library.entries import Library

LORA_SLOTS = 3


def bot_library(bot) -> Library:
    """The library of the bot's backend: the data dir's folders locally, the workers' volume (unseen) on Modal."""
    return library_for(bot.settings, bot.backend.store)


async def lora_autocomplete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """Library SDXL LoRAs matching what has been typed, answered from the state store only."""
    return await _lora_choices(interaction, current, "sdxl")


async def model_lora_autocomplete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """As `lora_autocomplete`, for the LoRAs of the model chosen in the same command (else the server's default)."""
    from bot.guild_settings import load_guild_settings

    model = getattr(interaction.namespace, "model", None)
    if model is None and interaction.guild_id is not None:
        model = (await load_guild_settings(interaction.client.backend.store, interaction.guild_id)).default_model
    return await _lora_choices(interaction, current, model or "sdxl")


async def _lora_choices(interaction: discord.Interaction, current: str, family: str) -> list[app_commands.Choice[str]]:
    choices = await bot_library(interaction.client).choices(current, kind="lora", family=family)
    return [app_commands.Choice(name=label[:100], value=value) for label, value in choices]


def lora_slots(*slots: tuple[str | None, float | None]) -> list[dict]:
    """(name, weight) option pairs -> [{name, weight}] for the filled ones."""
    return [{"name": name, "weight": weight} for name, weight in slots if name]
