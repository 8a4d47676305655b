"""The `toolbox` command: the bot's verbs from a terminal.

Exit status: 0 on success, 2 on bad usage, 1 on any other failure, with
`error: <CODE>: <message>` on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from tqdm import tqdm

from bot.backend import ENGINE_THREAD_PREFIX, Backend, open_backend
from bot.core.following import follow_job
from bot.settings import Settings
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.imaging import decode_image, encode_png, shrunk_png
from modal_services.jobs.requests import (
    CAPTION_STYLES,
    CaptionRequest,
    DownloadRequest,
    ModelDeleteRequest,
    ModelImportRequest,
    ModelScanRequest,
    SafetyContext,
    UpscaleRequest,
)
from modal_services.jobs.validation import field_bounds
from modal_services.state.keys import ACTIVE_CHECKPOINT_KEY, JOB_PREFIX
from modal_services.safety.judge import SafetyReport

CAPTION_BATCH = 8
LOOPBACK = "127.0.0.1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolbox", description="AI Toolbox: the Discord bot and its verbs.")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("bot", help="run the Discord bot")

    caption = commands.add_parser("caption", help="caption images")
    caption.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    caption.add_argument("--style", choices=tuple(CAPTION_STYLES), default=CaptionRequest.model_fields["style"].default)
    caption.add_argument("--question", help="ask a question about each image instead")
    caption.add_argument("--sidecar", action="store_true", help="write <image>.txt next to each image")
    caption.add_argument("--batch-size", type=int, default=CAPTION_BATCH, help="images per model call")

    setup = commands.add_parser("setup", help="download the missing base models")
    setup.add_argument("--only", nargs="+", metavar="KEY", help="just these models (see `toolbox status`)")
    toggles = setup.add_mutually_exclusive_group()
    toggles.add_argument("--enable", nargs="+", metavar="KEY", default=[],
                         help="enable these optional models (accepting their licences), then download what is missing")
    toggles.add_argument("--disable", nargs="+", metavar="KEY", default=[],
                         help="disable these optional models (their files stay)")

    status = commands.add_parser("status", help="the data dir, base models, tokens and the running download")
    status.add_argument("--json", action="store_true", help="one JSON document on stdout")
    _add_models_parser(commands)

    migrate = commands.add_parser("migrate", help="bring the older Gradio toolbox's files and indexes into this layout")
    migrate.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    migrate.add_argument("--json", action="store_true", help="the report as one JSON document on stdout")

    lowest, highest = field_bounds(UpscaleRequest, "scale")
    upscale = commands.add_parser("upscale", help=f"upscale an image with SDXL ({lowest:g}x-{highest:g}x)")
    upscale.add_argument("image", type=Path, metavar="IMAGE")
    upscale.add_argument("--scale", type=float, help=f"default: {UpscaleRequest.model_fields['scale'].default:g}")
    upscale.add_argument("--prompt")
    upscale.add_argument("--negative")
    upscale.add_argument("--lora", action="append", default=[], metavar="NAME[:WEIGHT]", help="a library LoRA (repeatable)")
    lowest, highest = field_bounds(UpscaleRequest, "creativity")
    upscale.add_argument("--creativity", type=float, help=f"{lowest:g} (faithful) to {highest:g} (repaint); "
                         f"default: {UpscaleRequest.model_fields['creativity'].default:g}")
    upscale.add_argument("--seed", type=int, help="default: random")
    upscale.add_argument("-o", "--output", type=Path, help="default: IMAGE_x<scale>.png beside the input")
    upscale.add_argument("--no-safety-check", action="store_true", help=SAFETY_HELP)
    upscale.add_argument("--tile-captions", action="store_true",
                         help="caption each tile (tags) and add that to its prompt: slower, more fitting detail")
    _add_generate_parser(commands)

    serve = commands.add_parser("serve", help="run the HTTP API on the local backend")
    serve.add_argument("--host", default=LOOPBACK, help=f"address to listen on (default {LOOPBACK})")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--no-auth", action="store_true", help=f"no token (only with --host {LOOPBACK})")
    return parser


SAFETY_HELP = "keep images the NSFW classifier would flag (by default they are withheld, not written)"


def cli_safety(args: argparse.Namespace) -> SafetyContext:
    """A terminal's images are judged as for a channel that is not age-restricted, unless it opts out."""
    return SafetyContext(policy="off" if args.no_safety_check else "block")


