"""Turning errors into the messages people see.

Every failure a user can cause ends here as a short ephemeral message keyed by
its error code. Unexpected exceptions are logged in full and shown only as a
generic message: their text may hold internals (paths, URLs, tokens).
"""

from __future__ import annotations

import logging

import discord

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.remedies import FrontEnd, render

log = logging.getLogger(__name__)

ERROR_TITLES = {
    ErrorCode.INVALID_INPUT: "That input won't work",
    ErrorCode.MODELS_MISSING: "Models are not installed yet",
    ErrorCode.MODEL_LOAD_FAILED: "The model failed to load",
    ErrorCode.LORA_LOAD_FAILED: "A LoRA failed to load",
    ErrorCode.LORA_DOWNLOAD_FAILED: "A LoRA failed to download",
    ErrorCode.DOWNLOAD_FAILED: "A download failed",
    ErrorCode.GENERATION_FAILED: "Generation failed",
    ErrorCode.CUDA_OOM: "The GPU ran out of memory",
    ErrorCode.TIMEOUT: "That took too long",
    ErrorCode.CIVITAI_AUTH_REQUIRED: "CivitAI needs a token for this",
    ErrorCode.CIVITAI_NOT_FOUND: "Not found on CivitAI",
    ErrorCode.CIVITAI_UNAVAILABLE: "CivitAI is not answering",
    ErrorCode.INCOMPATIBLE_MODEL: "That model does not fit",
    ErrorCode.CHECKSUM_MISMATCH: "The download was corrupt",
    ErrorCode.STORAGE_FULL: "Storage is full",
    ErrorCode.RATE_LIMITED: "Slow down a little",
    ErrorCode.PERMISSION_DENIED: "Not allowed",
    ErrorCode.CANCELLED: "Cancelled",
    ErrorCode.BACKEND_UNAVAILABLE: "The workers are unreachable",
    ErrorCode.INTERNAL: "Something went wrong",
}


def error_text(error: ToolboxError) -> str:
    return f"❌ **{ERROR_TITLES.get(error.code, error.code.value)}** · {render(error.message, FrontEnd.DISCORD)}"


def as_toolbox_error(error: BaseException) -> ToolboxError:
    original = getattr(error, "original", error)
    if isinstance(original, ToolboxError):
        return original
    if isinstance(error, discord.app_commands.CheckFailure):
        return ToolboxError(ErrorCode.PERMISSION_DENIED, "You don't have permission to use this.")
    log.error("unexpected error in a command", exc_info=original)
    return ToolboxError(ErrorCode.INTERNAL, "An unexpected error happened; it has been logged.")


def safe_inline(text: str, limit: int) -> str:
    """Text from a stranger (an image's metadata, CivitAI), on one line, cut to `limit`, with no markdown or
    mention Discord would act on."""
    text = discord.utils.escape_mentions(discord.utils.escape_markdown(" ".join(str(text).split())))
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def taking_interactions(interaction: discord.Interaction) -> bool:
    """False (having told the user privately) while the bot is closing: nothing new starts then."""
    if not interaction.client.stopping:
        return True
    if interaction.type is not discord.InteractionType.autocomplete:
        try:
            await interaction.response.send_message("🔄 The bot is restarting; try again in a minute.", ephemeral=True)
        except discord.HTTPException:
            pass  # the gateway is going anyway
    return False


async def send_error(interaction: discord.Interaction, error: ToolboxError) -> None:
    """Show `error` to the invoking user only, whatever state the interaction is in."""
    text = error_text(error)
    try:
        if not interaction.response.is_done():
            await interaction.response.send_message(text, ephemeral=True)
            return
        # A deferred public reply cannot turn ephemeral: remove it, then answer privately.
        try:
            await interaction.delete_original_response()
        except discord.HTTPException:
            pass
        await interaction.followup.send(text, ephemeral=True)
    except discord.HTTPException:
        log.warning("could not deliver an error reply (%s)", error.code.value)
