"""/settings: this server's defaults, caps, who may use the bot, content safety and how long results'
buttons keep working (this server's admins), and whether its admins may add models to the library
(the bot's operators). Each change is read, made and saved under the server's settings lock, so two
admins changing settings at once both keep theirs."""

from __future__ import annotations

import time
from typing import Callable

import discord
from discord import app_commands
from discord.ext import commands

from bot.guild_settings import GuildSettings, load_guild_settings, update_guild_settings
from bot.core.generate_models import GENERATE_MODELS
from bot.permissions import require_admin, require_operator
from bot.result_params import in_days
from bot.ui import CAPTION_STYLE_CHOICES, SAMPLER_CHOICES, option_range
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.requests import ASPECT_BUCKETS, REFUSED_WORD_MAX_CHARS
from modal_services.jobs.validation import field_choices

ScaleOption = option_range(GuildSettings, "default_upscale_scale")
CreativityOption = option_range(GuildSettings, "default_creativity")
UserCapOption = option_range(GuildSettings, "user_cap")
GuildCapOption = option_range(GuildSettings, "guild_cap")
StepsOption = option_range(GuildSettings, "default_steps")
CfgOption = option_range(GuildSettings, "default_cfg")
NegativeOption = option_range(GuildSettings, "default_negative")
ASPECT_CHOICES = [app_commands.Choice(name=ratio, value=ratio) for ratio in ASPECT_BUCKETS]
MODEL_CHOICES = [app_commands.Choice(name=model.title, value=key) for key, model in GENERATE_MODELS.items()]
# A sampler, or none of the server's: each checkpoint's own.
CHECKPOINT_SAMPLER = app_commands.Choice(name="the checkpoint's own", value="checkpoint")
ThresholdOption = option_range(GuildSettings, "nsfw_threshold")
RetentionOption = option_range(GuildSettings, "result_retention_days")
WordOption = app_commands.Range[str, 1, REFUSED_WORD_MAX_CHARS]
# What only admins may do here, in the refusal everyone else gets.
WHAT_ADMINS_DO = "change the bot's settings"
POLICY_LABELS = {
    "block": "block: flagged images are withheld (default)",
    "spoiler": "spoiler: flagged images are posted as spoilers",
    "off": "off: images are not checked",
}
POLICY_CHOICES = [app_commands.Choice(name=POLICY_LABELS[policy], value=policy)
                  for policy in field_choices(GuildSettings, "safety_policy")]


def describe(settings: GuildSettings) -> str:
    roles = ", ".join(f"<@&{role}>" for role in settings.allowed_role_ids) or "everyone"
    channels = ", ".join(f"<#{channel}>" for channel in settings.allowed_channel_ids) or "every channel"
    return "\n".join([
        "**Server settings**",
        f"Caption style: {settings.default_caption_style}",
        f"Upscale: {settings.default_upscale_scale:g}x, creativity {settings.default_creativity:g}",
        f"Generate: {settings.default_aspect}, {settings.default_steps} steps, CFG {settings.default_cfg:g}"
        + (f", negative “{settings.default_negative[:80]}”" if settings.default_negative else "")
        + f", sampler {settings.default_sampler or CHECKPOINT_SAMPLER.name}"
        + f", model {GENERATE_MODELS[settings.default_model].title}",
        f"Jobs at once: {settings.user_cap} per member, {settings.guild_cap} for the server",
        f"Who: {roles} · Where: {channels}",
        settings.describe_safety(),
        f"Result buttons work for {in_days(settings.result_retention_days)} after the result",
        f"This server's admins {'may' if settings.imports_allowed else 'may not'} import or upload models "
        "(the bot's operators decide)",
    ])


def describe_safety(settings: GuildSettings) -> str:
    words = ", ".join(f"`{discord.utils.escape_markdown(word)}`" for word in settings.refused_words) or "none"
    return "\n".join([
        "**Content safety**",
        settings.describe_safety(),
        f"This server's refused words and phrases: {words}",
        "-# Always on, whatever the policy: prompts asking for sexual content involving minors are refused. "
        "In age-restricted channels images are posted as generated.",
    ])