def _report_withheld(result: dict) -> None:
    report = SafetyReport.from_dict(result["safety"])
    for index in report.withheld:
        print(f"image {index + 1} withheld: NSFW score {report.images[index].nsfw_score:.2f} (threshold "
              f"{report.threshold:g}); not written. --no-safety-check keeps such images.", file=sys.stderr)


def _add_generate_parser(commands) -> None:
    from modal_services.jobs.requests import FLUX_ASPECT_BUCKETS, GenerateRequest

    fields = GenerateRequest.model_fields
    generate = commands.add_parser("generate", help="make images from a prompt with SDXL or FLUX.1-dev")
    generate.add_argument("prompt", metavar="PROMPT")
    generate.add_argument("--model", choices=("sdxl", "flux", "flux-dev"), default="sdxl",
                          help="flux: FLUX.1-dev (once enabled in setup): guidance as --cfg (3.5), no --negative")
    generate.add_argument("--negative", default="")
    generate.add_argument("--aspect", choices=list(FLUX_ASPECT_BUCKETS), default="1:1",
                          help="a size bucket (the 2MP ones are Flux's)")
    lowest, highest = field_bounds(GenerateRequest, "width")
    generate.add_argument("--width", type=int, help=f"{lowest}-{highest}, a multiple of 64 (with --height, instead of --aspect)")
    generate.add_argument("--height", type=int)
    lowest, highest = field_bounds(GenerateRequest, "count")
    generate.add_argument("--count", type=int, help=f"{lowest}-{highest} images in one batch (default {fields['count'].default})")
    generate.add_argument("--steps", type=int, help=f"default: {fields['steps'].default}")
    generate.add_argument("--cfg", type=float, help=f"default: {fields['cfg'].default:g}")
    generate.add_argument("--seed", type=int, help="default: random (printed); image n gets seed + n - 1")
    generate.add_argument("--lora", action="append", default=[], metavar="NAME[:WEIGHT]", help="a library LoRA (repeatable)")
    generate.add_argument("--face", type=Path, metavar="PHOTO", help="InstantID: every image keeps this person's face")
    generate.add_argument("--pose", type=Path, metavar="PHOTO", help="with --face: the face in this photo sets the pose")
    lowest, highest = field_bounds(GenerateRequest, "identity_strength")
    generate.add_argument("--identity-strength", type=float,
                          help=f"{lowest:g}-{highest:g}, how strongly the face is kept (default {fields['identity_strength'].default:g})")
    generate.add_argument("--controlnet-strength", type=float,
                          help=f"{lowest:g}-{highest:g}, how closely the pose is followed (default {fields['controlnet_strength'].default:g})")
    generate.add_argument("--timeout", type=float, default=field_bounds(GenerateRequest, "timeout")[1],
                          help="seconds before the job is stopped (default: the most allowed)")
    generate.add_argument("-o", "--output", type=Path,
                          help="default: generated_<seed>.png; with --count, <stem>_<n> for each image")
    generate.add_argument("--api", metavar="URL", help="call this HTTP API (token from TOOLBOX_API_TOKEN) instead")
    generate.add_argument("--no-safety-check", action="store_true", help=SAFETY_HELP)


