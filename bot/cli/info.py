"""`toolbox info`: how an image file says it was made (A1111/Forge, ComfyUI, NovelAI, InvokeAI metadata).

Reads the file's metadata only (no pixel is decoded) and needs no backend: it
works on any machine, on any image. Every value comes from a stranger's file;
the reader has removed control characters (terminal escapes included).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from bot.cli.common import read_input
from modal_services.errors import ErrorCode, ToolboxError

if TYPE_CHECKING:
    from bot.settings import Settings


def register(commands) -> None:
    info = commands.add_parser("info", help="show the prompt and settings an image was made with")
    info.add_argument("image", type=Path, metavar="IMAGE")
    info.add_argument("--json", action="store_true", help='print {"file", "settings"} (settings null when none)')
    info.set_defaults(run=show_info)


def read_settings(path: Path):
    """The settings in the image at `path`, or None; the file's size is checked before it is read."""
    from modal_services.image_info.reading import MAX_IMAGE_BYTES, read_generation_settings

    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"{path}: {exc.strerror or exc}") from None
    if size > MAX_IMAGE_BYTES:
        raise ToolboxError(ErrorCode.INVALID_INPUT,
                           f"{path} is {size / 2**20:.1f} MiB; images up to {MAX_IMAGE_BYTES / 2**20:.0f} MiB are read.")
    return read_generation_settings(read_input(path), str(path))


def show_info(settings: Settings, args: argparse.Namespace) -> None:
    from bot.core.image_settings import setting_pairs

    found = read_settings(args.image)
    if args.json:
        print(json.dumps({"file": str(args.image), "settings": found.to_dict() if found else None}, ensure_ascii=False))
        return
    if found is None:
        print(f"{args.image}: no generation data (A1111/Forge, ComfyUI, NovelAI or InvokeAI) in this file.")
        return
    print(f"{args.image} ({found.source})")
    print(f"Prompt: {found.prompt}")
    if found.negative_prompt:
        print(f"Negative prompt: {found.negative_prompt}")
    for label, value in setting_pairs(found):
        print(f"{label}: {value}")
