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

    setup = commands.add_parser("setup", help="download the missing base models")
    setup.add_argument("--only", nargs="+", metavar="KEY", help="just these models (see `toolbox status`)")

    status = commands.add_parser("status", help="base models, tokens and the running download")
    status.add_argument("--json", action="store_true", help="one JSON document on stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.load()
        if args.command == "bot":
            run_bot(settings)
        elif args.command == "caption":
            asyncio.run(caption_files(settings, args))
        elif args.command == "setup":
            asyncio.run(setup_models(settings, args.only))
        elif args.command == "status":
            asyncio.run(show_status(settings, args.json))
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


async def setup_models(settings: Settings, only: list[str] | None) -> None:
    """Download the missing base models (or `--only` these), with a bar per model and an overall bar."""
    from modal_services.downloads import model_states, start_or_attach_download, watch_job
    from modal_services.registry import resolve_keys

    entries = resolve_keys(only)  # an unknown key fails here, before anything starts
    backend = make_backend(settings)
    try:
        states = await model_states(backend.store, entries)
        missing = [state.key for state in states if state.state != "present"]
        if not missing:
            print("All requested base models are present.")
            return
        job_id, started = await start_or_attach_download(
            backend.store, lambda: backend.submit("download", {"keys": missing}, owner={"cli": True})
        )
        if not started:
            print(f"A download is already running (job {job_id}); following it.", file=sys.stderr)
        wanted = [entry for entry in entries if entry.key in missing]
        bars = {
            entry.key: tqdm(total=entry.approx_bytes, unit="B", unit_scale=True, desc=entry.key, position=i + 1,
                            leave=True, disable=None)
            for i, entry in enumerate(wanted)
        }
        overall = tqdm(total=1, unit="B", unit_scale=True, desc="overall", position=0, leave=True, disable=None)

        async def show(job) -> None:
            done = total = 0
            for state in await model_states(backend.store, wanted):
                bar = bars[state.key]
                bar.total = state.size_bytes
                bar.n = state.size_bytes if state.state == "present" else state.bytes_done
                bar.set_postfix_str(state.state, refresh=False)
                bar.refresh()
                done, total = done + bar.n, total + state.size_bytes
            overall.total, overall.n = max(total, 1), done
            overall.refresh()

        try:
            job = await watch_job(backend.store, job_id, show)
        finally:
            for bar in (overall, *bars.values()):
                bar.close()
        if job.error() is not None:
            raise job.error()
        print(f"Downloaded: {', '.join(missing)}.")
    finally:
        await backend.close()


async def show_status(settings: Settings, as_json: bool) -> None:
    """Base models (present = manifest and, locally, the files on disk), tokens (masked), the running download."""
    import json

    from modal_services.downloads import (
        active_download,
        check_files,
        describe_state,
        download_key,
        manifest_key,
    )
    from modal_services.registry import BASE_MODELS
    from modal_services.tokens import SERVICES, token_state

    backend = make_backend(settings)
    store = backend.store
    try:
        states = []
        for entry in BASE_MODELS.values():
            manifest = await store.get(manifest_key(entry.key))
            problems = None
            if manifest and settings.backend == "local":
                # The local backend can see the volume; the Modal one trusts what the worker verified.
                problems = await asyncio.to_thread(check_files, settings.models_dir / entry.folder, manifest)
            states.append(describe_state(entry, manifest, await store.get(download_key(entry.key)), problems or None))
        tokens = [await token_state(store, service) for service in SERVICES]
        document = {
            "backend": settings.backend,
            "models": [state.to_dict() for state in states],
            "tokens": {t.service: {"set": t.is_set, "masked": t.masked, "source": t.source, "user": t.user} for t in tokens},
            "active_download": await active_download(store),
            "active_checkpoint": await store.get("active_checkpoint"),
        }
    finally:
        await backend.close()
    if as_json:
        print(json.dumps(document, indent=2))
        return
    for state in states:
        extra = f" ({state.detail})" if state.detail else ""
        print(f"{state.key:16} {state.state:12} {state.size_bytes / 1e9:6.2f} GB{extra}")
    for token in tokens:
        print(token.describe())
    if document["active_download"]:
        print(f"download running: job {document['active_download']}")
    if document["active_checkpoint"]:
        print(f"active checkpoint: {document['active_checkpoint']}")