def _add_models_parser(commands) -> None:
    models = commands.add_parser("models", help="the LoRA and checkpoint library (CivitAI imports)")
    verbs = models.add_subparsers(dest="verb", required=True)
    do_import = verbs.add_parser("import", help="import from CivitAI: URL, model id, v:<version id>, AIR")
    do_import.add_argument("ref", metavar="REF")
    do_import.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    do_import.add_argument("--json", action="store_true", help="print the library entry as JSON")
    listing = verbs.add_parser("list", help="list the library")
    listing.add_argument("--type", choices=("lora", "checkpoint"))
    listing.add_argument("--query", help="search names, tags and trigger words")
    listing.add_argument("--json", action="store_true")
    info = verbs.add_parser("info", help="one model's details")
    info.add_argument("name", metavar="NAME")
    info.add_argument("--json", action="store_true")
    edit = verbs.add_parser("edit", help="rename, set trigger words or default weight")
    edit.add_argument("name", metavar="NAME")
    edit.add_argument("--name", dest="display_name", metavar="N")
    edit.add_argument("--triggers", metavar='"a, b"')
    edit.add_argument("--weight", type=float, metavar="W")
    delete = verbs.add_parser("delete", help="delete a model and its file")
    delete.add_argument("name", metavar="NAME")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    use = verbs.add_parser("use", help="set the active checkpoint (illustrious-xl for the default)")
    use.add_argument("checkpoint", metavar="CHECKPOINT")
    scan = verbs.add_parser("scan", help="untracked files and entries whose file is missing")
    scan.add_argument("--adopt", action="store_true", help="add the untracked files to the library")
    scan.add_argument("--json", action="store_true")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.load()
        if args.command == "bot":
            run_bot(settings)
        elif args.command == "caption":
            asyncio.run(caption_files(settings, args))
        elif args.command == "setup":
            asyncio.run(setup_models(settings, args.only, args.enable, args.disable))
        elif args.command == "status":
            asyncio.run(show_status(settings, args.json))
        elif args.command == "upscale":
            asyncio.run(upscale_file(settings, args))
        elif args.command == "generate":
            asyncio.run(generate_files(settings, args))
        elif args.command == "models":
            asyncio.run(models_command(settings, args))
        elif args.command == "serve":
            serve_api(settings, args)
        elif args.command == "migrate":
            asyncio.run(migrate(settings, args.dry_run, args.json))
    except ToolboxError as error:
        print(f"error: {error.code.value}: {error.message}", file=sys.stderr)
        return 2 if error.code in (ErrorCode.INVALID_INPUT, ErrorCode.INVALID_PROMPT) else 1
    except KeyboardInterrupt:
        print("Stopped. A download picks up where it left off the next time.", file=sys.stderr)
        _stop_engines_soon()
        return 1
    return 0


# After Ctrl-C the engines are told to stop; one still inside a library call that
# cannot be interrupted (a Hugging Face transfer between chunks) is not waited for.
STOP_GRACE_SECONDS = 1.5


def _stop_engines_soon() -> None:
    """Give the engine threads (told to stop by the backend's shutdown) a moment, then exit without them."""
    import os
    import time

    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for thread in threading.enumerate():
        if thread.name.startswith(ENGINE_THREAD_PREFIX):
            thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.name.startswith(ENGINE_THREAD_PREFIX) and thread.is_alive() for thread in threading.enumerate()):
        sys.stderr.flush()
        os._exit(1)


def run_bot(settings: Settings) -> None:
    """Until SIGTERM or Ctrl-C, which close the bot gracefully; a second Ctrl-C leaves at once."""
    import discord

    from bot.runner import bot_supervisor

    supervisor = bot_supervisor(settings)
    discord.utils.setup_logging(level=logging.INFO)
    stop = threading.Event()

    def request_stop(signum, frame) -> None:
        logging.getLogger("bot").info("stopping (%s)", signal.Signals(signum).name)
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    supervisor.run(stop)


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
    backend = await open_backend(settings)
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
    job = await backend.submit(CaptionRequest.parse({"images": batch, "style": args.style, "question": args.question}))

    async def show(record) -> None:
        bar.n = done_before + record.progress * len(batch)
        bar.set_postfix_str(record.stage)
        bar.refresh()

    captions = await follow_job(backend, job.id, show)
    bar.n = done_before + len(batch)
    bar.refresh()
    return captions


def _writable_output(path: Path) -> Path:
    """`path`, if a result can be written there; INVALID_INPUT before any job starts otherwise."""
    folder = path.parent
    if not folder.is_dir():
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"-o {path}: there is no folder {folder}.")
    if path.is_dir() or not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"-o {path}: cannot write a file there.")
    return path


