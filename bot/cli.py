"""The `toolbox` command: the bot's verbs from a terminal.

Exit status: 0 on success, 2 on bad usage, 1 on any other failure, with
`error: <CODE>: <message>` on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from bot.backend import Backend, make_backend
from bot.progress import follow_job
from bot.settings import Settings
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.imaging import decode_image, encode_png

CAPTION_BATCH = 8


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolbox", description="AI Toolbox: the Discord bot and its verbs.")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("bot", help="run the Discord bot")

    caption = commands.add_parser("caption", help="caption images")
    caption.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    caption.add_argument("--style", choices=("descriptive", "tags", "short"), default="descriptive")
    caption.add_argument("--question", help="ask a question about each image instead")
    caption.add_argument("--sidecar", action="store_true", help="write <image>.txt next to each image")
    caption.add_argument("--batch-size", type=int, default=CAPTION_BATCH, help="images per model call")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.load()
        if args.command == "bot":
            run_bot(settings)
        elif args.command == "caption":
            asyncio.run(caption_files(settings, args))
    except ToolboxError as error:
        print(f"error: {error.code.value}: {error.message}", file=sys.stderr)
        return 2 if error.code is ErrorCode.INVALID_INPUT else 1
    except KeyboardInterrupt:
        return 1
    return 0


def run_bot(settings: Settings) -> None:
    import discord

    from bot.client import ToolboxBot

    if not settings.discord_token:
        raise ToolboxError(ErrorCode.INVALID_INPUT, "DISCORD_TOKEN is not set (environment or .env).")
    discord.utils.setup_logging(level=logging.INFO)
    bot = ToolboxBot(settings, make_backend(settings))
    bot.run(settings.discord_token, log_handler=None)


def _read_for_caption(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"{path}: {exc.strerror or exc}") from None
    return encode_png(decode_image(data, name=str(path)).image)


async def caption_files(settings: Settings, args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ToolboxError(ErrorCode.INVALID_INPUT, "--batch-size must be at least 1.")
    # Every file is checked before any work starts: a bad one in the middle of a batch wastes nothing.
    images = [await asyncio.to_thread(_read_for_caption, path) for path in args.images]
    backend = make_backend(settings)
    try:
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
    finally:
        await backend.close()


async def _caption_batch(backend: Backend, batch: list[bytes], args, bar: tqdm, done_before: int) -> list[str]:
    job = await backend.submit("caption", {"images": batch, "style": args.style, "question": args.question})

    async def show(record) -> None:
        bar.n = done_before + record.progress * len(batch)
        bar.set_postfix_str(record.stage)
        bar.refresh()

    captions = await follow_job(backend, job.id, show)
    bar.n = done_before + len(batch)
    bar.refresh()
    return captions
