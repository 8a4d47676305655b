"""Who may do what. Discord's `default_member_permissions` only hides commands
(and is ignored on subcommands), so admin-only actions are also checked here."""

from __future__ import annotations

import discord

from modal_services.errors import ErrorCode, ToolboxError


def is_admin(interaction: discord.Interaction) -> bool:
    permissions = getattr(interaction.user, "guild_permissions", None)
    return interaction.guild_id is not None and permissions is not None and permissions.administrator


def require_admin(interaction: discord.Interaction, what: str) -> None:
    if not is_admin(interaction):
        raise ToolboxError(ErrorCode.PERMISSION_DENIED, f"Only server administrators can {what}.")
