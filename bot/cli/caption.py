"""`toolbox caption`: captions (or answers to a question) for image files, in batches."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from bot.cli.common import opened_backend, read_input
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.limits import CAPTION_STYLES, DEFAULT_CAPTION_STYLE, MAX_CAPTION_IMAGES

if TYPE_CHECKING:
    from tqdm import tqdm

    from bot.backend import Backend
    from bot.settings import Settings

CAPTION_BATCH = 8


def register(commands) -> None:
    caption = commands.add_parser("caption", help="caption images")
    caption.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    caption.add_argument("--style", choices=tuple(CAPTION_STYLES), default=DEFAULT_CAPTION_STYLE,
                         help=f"default {DEFAULT_CAPTION_STYLE}; "
                              + "; ".join(f"{style}: {meaning}" for style, meaning in CAPTION_STYLES.items()))
    caption.add_argument("--question", help="ask a question about each image instead")
    caption.add_argument("--sidecar", action="store_true", help="write <image>.txt next to each image")
    caption.add_argument("--batch-size", type=int, default=CAPTION_BATCH,
                         help=f"images per model call, 1-{MAX_CAPTION_IMAGES} (default {CAPTION_BATCH})")
    caption.set_defaults(run=caption_files)


def _read_for_caption(path: Path) -> bytes:
    from modal_services.imaging import decode_image, encode_png

    return encode_png(decode_image(read_input(path), name=str(path)).image)


async def caption_files(settings: Settings, args: argparse.Namespace) -> None:
    import asyncio

    from tqdm import tqdm

    if not 1 <= args.batch_size <= MAX_CAPTION_IMAGES:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"--batch-size must be from 1 to {MAX_CAPTION_IMAGES}.")
    # Every file is checked before any work starts: a bad one in the middle of a batch wastes nothing.
    images = [await asyncio.to_thread(_read_for_caption, path) for path in args.images]
    async with opened_backend(settings) as backend:
        with tqdm(total=len(images), unit="img", desc="captioning", disable=None) as bar:
            for start in range(0, len(images), args.batch_size):
                paths = args.images[start : start + args.batch_size]
                batch = images[start : start + args.batch_size]
                captions = await _caption_batch(backend, batch, args, bar, start)
                for path, text in zip(paths, captions):
                    if args.sidecar:
                        path.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
                    else:
                        print(f"{path}: {text}" if len(args.images) > 1 else text)


async def _caption_batch(backend: Backend, batch: list[bytes], args, bar: tqdm, done_before: int) -> list[str]:
    from bot.core.following import follow_job
    from modal_services.jobs.requests import CaptionRequest

    job = await backend.submit(CaptionRequest.parse({"images": batch, "style": args.style, "question": args.question}))

    async def show(record) -> None:
        bar.n = done_before + record.progress * len(batch)
        bar.set_postfix_str(record.stage)
        bar.refresh()

    captions = await follow_job(backend, job.id, show)
    bar.n = done_before + len(batch)
    bar.refresh()
    return captions
