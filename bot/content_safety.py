"""Content safety as people see it in Discord: where images are going, and what the reply says about them.

The worker judges the images (`modal_services.safety.judge`); the bot tells it where
they will be shown and puts the verdict into words: a short public line, and
why an image was withheld, privately to whoever asked.
"""

from __future__ import annotations

import discord

from modal_services.safety.judge import JudgedImage, Reason, SafetyReport
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
    count, lines = len(report.images), []
    minors = report.withheld_for(Reason.DRAWN_MINOR)
    if minors:
        lines.append(f"-# 🚫 {_numbered(minors, count)} not posted: withheld by the check that always runs")
    reason = report.unchecked_reason()
    if reason is not None:
        return [*lines, f"-# Safety check not run: {reason}"]
    real = report.withheld_for(Reason.REAL_PHOTO)
    if real:
        lines.append(f"-# 🚫 {_numbered(real, count)} not posted: made from a real person's photo and flagged")
    flagged = report.withheld_for(Reason.NSFW)
    if flagged:
        lines.append(f"-# 🚫 {_numbered(flagged, count)} not posted: flagged by this server's safety check")
    if report.spoilered:
        lines.append(f"-# ⚠️ {_numbered(report.spoilered, count)} flagged by the safety check: posted as a spoiler")
    return lines


def withheld_notice(report: SafetyReport) -> str | None:
    """Why images were withheld, for the requester alone; None when none was."""
    count, notices = len(report.images), []
    minors = report.withheld_for(Reason.DRAWN_MINOR)
    if minors:
        notices.append(
            f"🚫 {_numbered(minors, count)} withheld: the image reads as a drawing of a minor in a sexual context. "
            "Such images are never posted, whatever the channel or this server's settings, and are not kept anywhere."
        )
    real = report.withheld_for(Reason.REAL_PHOTO)
    if real:
        notices.append(f"🚫 {_numbered(real, count)} {REAL_PERSON_WITHHELD}")
    flagged = report.withheld_for(Reason.NSFW)
    if flagged:
        scores = ", ".join(_flag(report.images[index]) for index in flagged)
        notices.append(
            f"🚫 {_numbered(flagged, count)} withheld: the NSFW classifier scored {scores} "
            f"(this server's threshold is {report.threshold:g}) and this channel is not age-restricted. "
            "Withheld images are not kept anywhere. In an age-restricted channel images are posted as generated; "
            "admins set the policy with /settings safety."
        )
    return "\n".join(notices) or None


def _flag(image: JudgedImage) -> str:
    """An image's score, and its rating where the rating flagged it."""
    return f"{image.nsfw_score:.2f}" + (" (rated explicit)" if image.rating == "explicit" else "")
