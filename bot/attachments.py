"""Reading image attachments from Discord, with every check done before a job starts.

`check_attachment` looks only at what Discord tells us (size, content type,
name, width and height) and is instant, so a command can refuse bad input before it defers.
`read_image` downloads from Discord's CDN through the egress policy (never
discord.py's own `Attachment.read`, which follows redirects anywhere), no more
bytes than Discord declared and within a deadline, decodes in a thread, and
hands the worker a clean single-frame PNG, never the user's original bytes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePath

import discord
from PIL import Image

from modal_services.net.egress import Purpose, fetch_capped_async
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.imaging import ACCEPTED_FORMATS, DEFAULT_MAX_PIXELS, check_pixel_count, decode_image, encode_png

MAX_ATTACHMENT_BYTES = 25 * 1024 * 1024
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}
# The whole download, redirects included: 25 MiB in this time is well under 1 MB/s.
DOWNLOAD_DEADLINE_SECONDS = 60.0

log = logging.getLogger(__name__)

# Decoding is CPU-bound: more threads than cores add no speed, only more
# threads contending with the event loop for the GIL.
_DECODERS = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="image-decode")


@dataclass
class ReceivedImage:
    filename: str
    png: bytes
    size: tuple[int, int]
    animated: bool


def looks_like_image(attachment: discord.Attachment) -> bool:
    if attachment.content_type:
        return attachment.content_type.split(";")[0].strip().startswith("image/")
    return PurePath(attachment.filename).suffix.lower() in IMAGE_EXTENSIONS


def check_attachment(
    attachment: discord.Attachment, max_bytes: int = MAX_ATTACHMENT_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS
) -> None:
    """Instant checks on Discord's metadata (type, size, and the width and height it reports
    for images); raises INVALID_INPUT. The decoder checks the real pixels again later."""
    name = f"`{discord.utils.escape_markdown(attachment.filename)}`"
    if not looks_like_image(attachment):
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"{name} is not an image. Send a {ACCEPTED_FORMATS} file.")
    if attachment.size == 0:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"{name} is empty (0 bytes).")
    if attachment.size > max_bytes:
        raise ToolboxError(
            ErrorCode.INVALID_INPUT,
            f"{name} is {attachment.size / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB.",
        )
    if attachment.width and attachment.height:
        check_pixel_count(attachment.width, attachment.height, max_pixels, name)


def image_attachments(message: discord.Message) -> list[discord.Attachment]:
    images = [attachment for attachment in message.attachments if looks_like_image(attachment)]
    if not images:
        raise ToolboxError(ErrorCode.INVALID_INPUT, "That message has no image attachments.")
    return images


async def read_image(
    attachment: discord.Attachment, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None
) -> ReceivedImage:
    """Download and decode; `max_side` shrinks the image for engines that never use more."""
    name = f"`{discord.utils.escape_markdown(attachment.filename)}`"
    data = await _download(attachment, name)
    return await asyncio.get_running_loop().run_in_executor(
        _DECODERS, _decode_for_worker, data, attachment.filename, name, max_pixels, max_side
    )


async def read_bytes(attachment: discord.Attachment) -> bytes:
    """The attachment's bytes as they are (to read its metadata), downloaded as `read_image` does."""
    return await _download(attachment, f"`{discord.utils.escape_markdown(attachment.filename)}`")


async def _download(attachment: discord.Attachment, name: str) -> bytes:
    """The attachment's bytes from Discord's CDN: INVALID_INPUT naming the file when they cannot be had,
    or when there are more (the transfer is cut) or fewer than Discord declared."""
    declared = attachment.size or MAX_ATTACHMENT_BYTES
    try:
        data = await fetch_capped_async(attachment.url, Purpose.ATTACHMENT, limit=min(declared, MAX_ATTACHMENT_BYTES),
                                        deadline=DOWNLOAD_DEADLINE_SECONDS)
    except ToolboxError as error:
        log.warning("attachment %s not downloaded: %s", attachment.filename, error.message)
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"{name} could not be downloaded ({error.message})") from None
    if attachment.size and len(data) < attachment.size:
        raise ToolboxError(ErrorCode.INVALID_INPUT,
                           f"{name} arrived incomplete ({len(data)} of {attachment.size} bytes); try again.")
    return data


def _decode_for_worker(data: bytes, filename: str, name: str, max_pixels: int, max_side: int | None) -> ReceivedImage:
    decoded = decode_image(data, max_pixels=max_pixels, name=name)
    image = decoded.image
    if max_side and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return ReceivedImage(filename=filename, png=encode_png(image), size=decoded.size, animated=decoded.animated)