def changed_words(words: list[str], add: str | None, remove: str | None) -> list[str]:
    """The list with `add` appended and `remove` taken out, compared without case; removing a word
    that is not there is refused (a typo should not pass silently)."""
    updated = list(words)
    if remove is not None:
        kept = [word for word in updated if word.casefold() != remove.strip().casefold()]
        if len(kept) == len(updated):
            raise ToolboxError(ErrorCode.INVALID_INPUT, "That word is not on this server's list.")
        updated = kept
    if add is not None and add.strip().casefold() not in {word.casefold() for word in updated}:
        updated.append(add.strip())
    return updated


def _toggle(ids: list[int], add: int | None, remove: int | None) -> list[int]:
    updated = [existing for existing in ids if existing != remove]
    if add is not None and add not in updated:
        updated.append(add)
    return updated


@app_commands.guild_only()
@app_commands.default_permissions(administrator=True)
class ServerSettings(commands.GroupCog, group_name="settings", group_description="This server's bot settings (admins)"):
    def __init__(self, bot: commands.Bot):
        self.bot = bot

    async def _update(self, interaction: discord.Interaction,
                      change: Callable[[GuildSettings], GuildSettings]) -> GuildSettings:
        """This server's settings changed by `change` (given the settings as saved now) and saved."""
        require_admin(interaction, WHAT_ADMINS_DO)
        return await update_guild_settings(self.bot.backend.store, interaction.guild_id, change)

    @app_commands.command(name="show", description="Show this server's settings")
    async def show(self, interaction: discord.Interaction) -> None:
        require_admin(interaction, WHAT_ADMINS_DO)
        settings = await load_guild_settings(self.bot.backend.store, interaction.guild_id)
        await interaction.response.send_message(describe(settings), ephemeral=True)

    @app_commands.command(name="defaults", description="Defaults for /caption, /upscale and /generate, and job caps")
    @app_commands.describe(
        caption_style="Default /caption style",
        upscale_scale="Default /upscale factor",
        creativity="Default /upscale creativity (denoise strength)",
        user_cap="Jobs one member may have waiting or running",
        guild_cap="Jobs the whole server may have waiting or running",
        aspect="Default /generate aspect",
        steps="Default /generate steps",
        cfg="Default /generate CFG",
        negative="Default /generate negative prompt (\"none\" to clear it)",
        model="Default /generate model",
        sampler="Default /generate sampler for SDXL (the checkpoint's own: its library entry's)",
    )
    @app_commands.choices(caption_style=CAPTION_STYLE_CHOICES, aspect=ASPECT_CHOICES, model=MODEL_CHOICES,
                          sampler=[CHECKPOINT_SAMPLER, *SAMPLER_CHOICES])
    async def defaults(
        self,
        interaction: discord.Interaction,
        caption_style: app_commands.Choice[str] | None = None,
        upscale_scale: ScaleOption | None = None,
        creativity: CreativityOption | None = None,
        user_cap: UserCapOption | None = None,
        guild_cap: GuildCapOption | None = None,
        aspect: app_commands.Choice[str] | None = None,
        steps: StepsOption | None = None,
        cfg: CfgOption | None = None,
        negative: NegativeOption | None = None,
        model: app_commands.Choice[str] | None = None,
        sampler: app_commands.Choice[str] | None = None,
    ) -> None:
        if negative is not None and negative.strip().lower() == "none":
            negative = ""

        def change(settings: GuildSettings) -> GuildSettings:
            changed = settings.changed(
                default_caption_style=caption_style and caption_style.value, default_upscale_scale=upscale_scale,
                default_creativity=creativity, user_cap=user_cap, guild_cap=guild_cap,
                default_aspect=aspect and aspect.value, default_steps=steps, default_cfg=cfg,
                default_negative=negative, default_model=model and model.value,
            )
            if sampler is None:
                return changed
            # Set as chosen, the checkpoint's own (None) included, which `changed` would read as "unchanged".
            chosen = None if sampler.value == CHECKPOINT_SAMPLER.value else sampler.value
            return GuildSettings.parse({**changed.to_dict(), "default_sampler": chosen})

        settings = await self._update(interaction, change)
        await interaction.response.send_message(describe(settings), ephemeral=True)

    @app_commands.command(name="access", description="Keep the bot to some roles or channels (none set: everyone, everywhere)")
    @app_commands.describe(
        allow_role="Add a role that may use the bot",
        remove_role="Remove a role from the list",
        allow_channel="Add a channel where the bot works",
        remove_channel="Remove a channel from the list",
        reset="Open the bot to everyone, everywhere again",
    )
    async def access(
        self,
        interaction: discord.Interaction,
        allow_role: discord.Role | None = None,
        remove_role: discord.Role | None = None,
        allow_channel: discord.TextChannel | None = None,
        remove_channel: discord.TextChannel | None = None,
        reset: bool = False,
    ) -> None:
        def change(settings: GuildSettings) -> GuildSettings:
            roles, channels = ([], []) if reset else (settings.allowed_role_ids, settings.allowed_channel_ids)
            return settings.changed(
                allowed_role_ids=_toggle(roles, allow_role and allow_role.id, remove_role and remove_role.id),
                allowed_channel_ids=_toggle(channels, allow_channel and allow_channel.id,
                                            remove_channel and remove_channel.id),
            )

        settings = await self._update(interaction, change)
        await interaction.response.send_message(describe(settings), ephemeral=True)

    @app_commands.command(name="results", description="How long the buttons under results (U, V, Reroll...) keep working")
    @app_commands.describe(days="Days a result's settings are kept for its buttons (default 90)")
    async def results(self, interaction: discord.Interaction, days: RetentionOption) -> None:
        settings = await self._update(interaction, lambda settings: settings.changed(result_retention_days=days))
        await interaction.response.send_message(describe(settings), ephemeral=True)

    @app_commands.command(name="safety", description="What happens to images flagged as NSFW, and this server's refused words")
    @app_commands.describe(
        policy="For images the classifier flags outside age-restricted channels",
        threshold="The NSFW score (0-1) from which an image counts as flagged (default 0.7)",
        add_word="Refuse prompts with this word or phrase",
        remove_word="Take a word or phrase off this server's list",
    )
    @app_commands.choices(policy=POLICY_CHOICES)
    async def safety(
        self,
        interaction: discord.Interaction,
        policy: app_commands.Choice[str] | None = None,
        threshold: ThresholdOption | None = None,
        add_word: WordOption | None = None,
        remove_word: WordOption | None = None,
    ) -> None:
        def change(settings: GuildSettings) -> GuildSettings:
            updates = {"nsfw_threshold": threshold,
                       "refused_words": changed_words(settings.refused_words, add_word, remove_word)}
            if policy is not None and policy.value != settings.safety_policy:
                # Turning the check off is recorded with who did it and when; turning it back on clears that.
                off = policy.value == "off"
                updates |= {"safety_policy": policy.value, "safety_off_by": interaction.user.id if off else None,
                            "safety_off_at": time.time() if off else None}
            given = {name: value for name, value in updates.items()
                     if value is not None or name.startswith("safety_off")}
            return GuildSettings.parse({**settings.to_dict(), **given})

        settings = await self._update(interaction, change)
        await interaction.response.send_message(describe_safety(settings), ephemeral=True)

    @app_commands.command(name="imports", description="Let this server's admins import and upload models, or not (operators)")
    @app_commands.describe(allow="Whether this server's admins may add LoRAs and checkpoints to the shared library")
    async def imports(self, interaction: discord.Interaction, allow: bool) -> None:
        # The library is every server's: its operators decide, not the server's own admins.
        await require_operator(interaction, "let a server's admins import models")
        settings = await update_guild_settings(self.bot.backend.store, interaction.guild_id,
                                               lambda settings: settings.changed(imports_allowed=allow))
        await interaction.response.send_message(describe(settings), ephemeral=True)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(ServerSettings(bot))
