"""What every cog shares: option types read from the job requests, owner-only and confirm views,
and the buttons that outlive the bot."""

from __future__ import annotations

import functools
import re
import typing
from typing import Awaitable, Callable

import discord
from discord import app_commands
from pydantic import BaseModel

from bot.replies import as_toolbox_error, error_text, send_error, taking_interactions
from modal_services.errors import ToolboxError
from modal_services.jobs.requests import CAPTION_STYLES
from modal_services.jobs.samplers import SAMPLER_NAMES
from modal_services.jobs.validation import field_bounds

VIEW_TIMEOUT = 300.0

# ------------------------------------------------------------------ options from the job requests

def option_range(model: type[BaseModel], name: str):
    """`app_commands.Range` over a request field's limits (its values, or its length for text)."""
    low, high = field_bounds(model, name)
    return app_commands.Range[_scalar_type(model.model_fields[name].annotation), low, high]


def _scalar_type(annotation) -> type:
    if annotation in (int, float, str):
        return annotation
    for arg in typing.get_args(annotation):
        if arg is not type(None):
            return _scalar_type(arg)
    raise TypeError(f"no int, float or str in {annotation!r}")


CAPTION_STYLE_CHOICES = [
    app_commands.Choice(name=f"{style}: {meaning}", value=style) for style, meaning in CAPTION_STYLES.items()
]
SAMPLER_CHOICES = [app_commands.Choice(name=name, value=name) for name in SAMPLER_NAMES]


# ------------------------------------------------------------------ views

class OwnedView(discord.ui.View):
    """Buttons only the person who ran the command can press."""

    def __init__(self, owner_id: int, timeout: float = VIEW_TIMEOUT):
        super().__init__(timeout=timeout)
        self.owner_id = owner_id

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.user.id != self.owner_id:
            await interaction.response.send_message("These buttons belong to whoever ran the command.", ephemeral=True)
            return False
        return True

    def disable(self) -> None:
        for item in self.children:
            item.disabled = True


class ConfirmView(OwnedView):
    """A confirm/cancel pair; `on_confirm(interaction)` runs when the owner confirms."""

    def __init__(self, owner_id: int, confirm_label: str, style: discord.ButtonStyle,
                 on_confirm: Callable[[discord.Interaction], Awaitable[None]]):
        super().__init__(owner_id)
        self.on_confirm = on_confirm
        self.confirm.label = confirm_label
        self.confirm.style = style

    @discord.ui.button(label="Confirm", style=discord.ButtonStyle.primary)
    async def confirm(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        self.disable()
        self.stop()
        await interaction.response.edit_message(view=self)
        try:
            await self.on_confirm(interaction)
        except Exception as exc:  # a button has no command error handler: show it in the message
            await interaction.edit_original_response(content=error_text(as_toolbox_error(exc)), embed=None, view=None)

    @discord.ui.button(label="Cancel", style=discord.ButtonStyle.secondary)
    async def cancel(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        self.disable()
        self.stop()
        await interaction.response.edit_message(content="Cancelled.", embed=None, view=None)


# ------------------------------------------------------------------ buttons that outlive the bot

class PersistentButton:
    """What every button that outlives the bot shares, as a mixin before
    `discord.ui.DynamicItem[discord.ui.Button]` (whose class arguments take the custom-id template).
    Each subclass's `callback` does its one action; around it, this mixin:

    - rebuilds the button from its custom id when it is pressed, even after a restart
      (the template's named groups are `__init__`'s arguments);
    - refuses a press, with a private word, while the bot closes;
    - answers a `ToolboxError` from the callback privately: errors in components
      never reach the app-command error handler.
    """

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "callback" in cls.__dict__:
            cls.callback = _answering_errors(cls.__dict__["callback"])

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str]):
        return cls(**match.groupdict())

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        return await taking_interactions(interaction)


def _answering_errors(callback: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    @functools.wraps(callback)
    async def answered(self, interaction: discord.Interaction) -> None:
        try:
            await callback(self, interaction)
        except ToolboxError as error:
            await send_error(interaction, error)

    return answered
