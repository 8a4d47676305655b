"""`toolbox generate`: images from a prompt with SDXL (InstantID faces included) or FLUX.1-dev, on the
local backend or through the HTTP API (`--api URL`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bot.cli.common import (
    LORA_HELP, SAFETY_HELP, SEED_HELP, cli_safety, job_bar, opened_backend, parse_lora_option, read_input,
    report_withheld, run_with_bar, writable_output,
)
from bot.core.library import library_for
from bot.core.model_names import DEFAULT_MODEL, MODEL_ALIASES
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.samplers import SAMPLER_NAMES
from modal_services.jobs.limits import (
    CFG, CONTROLNET_STRENGTH, FLUX_ASPECT_BUCKETS, FLUX_SIDE, GENERATION_STEPS, GUIDANCE, IDENTITY_STRENGTH,
    IMAGE_COUNT, MAX_TIMEOUT_SECONDS, SDXL_SIDE, SIDE_MULTIPLE,
)

if TYPE_CHECKING:
    from bot.core.build import CheckedGenerate
    from bot.core.choices import GenerateChoices
    from bot.settings import Settings

# The HTTP API's names for the request's photos.
API_PHOTO_FIELDS = {"face_image": "reference_image_base64", "pose_image": "pose_image_base64"}
DEFAULT_ASPECT = "1:1"


SIDE_HELP = (f"SDXL {SDXL_SIDE.low}-{SDXL_SIDE.high}, Flux {FLUX_SIDE.low}-{FLUX_SIDE.high}, a multiple of "
             f"{SIDE_MULTIPLE} (default: from --aspect; with the other side, instead of --aspect)")


def register(commands) -> None:
    generate = commands.add_parser("generate", help="make images from a prompt with SDXL or FLUX.1-dev")
    generate.add_argument("prompt", metavar="PROMPT", nargs="?", help="what to draw (optional with --remix)")
    generate.add_argument("--remix", metavar="URL_OR_ID",
                          help="a CivitAI image (https://civitai.com/images/<id>, or its id): its published prompt and "
                               "settings, with the library's checkpoint and LoRAs, for every option not given")
    # The values are checked by the shared core, in the words every front end uses.
    generate.add_argument("--model", metavar="{" + ",".join(MODEL_ALIASES) + "}",
                          help=f"default {DEFAULT_MODEL}; flux: FLUX.1-dev (once enabled in setup): guidance as "
                               "--cfg, no --negative")
    generate.add_argument("--negative", default="", help="what to steer away from (SDXL only)")
    generate.add_argument("--aspect", metavar="{" + ",".join(FLUX_ASPECT_BUCKETS) + "}",
                          help="a size bucket, default 1:1 (the 2MP ones are Flux's)")
    generate.add_argument("--width", type=int, help=SIDE_HELP)
    generate.add_argument("--height", type=int, help=SIDE_HELP)
    generate.add_argument("--count", type=int, help=f"images in one batch, {IMAGE_COUNT.describe()}")
    generate.add_argument("--steps", type=int, help=GENERATION_STEPS.describe())
    generate.add_argument("--cfg", type=float, help=f"how closely to follow the prompt: SDXL's CFG {CFG.describe()}, "
                                                    f"Flux's guidance {GUIDANCE.describe()}")
    generate.add_argument("--sampler", metavar="NAME",
                          help=f"SDXL's sampler, one of {', '.join(SAMPLER_NAMES)} (default: the checkpoint's)")
    generate.add_argument("--seed", type=int, help=f"{SEED_HELP}; image n gets seed + n - 1")
    generate.add_argument("--lora", action="append", default=[], metavar="NAME[:WEIGHT]", help=LORA_HELP)
    generate.add_argument("--face", type=Path, metavar="PHOTO", help="InstantID: every image keeps this person's face")
    generate.add_argument("--pose", type=Path, metavar="PHOTO", help="with --face: the face in this photo sets the pose")
    generate.add_argument("--identity-strength", type=float,
                          help=f"how strongly the face is kept, {IDENTITY_STRENGTH.describe()}")
    generate.add_argument("--controlnet-strength", type=float,
                          help=f"how closely the pose is followed, {CONTROLNET_STRENGTH.describe()}")
    generate.add_argument("--timeout", type=float, default=MAX_TIMEOUT_SECONDS,
                          help=f"seconds before the job is stopped, more than 0 up to {MAX_TIMEOUT_SECONDS:g} "
                               f"(default {MAX_TIMEOUT_SECONDS:g})")
    generate.add_argument("-o", "--output", type=Path,
                          help="default: generated_<seed>.png; with --count, <stem>_<n> for each image")
    generate.add_argument("--api", metavar="URL", help="call this HTTP API (token from TOOLBOX_API_TOKEN) instead")
    generate.add_argument("--no-safety-check", action="store_true", help=SAFETY_HELP)
    generate.set_defaults(run=generate_files)


def api_url(url: str) -> str:
    """The --api URL, if it can be one: an http(s) address with a host; INVALID_INPUT before any connection."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # a port that is not a number raises here
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ToolboxError(ErrorCode.INVALID_INPUT,
                           f"--api {url[:100]!r} is not an API address: give one like http://127.0.0.1:8000.")
    return url


