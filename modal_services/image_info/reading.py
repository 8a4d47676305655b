"""How an image says it was made, from whichever tool's metadata it carries.

Looked for in this order, the first that gives anything winning: A1111/Forge's
`parameters` text chunk, ComfyUI's `prompt` then `workflow`, NovelAI's
`Comment`, InvokeAI's `invokeai_metadata`, then an EXIF UserComment in
A1111's text (JPEG and WebP from A1111, Forge or the toolbox's own re-encoded
results). Only metadata blocks are read (`containers`): no pixel is decoded,
so a huge or truncated picture costs nothing more. Blocking (it parses up to
megabytes of JSON): call it in a thread from async code.
"""

from __future__ import annotations

import json
from typing import Any

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.image_info.comfyui import read_comfyui
from modal_services.image_info.containers import embedded_metadata, user_comment
from modal_services.image_info.infotext import parse_infotext
from modal_services.image_info.json_formats import read_invokeai, read_novelai
from modal_services.image_info.settings import GenerationSettings
from modal_services.imaging import ACCEPTED_FORMATS, sniff_format

# What an image file may weigh to be read at all (Discord's own attachment limit for most servers).
MAX_IMAGE_BYTES = 25 * 1024 * 1024
PARAMETERS_KEY = "parameters"


def read_generation_settings(data: bytes, name: str = "the image") -> GenerationSettings | None:
    """The settings `data` (an image file) carries, or None when it carries none. INVALID_INPUT naming
    `name` for a file that is empty, too large, or no image this reads."""
    if not data:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"{name} is empty (0 bytes).")
    if len(data) > MAX_IMAGE_BYTES:
        raise ToolboxError(ErrorCode.INVALID_INPUT,
                           f"{name} is {len(data) / 2**20:.1f} MiB; images up to {MAX_IMAGE_BYTES / 2**20:.0f} MiB are read.")
    if sniff_format(data) is None:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"{name} is not an image I can read ({ACCEPTED_FORMATS}).")
    metadata = embedded_metadata(data)
    texts = metadata.texts
    readers = (
        lambda: parse_infotext(texts[PARAMETERS_KEY]) if texts.get(PARAMETERS_KEY, "").strip() else None,
        lambda: read_comfyui(_json(texts.get("prompt")), _json(texts.get("workflow"))),
        lambda: read_novelai(_json(texts.get("Comment")), texts),
        lambda: read_invokeai(_json(texts.get("invokeai_metadata"))),
        lambda: _from_user_comment(metadata.exif),
    )
    for reader in readers:
        settings = reader()
        if settings is not None and not settings.empty:
            return settings
    return None


def _from_user_comment(exif: bytes | None) -> GenerationSettings | None:
    text = user_comment(exif) if exif else None
    return parse_infotext(text) if text and text.strip() else None


def _json(text: str | None) -> Any:
    """`text` parsed as JSON, or None when there is none or it is not JSON (nested too deep included)."""
    if not text:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None
