"""Pressing a persistent button by its custom id, as discord.py does when a press arrives (after a
restart too): the one registered dynamic item whose template matches the whole id is rebuilt from it."""

from __future__ import annotations

import discord

from bot.remix_replies import ImportMissingButton
from bot.tracker import CancelJobButton
from cogs.generate import BUTTONS as GENERATE_BUTTONS
from cogs.image_info import GenerateWithSettingsButton
from cogs.upscale import BUTTONS as UPSCALE_BUTTONS

PERSISTENT_BUTTONS = (CancelJobButton, *GENERATE_BUTTONS, *UPSCALE_BUTTONS, GenerateWithSettingsButton, ImportMissingButton)


async def rebuilt(custom_id: str) -> discord.ui.DynamicItem:
    """The button a press on `custom_id` reaches; fails unless exactly one template matches it."""
    matches = [(button, match) for button in PERSISTENT_BUTTONS
               if (match := button.__discord_ui_compiled_template__.fullmatch(custom_id))]
    assert len(matches) == 1, f"{custom_id!r} matches {[button.__name__ for button, _ in matches]}"
    (button, match), = matches
    item = await button.from_custom_id(None, None, match)
    assert item.custom_id == custom_id  # rebuilt, it carries the very id it was pressed under
    return item


async def press(custom_id: str, interaction) -> None:
    """The button with `custom_id` pressed in `interaction` (its message and client set by the caller)."""
    await (await rebuilt(custom_id)).callback(interaction)
