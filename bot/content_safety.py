"""Content safety as people see it in Discord: where images are going, and what the reply says about them.

The worker judges the images (`modal_services.safety.judge`); the bot tells it where
they will be shown and puts the verdict into words: a short public line, and
why an image was withheld, privately to whoever asked.
"""

from __future__ import annotations

import discord

from modal_services.safety.judge import SafetyReport
from modal_services.safety.real_people import REAL_PERSON_WITHHELD


def age_restricted(interaction: discord.Interaction) -> bool:
    """Whether the channel the interaction came from is age-restricted. DMs, and channels the bot
    cannot see the setting of, are not."""
    if interaction.guild_id is None:
        return False
    is_nsfw = getattr(interaction.channel, "is_nsfw", None)
    return callable(is_nsfw) and is_nsfw() is True


def _numbered(indexes: list[int], count: int) -> str:
    if count == 1:
        return "The image"
    return ("Image " if len(indexes) == 1 else "Images ") + ", ".join(str(index + 1) for index in indexes)


def public_lines(report: SafetyReport | None) -> list[str]:
    """What the result message says about the check (small print)."""
    if report is None:
        return []
    reason = report.unchecked_reason()
    if reason is not None:
        return [f"-# Safety check not run: {reason}"]
    count, lines = len(report.images), []
    if report.withheld:
        why = "made from a real person's photo and flagged" if report.real_photo else "flagged by this server's safety check"
        lines.append(f"-# 🚫 {_numbered(report.withheld, count)} not posted: {why}")
    if report.spoilered:
        lines.append(f"-# ⚠️ {_numbered(report.spoilered, count)} flagged by the safety check: posted as a spoiler")
    return lines


def withheld_notice(report: SafetyReport) -> str | None:
    """Why images were withheld, for the requester alone; None when none was."""
    if not report.withheld:
        return None
    if report.real_photo:
        return f"🚫 {_numbered(report.withheld, len(report.images))} {REAL_PERSON_WITHHELD}"
    scores = ", ".join(f"{report.images[index].nsfw_score:.2f}" for index in report.withheld)
    return (
        f"🚫 {_numbered(report.withheld, len(report.images))} withheld: the NSFW classifier scored {scores} "
        f"(this server's threshold is {report.threshold:g}) and this channel is not age-restricted. "
        "Withheld images are not kept anywhere. In an age-restricted channel images are posted as generated; "
        "admins set the policy with /settings safety."
    )
