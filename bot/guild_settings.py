"""Per-guild settings (`settings:<guild>` in the state store), changed by admins with /settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import discord

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.state import StateStore


@dataclass
class GuildSettings:
    default_caption_style: str = "descriptive"
    default_upscale_scale: float = 2.0
    default_creativity: float = 0.35
    # /generate: an SDXL aspect bucket, steps, CFG and a negative prompt added to every request.
    default_aspect: str = "1:1"
    default_steps: int = 28
    default_cfg: float = 5.5
    default_negative: str = ""
    # Jobs running or queued at once, per user and per guild.
    user_cap: int = 2
    guild_cap: int = 10
    # Empty means everyone / every channel.
    allowed_role_ids: list[int] = field(default_factory=list)
    allowed_channel_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, record: dict | None) -> "GuildSettings":
        known = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in (record or {}).items() if name in known})

    def to_dict(self) -> dict:
        return asdict(self)

    def check_member(self, interaction: discord.Interaction) -> None:
        """Raises PERMISSION_DENIED if this guild keeps the bot to some roles or channels."""
        if self.allowed_channel_ids and interaction.channel_id not in self.allowed_channel_ids:
            channels = ", ".join(f"<#{channel}>" for channel in self.allowed_channel_ids)
            raise ToolboxError(ErrorCode.PERMISSION_DENIED, f"Here the bot works only in {channels}.")
        if self.allowed_role_ids:
            roles = {role.id for role in getattr(interaction.user, "roles", [])}
            if not roles & set(self.allowed_role_ids):
                mentions = ", ".join(f"<@&{role}>" for role in self.allowed_role_ids)
                raise ToolboxError(ErrorCode.PERMISSION_DENIED, f"On this server the bot is for {mentions}.")


def settings_key(guild_id: int | None) -> str:
    return f"settings:{guild_id or 'dm'}"


async def load_guild_settings(store: StateStore, guild_id: int | None) -> GuildSettings:
    return GuildSettings.from_dict(await store.get(settings_key(guild_id)))


async def save_guild_settings(store: StateStore, guild_id: int | None, settings: GuildSettings) -> None:
    await store.put(settings_key(guild_id), settings.to_dict())
