"""What `/generate remix:` tells people, and its Import missing button.

The differences from the original (values changed, a checkpoint or LoRA the
library lacks, a sampler not applied) are public, in the job's own message,
within a bound. Whoever asked is also told privately what is missing; those
who may add models (`Models.may_import`) get an **Import missing** button,
which shows the normal `/models import` preview of each missing model version.
Names come from CivitAI, a stranger: shown escaped, on one line each.
"""

from __future__ import annotations

import discord

from bot.core.remix import Remix
from bot.replies import safe_inline
from bot.ui import PersistentButton
from modal_services.errors import ErrorCode, ToolboxError

IMPORT_MISSING_PREFIX = "toolbox:import-missing:"
# Discord's limit on a component's custom id.
CUSTOM_ID_LIMIT = 100
# What the differences may take of the result message (Discord's 2,000 characters hold the prompt too).
PUBLIC_NOTES_CHARS = 700
NOTE_CHARS = 200
MODELS_COG = "Models"


class ImportMissingButton(PersistentButton, discord.ui.DynamicItem[discord.ui.Button],
                          template=r"toolbox:import-missing:(?P<versions>[0-9]{1,16}(?:,[0-9]{1,16})*)"):
    """Each missing model version's import preview. The version ids travel in the button itself, so it
    outlives the bot; the press is checked as `/models import` is (operators, allowed admins)."""

    def __init__(self, versions: str):
        super().__init__(discord.ui.Button(label="Import missing", style=discord.ButtonStyle.primary, emoji="📥",
                                           custom_id=f"{IMPORT_MISSING_PREFIX}{versions}"))
        self.version_ids = [int(version) for version in versions.split(",")]

    @classmethod
    def of(cls, version_ids: list[int]) -> "ImportMissingButton":
        """The button for as many of `version_ids` as a custom id holds."""
        kept: list[str] = []
        for version in dict.fromkeys(str(version) for version in version_ids):
            if len(IMPORT_MISSING_PREFIX) + len(",".join([*kept, version])) > CUSTOM_ID_LIMIT:
                break
            kept.append(version)
        return cls(",".join(kept))

    async def callback(self, interaction: discord.Interaction) -> None:
        models = interaction.client.get_cog(MODELS_COG)
        if models is None:
            raise ToolboxError(ErrorCode.INVALID_INPUT, "/models is not available right now; try again later.")
        await models.import_missing(interaction, self.version_ids)


def public_differences(remix: Remix) -> list[str]:
    """The remix's source and its differences, escaped, within `PUBLIC_NOTES_CHARS`."""
    lines = [f"Remix of CivitAI image {remix.image_id}"]
    for note in remix.differences():
        line = safe_inline(note, NOTE_CHARS)
        if sum(len(kept) for kept in lines) + len(line) > PUBLIC_NOTES_CHARS:
            lines.append("…")
            break
        lines.append(line)
    return lines


def private_offer(remix: Remix, may_import: bool) -> tuple[str, discord.ui.View | None] | None:
    """What only whoever asked sees: the missing models, with the Import missing button when they may import
    (and CivitAI gave version ids); None when nothing is missing."""
    missing = ([remix.remake.missing_checkpoint] if remix.remake.missing_checkpoint else []) + \
        [lora.name for lora in remix.remake.missing]
    if not missing:
        return None
    names = safe_inline(", ".join(missing), 1200)
    importable = remix.remake.importable()
    if may_import and importable:
        view = discord.ui.View(timeout=None)
        view.add_item(ImportMissingButton.of([version for _, version in importable]))
        return f"📥 Not in the library: {names}. Import them, then remix again to use them.", view
    if may_import:
        return f"Not in the library: {names}. CivitAI names no version to import; find them with /models import.", None
    return f"Not in the library: {names}. A server admin can add them.", None