async def upscale_file(settings: Settings, args: argparse.Namespace) -> None:
    from bot.upscale_requests import parse_lora_option, upscale_request
    from modal_services.library.entries import Library
    from modal_services.engines.sdxl.limits import DEFAULT_MAX_INPUT_PIXELS, check_upscale_size

    def read() -> tuple[bytes, tuple[int, int]]:
        try:
            data = args.image.read_bytes()
        except OSError as exc:
            raise ToolboxError(ErrorCode.INVALID_INPUT, f"{args.image}: {exc.strerror or exc}") from None
        image = decode_image(data, max_pixels=DEFAULT_MAX_INPUT_PIXELS, name=str(args.image)).image
        return encode_png(image), image.size

    # Everything is checked before the job starts: the file, the output, the values, the LoRA names, the sizes.
    png, size = await asyncio.to_thread(read)
    choices = {"scale": args.scale, "prompt": args.prompt, "negative": args.negative,
               "creativity": args.creativity, "seed": args.seed, "safety": cli_safety(args)}
    loras = [parse_lora_option(option) for option in args.lora]
    scale = args.scale or UpscaleRequest.model_fields["scale"].default
    output = args.output or args.image.with_name(f"{args.image.stem}_x{scale:g}.png")
    await asyncio.to_thread(_writable_output, output)
    backend = await open_backend(settings)
    try:
        library = Library.for_backend(backend.store, settings.backend == "local", settings.loras_dir, settings.models_dir)
        request, checkpoint = await upscale_request(library, png, choices, loras)
        width, height = check_upscale_size(*size, request.scale)
        if args.tile_captions:
            from bot.tile_prompts import tile_prompts

            with _job_bar("tile captions") as show:
                regions = await tile_prompts(backend, png, size, (width, height), show)
            request = UpscaleRequest.parse({**request.to_payload(), "region_prompts": regions})
        result = await _run_with_bar(backend, request, f"upscale {request.scale:g}x → {width}×{height}")
    finally:
        await backend.close()
    _report_withheld(result)
    if result["image"] is not None:
        await asyncio.to_thread(output.write_bytes, result["image"])
        print(f"{output} ({width}×{height}, seed {request.seed}, {checkpoint['name']})")


def serve_api(settings: Settings, args: argparse.Namespace) -> None:
    """The HTTP API with uvicorn on the local backend. No token is only allowed on loopback, and only when asked for."""
    if args.no_auth and args.host != LOOPBACK:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"--no-auth is only allowed with --host {LOOPBACK}.")
    if not args.no_auth and not settings.api_token:
        raise ToolboxError(ErrorCode.INVALID_INPUT,
                           f"Set TOOLBOX_API_TOKEN (or run on {LOOPBACK} with --no-auth) before serving the API.")
    import uvicorn

    from bot.api import api_for_settings

    app = api_for_settings(settings, None if args.no_auth else settings.api_token)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def output_paths(output: Path | None, first_seed: int, count: int) -> list[Path]:
    """Where each generated image goes: OUT itself for one image, OUT's stem numbered from 1 for several."""
    output = output or Path(f"generated_{first_seed}.png")
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{index}{output.suffix or '.png'}") for index in range(1, count + 1)]


async def generate_files(settings: Settings, args: argparse.Namespace) -> None:
    """On the local backend, or through the HTTP API at --api; the images written, each with its seed printed."""
    from bot.generate_requests import FACE_NEEDS_SDXL, face_notes, flux_generate_request, generate_model, generate_request
    from bot.upscale_requests import parse_lora_option
    from modal_services.jobs.requests import ASPECT_BUCKETS, FLUX_ASPECT_BUCKETS
    from modal_services.library.entries import Library

    flux = generate_model(args.model) == "flux"
    if (args.width is None) != (args.height is None):
        raise ToolboxError(ErrorCode.INVALID_INPUT, "Give --width and --height together (or --aspect).")
    if args.width is None and not flux and args.aspect not in ASPECT_BUCKETS:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"--aspect {args.aspect} is made by Flux only: add --model flux.")
    width, height = (args.width, args.height) if args.width is not None else FLUX_ASPECT_BUCKETS[args.aspect]
    choices = {"prompt": args.prompt, "negative_prompt": args.negative, "width": width, "height": height,
               "count": args.count, "steps": args.steps, "cfg": args.cfg, "seed": args.seed, "timeout": args.timeout,
               "safety": cli_safety(args),
               "identity_strength": args.identity_strength, "controlnet_strength": args.controlnet_strength}
    if args.pose is not None and args.face is None:
        raise ToolboxError(ErrorCode.INVALID_INPUT, "--pose is used only with --face.")
    if flux and args.face is not None:
        raise ToolboxError(ErrorCode.INVALID_INPUT, FACE_NEEDS_SDXL)
    for field, path in (("face_image", args.face), ("pose_image", args.pose)):
        if path is not None:
            choices[field] = await asyncio.to_thread(_read_photo, path)
    loras = [parse_lora_option(option) for option in args.lora]
    if args.api:
        await generate_through_api(settings, args, choices, loras)
        return
    backend = await open_backend(settings)
    try:
        library = Library.for_backend(backend.store, settings.backend == "local", settings.loras_dir, settings.models_dir)
        request, checkpoint = await (flux_generate_request if flux else generate_request)(library, choices, loras)
        paths = output_paths(args.output, request.seed, request.count)
        for path in paths:
            await asyncio.to_thread(_writable_output, path)
        result = await _run_with_bar(backend, request, f"generate {request.count} × {width}×{height}")
    finally:
        await backend.close()
    _report_withheld(result)
    for path, png, image_seed in zip(paths, result["images"], result["seeds"]):
        if png is not None:
            await asyncio.to_thread(path.write_bytes, png)
            print(f"{path} ({result['width']}×{result['height']}, seed {image_seed}, {checkpoint['name']})")
    for note in face_notes(result.get("face")):
        print(note)