def output_paths(output: Path | None, first_seed: int, count: int) -> list[Path]:
    """Where each generated image goes: OUT itself for one image, OUT's stem numbered from 1 for several."""
    output = output or Path(f"generated_{first_seed}.png")
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{index}{output.suffix or '.png'}") for index in range(1, count + 1)]


def _read_photo(path: Path) -> bytes:
    """A face or pose photo as the bot sends one: decoded, shrunk to what face analysis uses, a PNG."""
    from modal_services.imaging import shrunk_png
    from modal_services.jobs.requests import REFERENCE_MAX_SIDE

    return shrunk_png(read_input(path), REFERENCE_MAX_SIDE, name=str(path))


def given_options(args: argparse.Namespace) -> set[str]:
    """The choices the terminal's options give (those a remix's settings do not replace)."""
    from bot.core.choices import GenerateChoices

    return {name for name in GenerateChoices.__dataclass_fields__
            if getattr(args, name, None) not in (None, "", [])} | ({"loras"} if args.lora else set())


async def generate_choices(args: argparse.Namespace) -> GenerateChoices:
    """The terminal's options as a text-to-image request (None for a default), the photos read; without
    --remix, the model and aspect have their defaults."""
    import asyncio

    from bot.core.choices import GenerateChoices
    from bot.core.generate_models import generate_model

    if args.remix is None:
        if args.prompt is None:
            raise ToolboxError(ErrorCode.INVALID_PROMPT, "Give a prompt, or a CivitAI image to remix (--remix).")
        args.model, args.aspect = args.model or DEFAULT_MODEL, args.aspect or DEFAULT_ASPECT
    takes_faces = generate_model(args.model).takes_faces
    # A model that takes no face refuses a photo unread: empty bytes say one was given.
    photos = {field: None if path is None else await asyncio.to_thread(_read_photo, path) if takes_faces else b""
              for field, path in (("face_image", args.face), ("pose_image", args.pose))}
    return GenerateChoices(
        prompt=args.prompt, model=args.model, negative=args.negative or None, aspect=args.aspect,
        width=args.width, height=args.height, count=args.count, steps=args.steps, cfg=args.cfg, seed=args.seed,
        sampler=args.sampler,
        loras=tuple(parse_lora_option(option) for option in args.lora), **photos,
        identity_strength=args.identity_strength, controlnet_strength=args.controlnet_strength,
        timeout=args.timeout, safety=cli_safety(args),
    )


async def generate_files(settings: Settings, args: argparse.Namespace) -> None:
    """On the local backend, or through the HTTP API at --api; the images written, each with its seed printed.
    With --remix, the CivitAI image's settings fill every option not given (the API reads the image itself)."""
    import asyncio

    from bot.core.build import build_generate_request, check_generate_choices

    if args.api:
        api_url(args.api)
    choices = await generate_choices(args)
    # Every value and rule is checked before anything starts (the backend, the API call); a remix's once read.
    checked = check_generate_choices(choices) if args.remix is None else None
    if args.api:
        await generate_through_api(settings, args, choices, checked)
        return
    async with opened_backend(settings) as backend:
        library = library_for(settings, backend.store)
        if args.remix is not None:
            choices = await _remixed(settings, args, library, choices)
        built = await build_generate_request(library, choices)
        request = built.request
        paths = output_paths(args.output, request.seed, request.count)
        for path in paths:
            await asyncio.to_thread(writable_output, path)
        result = await run_with_bar(backend, request, f"generate {request.count} × {request.width}×{request.height}")
    report_withheld(result)
    for path, png, image_seed in zip(paths, result["images"], result["seeds"]):
        if png is not None:
            await asyncio.to_thread(path.write_bytes, png)
            print(f"{path} ({result['width']}×{result['height']}, seed {image_seed}, {built.checkpoint['name']})")
    _print_job_notes(result)


