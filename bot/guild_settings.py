"""Per-guild settings (`settings:<guild>` in the state store), changed by admins with /settings (and
`imports_allowed` by the bot's operators only)."""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal

import discord
from pydantic import Field, ValidationError, model_validator

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.requests import (
    Aspect,
    CaptionRequest,
    CaptionStyle,
    Cfg,
    Creativity,
    DEFAULT_NSFW_THRESHOLD,
    GenerateRequest,
    GenerationSteps,
    NsfwThreshold,
    Prompt,
    RefusedWords,
    SafetyContext,
    SamplerName,
    SafetyPolicy,
    Scale,
    UpscaleRequest,
)
from modal_services.jobs.validation import Checked
from modal_services.state.keys import settings_key, settings_lock_name
from modal_services.state.locks import holding
from modal_services.state.store import StateStore

GenerateModel = Annotated[Literal["sdxl", "flux"], Field(title="The model")]
# Jobs running or queued at once, per member and per guild.
UserCap = Annotated[int, Field(ge=1, le=20, title="A member's cap")]
GuildCap = Annotated[int, Field(ge=1, le=200, title="The server's cap")]
# How long the buttons under a result keep working: its parameters are kept this many days.
ResultRetentionDays = Annotated[int, Field(ge=1, le=3650, title="The result retention (days)")]
# How long a settings change waits for another admin's to be saved before giving up.
SETTINGS_LOCK_WAIT_SECONDS = 10.0


def _default(request, name: str) -> Any:
    return request.model_fields[name].default


class GuildSettings(Checked):
    """The defaults use the job requests' own field types: a default a job would refuse cannot be stored."""

    default_caption_style: CaptionStyle = _default(CaptionRequest, "style")
    default_upscale_scale: Scale = _default(UpscaleRequest, "scale")
    default_creativity: Creativity = _default(UpscaleRequest, "creativity")
    # /generate: an SDXL aspect bucket, steps, CFG and a negative prompt for requests that give none.
    default_aspect: Aspect = "1:1"
    default_steps: GenerationSteps = _default(GenerateRequest, "steps")
    default_cfg: Cfg = _default(GenerateRequest, "cfg")
    default_negative: Prompt = Field("", title="The default negative prompt")
    # None: the checkpoint's own (its library entry's, else the base checkpoint's).
    default_sampler: SamplerName | None = None
    # The /generate model for requests that name none: sdxl | flux.
    default_model: GenerateModel = "sdxl"
    user_cap: UserCap = 2
    guild_cap: GuildCap = 10
    # Empty means everyone / every channel.
    allowed_role_ids: list[int] = []
    allowed_channel_ids: list[int] = []
    # What happens to an image the classifier flags outside age-restricted channels; who turned it off, and when.
    safety_policy: SafetyPolicy = "block"
    nsfw_threshold: NsfwThreshold = DEFAULT_NSFW_THRESHOLD
    refused_words: RefusedWords = []
    safety_off_by: int | None = None
    safety_off_at: float | None = None
    result_retention_days: ResultRetentionDays = 90
    # Whether this server's admins may import and upload LoRAs and checkpoints (the library is every
    # server's): the bot's operators alone set it.
    imports_allowed: bool = False

    @model_validator(mode="after")
    def _caps_in_order(self) -> "GuildSettings":
        if self.user_cap > self.guild_cap:
            raise ValueError("A member's cap cannot be above the server's.")
        return self

    @classmethod
    def from_dict(cls, record: dict | None) -> "GuildSettings":
        """The stored settings; a value stored before its limits were checked falls back to the default."""
        known = {name: value for name, value in (record or {}).items() if name in cls.model_fields}
        try:
            return cls.model_validate(known)
        except ValidationError as error:
            refused = {problem["loc"][0] for problem in error.errors() if problem["loc"]} or {"user_cap", "guild_cap"}
            return cls.model_validate({name: value for name, value in known.items() if name not in refused})

    def changed(self, **changes: Any) -> "GuildSettings":
        """These settings with `changes` (None: unchanged), checked; INVALID_INPUT if a job would refuse one."""
        given = {name: value for name, value in changes.items() if value is not None}
        return GuildSettings.parse({**self.to_dict(), **given})

    def to_dict(self) -> dict:
        return self.model_dump()

    def safety_for(self, age_restricted: bool) -> SafetyContext:
        """The safety context of a job whose images go to a channel that is age-restricted or not."""
        return SafetyContext(policy=self.safety_policy, age_restricted=age_restricted, threshold=self.nsfw_threshold,
                             refused_words=self.refused_words)

    def describe_safety(self) -> str:
        """One line for /settings show and /status."""
        if self.safety_policy == "off":
            who = f" by <@{self.safety_off_by}>" if self.safety_off_by else ""
            when = f" <t:{int(self.safety_off_at)}:R>" if self.safety_off_at else ""
            text = f"Safety: **off** (no image is checked; set{who}{when})"
        else:
            action = "withheld" if self.safety_policy == "block" else "posted as spoilers"
            text = f"Safety: {self.safety_policy} (images scoring {self.nsfw_threshold:g}+ are {action} outside age-restricted channels)"
        return text + f" · {len(self.refused_words)} refused words of this server"

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


async def load_guild_settings(store: StateStore, guild_id: int | None) -> GuildSettings:
    return GuildSettings.from_dict(await store.get(settings_key(guild_id)))


async def save_guild_settings(store: StateStore, guild_id: int | None, settings: GuildSettings) -> None:
    await store.put(settings_key(guild_id), settings.to_dict())


async def update_guild_settings(store: StateStore, guild_id: int | None,
                                change: Callable[[GuildSettings], GuildSettings]) -> GuildSettings:
    """Read one server's settings, `change` them and save the result, holding that server's lock:
    two admins changing settings at once (bot containers, the same bot) both keep their change.
    Returns the settings saved; `change` may refuse with a ToolboxError, and then nothing is saved."""
    busy = "Another change to this server's settings is being saved; try again in a moment."
    async with holding(store, settings_lock_name(guild_id), busy, SETTINGS_LOCK_WAIT_SECONDS):
        settings = change(await load_guild_settings(store, guild_id))
        await save_guild_settings(store, guild_id, settings)
        return settings


async def result_retention_days(store: StateStore, guild_id: int | None) -> int:
    """How many days the server keeps its results' parameters (a `result_params.RetentionDays`)."""
    return (await load_guild_settings(store, guild_id)).result_retention_days