def _read_photo(path: Path) -> bytes:
    """A face or pose photo as the bot sends one: decoded, shrunk to what face analysis uses, a PNG."""
    from modal_services.jobs.requests import REFERENCE_MAX_SIDE

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"{path}: {exc.strerror or exc}") from None
    return shrunk_png(data, REFERENCE_MAX_SIDE, name=str(path))


# The HTTP API's names for the request's photos.
API_PHOTO_FIELDS = {"face_image": "reference_image_base64", "pose_image": "pose_image_base64"}


async def generate_through_api(settings: Settings, args: argparse.Namespace, choices: dict, loras: list[dict]) -> None:
    """`toolbox generate --api URL`: the same request through the HTTP API's job endpoints, as a remote client would."""
    import base64

    from bot.api import ApiClient
    from bot.generate_requests import face_notes, generate_model
    from modal_services.jobs.requests import FluxGenerateRequest, GenerateRequest

    # Checked here first, with the seed drawn, so that the files are named and known writable before the call.
    given = {name: value for name, value in choices.items() if value is not None and name != "safety"}
    if generate_model(args.model) == "flux":
        request = FluxGenerateRequest.parse({("guidance" if name == "cfg" else name): value for name, value in given.items()})
        given["model"] = "flux-dev"
    else:
        request = GenerateRequest.parse(given)
    for field, wire_name in API_PHOTO_FIELDS.items():
        if field in given:
            given[wire_name] = base64.b64encode(given.pop(field)).decode("ascii")
    paths = output_paths(args.output, request.seed, request.count)
    for path in paths:
        await asyncio.to_thread(_writable_output, path)
    async with ApiClient(args.api, settings.api_token) as client:
        with _job_bar(f"generate {request.count} × {request.width}×{request.height} via {args.api}") as show:
            result = await client.run({"kind": "generate", **given, "seed": request.seed, "loras": loras,
                                       "safety_check": not args.no_safety_check}, show)
    width, height = result["image_size"]
    images = result.get("images_base64") or [result["image_base64"]]
    if result["safety"]["withheld"]:
        print(result["safety"]["note"], file=sys.stderr)
    for path, image, image_seed in zip(paths, images, result["metadata"]["seeds_used"]):
        if image is not None:
            await asyncio.to_thread(path.write_bytes, base64.b64decode(image))
            print(f"{path} ({width}×{height}, seed {image_seed}, {result['model_info']['base_model']})")
    for note in face_notes(result.get("face")):
        print(note)


async def setup_models(settings: Settings, only: list[str] | None, enable: list[str] = (),
                       disable: list[str] = ()) -> None:
    """Download the missing base models (or `--only` these, recommended LoRAs included), after
    enabling or disabling optional models (`--disable` only disables)."""
    from modal_services.library.entries import Library
    from modal_services.base_models.optional_models import optional_entry, set_enabled
    from modal_services.base_models.registry import STARTER_LORAS, split_setup_keys

    base_keys, starters = split_setup_keys(only)  # an unknown key fails here, before anything starts
    for key in (*enable, *disable):
        optional_entry(key)
    backend = await open_backend(settings)
    library = Library.for_backend(backend.store, settings.backend == "local", settings.loras_dir, settings.models_dir)
    by = "`toolbox setup` on the command line"
    try:
        for key in disable:
            entry = await set_enabled(backend.store, key, False, by)
            print(f"Disabled {entry.name}; files already downloaded stay.")
        if disable:
            return
        for key in enable:
            entry = await set_enabled(backend.store, key, True, by)
            print(f"Enabled {entry.name}, accepting its terms: {entry.optional.summary} ({entry.optional.url})")
        if base_keys or not only:
            await _download_base_models(settings, backend, base_keys)
        if starters:
            await _import_starter_loras(settings, backend, library, starters)
        elif not only:
            missing = [s.key for s in STARTER_LORAS.values() if await library.by_model(s.civitai_model_id) is None]
            if missing:
                print(f"Recommended LoRAs (optional): toolbox setup --only {' '.join(missing)}")
    finally:
        await backend.close()