async def _remixed(settings: Settings, args: argparse.Namespace, library, choices: GenerateChoices) -> GenerateChoices:
    """`choices` with the remixed image's settings for the options not given; what differs is printed."""
    from bot.core.remix import civitai_client, plan_remix, remixed_choices

    remix = await plan_remix(args.remix, await civitai_client(settings.civitai_api_base, library.store), library)
    for line in [f"Remix of CivitAI image {remix.image_id} ({remix.page})", *remix.differences()]:
        print(line, file=sys.stderr)
    return remixed_choices(remix, choices, given_options(args))


def _print_job_notes(result: dict) -> None:
    from bot.core.results import job_notes

    for note in job_notes(result):
        print(note)


def _api_body(args: argparse.Namespace, choices: GenerateChoices, checked: CheckedGenerate | None) -> dict:
    """The job body: every choice, the seed drawn and the model's size; with --remix, only those given."""
    import base64

    photos = {API_PHOTO_FIELDS[field]: base64.b64encode(photo).decode("ascii")
              for field in API_PHOTO_FIELDS if (photo := getattr(choices, field)) is not None}
    body = {
        "kind": "generate", "remix": args.remix, "prompt": choices.prompt, "model": choices.model,
        "negative_prompt": choices.negative, "width": choices.width, "height": choices.height, "count": choices.count,
        "steps": choices.steps, "cfg": choices.cfg, "sampler": choices.sampler, "seed": choices.seed,
        "timeout": choices.timeout, **photos,
        "identity_strength": choices.identity_strength, "controlnet_strength": choices.controlnet_strength,
        "loras": [{"name": lora.name, "weight": lora.weight} for lora in choices.loras] or None,
        "safety_check": not args.no_safety_check,
    }
    if checked is not None:
        request = checked.request
        body |= {"model": checked.model.key, "width": request.width, "height": request.height, "seed": request.seed}
    return {name: value for name, value in body.items() if value is not None}


async def generate_through_api(settings: Settings, args: argparse.Namespace, choices: GenerateChoices,
                               checked: CheckedGenerate | None) -> None:
    """`toolbox generate --api URL`: the same request through the HTTP API's job endpoints, as a remote client
    would; `checked` (the seed drawn) names the files, known writable before the call. A remix (no `checked`)
    is read by the API; its files are named by the seed it used."""
    import asyncio
    import base64

    from bot.api import ApiClient

    paths = None
    if checked is not None:
        paths = output_paths(args.output, checked.request.seed, checked.request.count)
        for path in paths:
            await asyncio.to_thread(writable_output, path)
    what = f"remix of {args.remix}" if checked is None else \
        f"{checked.request.count} × {checked.request.width}×{checked.request.height}"
    async with ApiClient(args.api, settings.api_token) as client:
        with job_bar(f"generate {what} via {args.api}") as show:
            result = await client.run(_api_body(args, choices, checked), show)
    width, height = result["image_size"]
    images = result.get("images_base64") or [result["image_base64"]]
    seeds = result["metadata"]["seeds_used"]
    paths = paths or [await asyncio.to_thread(writable_output, path) for path in output_paths(args.output, seeds[0], len(seeds))]
    if result["safety"]["withheld"]:
        print(result["safety"]["note"], file=sys.stderr)
    for path, image, image_seed in zip(paths, images, seeds):
        if image is not None:
            await asyncio.to_thread(path.write_bytes, base64.b64decode(image))
            print(f"{path} ({width}×{height}, seed {image_seed}, {result['model_info']['base_model']})")
    _print_job_notes(result)
