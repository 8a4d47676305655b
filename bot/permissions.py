"""Who may do what.

- **Operators** run the deployment: the Discord application's owner (or its team's admins and developers,
  as discord.py's `Bot.is_owner` reads them) and the users in `TOOLBOX_OPERATOR_IDS`. They alone change
  what every server shares, from any server or a DM.
- **A server's admins** (Discord's Administrator permission there) change their own server only.

Discord's `default_member_permissions` only hides commands (and is ignored on subcommands), so every
check is also made here.
"""

from __future__ import annotations

import logging

import discord

from modal_services.errors import ErrorCode, ToolboxError

log = logging.getLogger(__name__)


def is_admin(interaction: discord.Interaction) -> bool:
    """An Administrator of the server the interaction comes from (never in a DM)."""
    permissions = getattr(interaction.user, "guild_permissions", None)
    return interaction.guild_id is not None and permissions is not None and permissions.administrator


def require_admin(interaction: discord.Interaction, what: str) -> None:
    if not is_admin(interaction):
        raise ToolboxError(ErrorCode.PERMISSION_DENIED, f"Only this server's admins can {what}.")


async def is_operator(interaction: discord.Interaction) -> bool:
    """One of the deployment's operators. The application's owner is asked of Discord once, then cached by
    discord.py; if Discord cannot answer, only `TOOLBOX_OPERATOR_IDS` count (no one is let in on a failure)."""
    client = interaction.client
    if interaction.user.id in client.settings.operator_ids:
        return True
    try:
        return await client.is_owner(interaction.user)
    except discord.HTTPException:
        log.warning("could not read the application's owner from Discord: only TOOLBOX_OPERATOR_IDS are operators now")
        return False


async def require_operator(interaction: discord.Interaction, what: str) -> None:
    if not await is_operator(interaction):
        raise ToolboxError(ErrorCode.PERMISSION_DENIED, f"Only the bot's operators can {what}.")