async def _download_base_models(settings: Settings, backend: Backend, keys: list[str]) -> None:
    """The missing ones of `keys` (all when empty), with a bar per model and an overall bar."""
    from bot.core.following import watch_job
    from bot.setup_download import checked_states, start_or_attach_download
    from modal_services.base_models.states import model_states
    from modal_services.base_models.optional_models import enabled_models
    from modal_services.base_models.registry import resolve_keys

    entries = resolve_keys(keys, enabled=await enabled_models(backend.store))
    states = await checked_states(settings, backend.store, entries, hashes=True)
    missing = [state.key for state in states if state.state != "present"]
    if not missing:
        print("All requested base models are present.")
        return
    job_id, started = await start_or_attach_download(
        backend.store, lambda: backend.submit(DownloadRequest.parse({"keys": missing}), owner={"cli": True}),
        backend.runs_jobs_in_process,
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
        job = await watch_job(backend, job_id, show)
    finally:
        for bar in (overall, *bars.values()):
            bar.close()
    if job.error() is not None:
        raise job.error()
    print(f"Downloaded: {', '.join(missing)}.")


async def _import_starter_loras(settings: Settings, backend: Backend, library, starters: list) -> None:
    """Each recommended LoRA not in the library yet, through the CivitAI importer's job; failures reported together."""
    failures: list[tuple[str, ToolboxError]] = []
    for starter in starters:
        installed = await library.by_model(starter.civitai_model_id)
        if installed is not None:
            print(f"{starter.key}: already in the library as {installed.file}.")
            continue
        try:
            request = ModelImportRequest.parse({"ref": starter.reference, "api_base": settings.civitai_api_base})
            result = await _run_with_bar(backend, request, f"importing {starter.name}")
        except ToolboxError as error:
            failures.append((starter.key, error))
            continue
        entry = result["entry"]
        print(f"{starter.key}: imported as {entry['file']} (triggers: {', '.join(entry['trigger_words']) or 'none'}).")
    if len(starters) == 1 and failures:
        raise failures[0][1]
    if failures:
        keys = ", ".join(key for key, _ in failures)
        first = failures[0][1]
        raise ToolboxError(first.code, f"{len(failures)} of {len(starters)} LoRAs failed ({keys}). {first.message}")


async def show_status(settings: Settings, as_json: bool) -> None:
    """Base models (present = manifest and, locally, the files on disk), tokens (masked), the running download."""
    import json

    from bot.setup_download import active_download, checked_states
    from modal_services.library.entries import Library
    from modal_services.base_models.optional_models import enabled_record, setup_entries
    from modal_services.base_models.registry import STARTER_LORAS, optional_entries
    from modal_services.base_models.tokens import SERVICES, token_state

    backend = await open_backend(settings)
    store = backend.store
    try:
        states = await checked_states(settings, store, await setup_entries(store))
        optional = {entry.key: {"name": entry.name, "terms": entry.optional.summary, "url": entry.optional.url,
                                "enabled": await enabled_record(store, entry.key)} for entry in optional_entries()}
        tokens = [await token_state(store, service) for service in SERVICES]
        library = Library.for_backend(store, settings.backend == "local", settings.loras_dir, settings.models_dir)
        starters = {}
        for starter in STARTER_LORAS.values():
            installed = await library.by_model(starter.civitai_model_id)
            starters[starter.key] = {"name": starter.name, "civitai_model_id": starter.civitai_model_id,
                                     "installed": installed.file if installed else None}
        document = {
            "backend": settings.backend,
            "data_dir": str(settings.data_dir) if settings.backend == "local" else None,
            "models": [state.to_dict() for state in states],
            "starter_loras": starters,
            "optional_models": optional,
            "tokens": {t.service: {"set": t.is_set, "masked": t.masked, "source": t.source, "user": t.user} for t in tokens},
            "active_download": await active_download(store),
            "active_checkpoint": await store.get(ACTIVE_CHECKPOINT_KEY),
            "jobs": await _job_counts(store),
        }
    finally:
        await backend.close()
    if as_json:
        print(json.dumps(document, indent=2))
        return
    if document["data_dir"]:
        print(f"data dir: {document['data_dir']}")
    for state in states:
        extra = f" ({state.detail})" if state.detail else ""
        print(f"{state.key:16} {state.state:12} {state.size_bytes / 1e9:6.2f} GB{extra}")
    for key, starter in document["starter_loras"].items():
        print(f"{key:24} {'installed as ' + starter['installed'] if starter['installed'] else 'not installed (optional)'}")
    for key, model in optional.items():
        enabled = f"enabled by {model['enabled']['by']}" if model["enabled"] else f"not enabled (toolbox setup --enable {key})"
        print(f"{key:24} {enabled} · {model['terms']}")
    for token in tokens:
        print(token.describe())
    if document["active_download"]:
        print(f"download running: job {document['active_download']}")
    if document["active_checkpoint"]:
        print(f"active checkpoint: {document['active_checkpoint']}")
    for kind, counts in document["jobs"].items():
        print(f"jobs {kind}: {counts['running']} running, {counts['queued']} queued")


async def _job_counts(store) -> dict[str, dict[str, int]]:
    """Unfinished jobs per kind."""
    from modal_services.jobs.records import Job, JobStatus

    counts: dict[str, dict[str, int]] = {}
    for record in (await store.items(JOB_PREFIX)).values():
        job = Job.from_dict(record)
        if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            counts.setdefault(job.kind, {"queued": 0, "running": 0})[job.status.value] += 1
    return counts


async def migrate(settings: Settings, dry_run: bool, as_json: bool) -> None:
    """The migration of the older toolbox's files: the data dir's, or the Modal volumes' (beside them)."""
    import json

    from modal_services.library.migration_report import MigrationReport, render_report

    if settings.backend == "modal":
        report = MigrationReport.from_dict(await _migrate_on_modal(settings, dry_run))
    else:
        report = await _migrate_data_dir(settings, dry_run)
    print(json.dumps(report.to_dict(), indent=2) if as_json else render_report(report))


async def _migrate_data_dir(settings: Settings, dry_run: bool):
    import tempfile

    from modal_services.layout import Layout
    from modal_services.library.migration import Migration
    from modal_services.state.store import SqliteStore

    with tempfile.TemporaryDirectory() as scratch:
        # A dry run on a data dir without state must not create it: it reads an empty store instead.
        fresh = dry_run and not settings.state_path.exists()
        store = SqliteStore(Path(scratch) / "state.sqlite3" if fresh else settings.state_path)
        try:
            migration = Migration(Layout(settings.models_dir, settings.loras_dir, store), dry_run=dry_run,
                                  on_step=lambda text: print(f"{text}…", file=sys.stderr))
            return await migration.run()
        finally:
            await store.close()


async def _migrate_on_modal(settings: Settings, dry_run: bool) -> dict:
    """The deployed app's `migrate_volumes`, which runs where the volumes are mounted."""
    import modal

    print(f"migrating the volumes of the Modal app {settings.modal_app!r}…", file=sys.stderr)
    try:
        return await modal.Function.from_name(settings.modal_app, "migrate_volumes").remote.aio(dry_run)
    except modal.exception.Error as exc:
        raise ToolboxError(ErrorCode.BACKEND_UNAVAILABLE,
                           f"The Modal app {settings.modal_app!r} could not be reached. Is it deployed "
                           "(`modal deploy -m modal_services.app`)? `modal run -m modal_services.app::migrate` "
                           "runs the migration without a deployment.") from exc


# -- toolbox models ------------------------------------------------------------------

def _confirm(question: str, yes: bool) -> None:
    """Ask on a terminal; refuse (no prompt to hang on) when stdin is not one and --yes is missing."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise ToolboxError(ErrorCode.INVALID_INPUT, "Confirmation needed: run again with --yes.")
    if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
        raise ToolboxError(ErrorCode.CANCELLED, "Nothing was changed.")


def _entry_lines(document: dict) -> str:
    words = ", ".join(document["trigger_words"]) or "none"
    weight = f", weight {document['weight']:g}" if document.get("weight") is not None else ""
    missing = "  [file missing]" if document.get("missing") else ""
    return (f"{document['name']}  ({document['type']}, {document.get('base_model') or '?'}{weight}){missing}\n"
            f"  file: {document['path']}\n  triggers: {words}\n  size: {document['size_bytes'] / 2**20:.1f} MiB"
            f"  sha256: {document.get('sha256') or '?'}  source: {document['source']}")


@contextlib.contextmanager
def _job_bar(title: str):
    """A terminal bar for one job: yields the `on_update` to give follow_job; full when the job ends."""
    with tqdm(total=100, unit="%", desc=title, disable=None, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}") as bar:
        async def show(record) -> None:
            bar.n = round(record.progress * 100)
            bar.set_postfix_str(record.stage[:60])
            bar.refresh()

        yield show
        bar.n = 100
        bar.refresh()


async def _run_with_bar(backend: Backend, request, title: str):
    job = await backend.submit(request, meta={"title": title})
    with _job_bar(title) as show:
        return await follow_job(backend, job.id, show)


async def models_command(settings: Settings, args: argparse.Namespace) -> None:
    import json

    from modal_services.library.civitai import CivitaiClient, parse_reference
    from modal_services.library.civitai_plans import plan_import
    from modal_services.library.entries import Library
    from modal_services.base_models.tokens import get_token

    ref = parse_reference(args.ref) if args.verb == "import" else None  # bad input fails before anything starts
    backend = await open_backend(settings)
    library = Library.for_backend(backend.store, settings.backend == "local", settings.loras_dir, settings.models_dir)
    try:
        if args.verb == "import":
            client = CivitaiClient(settings.civitai_api_base, await get_token(backend.store, "civitai"))
            try:
                plan = await asyncio.to_thread(plan_import, client, ref)
            finally:
                client.close()
            installed = await library.by_version(plan.version_id)
            if installed is None or installed.missing:
                print(f"{plan.name} · {plan.version_name}: {plan.civitai_type} for {plan.base_model}, "
                      f"{plan.file_name} ({plan.size_bytes / 2**20:.1f} MiB, {plan.format})\n"
                      f"  triggers: {', '.join(plan.trigger_words) or 'none'}\n  {plan.page_url}", file=sys.stderr)
                _confirm("Download it?", args.yes)
                request = ModelImportRequest.parse({"ref": f"v:{plan.version_id}", "api_base": settings.civitai_api_base})
                result = await _run_with_bar(backend, request, f"importing {plan.name}")
                document = result["entry"]
            else:
                document = library.to_json(installed)
                print("already installed", file=sys.stderr)
            print(json.dumps(document, indent=2) if args.json else _entry_lines(document))
        elif args.verb == "list":
            found = await library.search(args.query, args.type)
            if args.json:
                print(json.dumps([library.to_json(entry) for entry in found], indent=2))
            else:
                active = (await library.active_checkpoint())["file"]
                for entry in found:
                    star = "*" if entry.file == active else " "
                    missing = "  [file missing]" if entry.missing else ""
                    print(f"{star} {entry.type:10} {entry.name[:40]:40} {entry.file}{missing}")
                if not found:
                    print("no models", file=sys.stderr)
        elif args.verb == "info":
            document = library.to_json(await library.find(args.name))
            print(json.dumps(document, indent=2) if args.json else _entry_lines(document))
        elif args.verb == "edit":
            entry = await library.edit(args.name, args.display_name, args.triggers, args.weight)
            print(_entry_lines(library.to_json(entry)))
        elif args.verb == "delete":
            entry = await library.find(args.name)
            if (await library.active_checkpoint())["file"] == entry.file:
                raise ToolboxError(ErrorCode.INVALID_INPUT, f"{entry.name} is the active checkpoint: `toolbox models use` another first.")
            _confirm(f"Delete {entry.name} ({entry.file})?", args.yes)
            await _run_with_bar(backend, ModelDeleteRequest.parse({"name": entry.file}), f"deleting {entry.name}")
            print(f"deleted {entry.file}")
        elif args.verb == "use":
            active = await library.set_active_checkpoint(args.checkpoint)
            print(f"active checkpoint: {active['name']} ({active['path']})")
        elif args.verb == "scan":
            request = ModelScanRequest.parse({"adopt": args.adopt, "api_base": settings.civitai_api_base})
            report = await _run_with_bar(backend, request, "scanning")
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                for item in report["untracked"]:
                    print(f"untracked {item['type']:10} {item['file']}")
                for file in report["missing"]:
                    print(f"missing            {file}")
                for failed in report["failed"]:
                    print(f"not adopted {failed['file']}: {failed['code']}: {failed['message']}")
    finally:
        await backend.close()
