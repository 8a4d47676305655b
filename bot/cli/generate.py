"""`toolbox generate`: images from a prompt with SDXL (InstantID faces included) or FLUX.1-dev, on the
local backend or through the HTTP API (`--api URL`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bot.cli.common import (
    SAFETY_HELP, cli_safety, job_bar, opened_backend, parse_lora_option, read_input, report_withheld,
    run_with_bar, writable_output,
)
from bot.core.library import library_for
from bot.core.choices import GenerateChoices
from bot.core.generate_models import MODEL_ALIASES, SDXL, aspect_sizes, generate_model
from modal_services.jobs.requests import GenerateRequest
from modal_services.jobs.validation import field_bounds

if TYPE_CHECKING:
    from bot.core.build import CheckedGenerate
    from bot.settings import Settings

# The HTTP API's names for the request's photos.
API_PHOTO_FIELDS = {"face_image": "reference_image_base64", "pose_image": "pose_image_base64"}


def register(commands) -> None:
    fields = GenerateRequest.model_fields
    generate = commands.add_parser("generate", help="make images from a prompt with SDXL or FLUX.1-dev")
    generate.add_argument("prompt", metavar="PROMPT")
    # The values are checked by the shared core, in the words every front end uses.
    generate.add_argument("--model", default=SDXL.key, metavar="{" + ",".join(MODEL_ALIASES) + "}",
                          help="flux: FLUX.1-dev (once enabled in setup): guidance as --cfg (3.5), no --negative")
    generate.add_argument("--negative", default="")
    generate.add_argument("--aspect", default="1:1", metavar="{" + ",".join(aspect_sizes()) + "}",
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
    generate.set_defaults(run=generate_files)


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


async def generate_choices(args: argparse.Namespace) -> GenerateChoices:
    """The terminal's options as a text-to-image request (None for a default), the photos read."""
    import asyncio

    takes_faces = generate_model(args.model).takes_faces
    # A model that takes no face refuses a photo unread: empty bytes say one was given.
    photos = {field: None if path is None else await asyncio.to_thread(_read_photo, path) if takes_faces else b""
              for field, path in (("face_image", args.face), ("pose_image", args.pose))}
    return GenerateChoices(
        prompt=args.prompt, model=args.model, negative=args.negative or None, aspect=args.aspect,
        width=args.width, height=args.height, count=args.count, steps=args.steps, cfg=args.cfg, seed=args.seed,
        loras=tuple(parse_lora_option(option) for option in args.lora), **photos,
        identity_strength=args.identity_strength, controlnet_strength=args.controlnet_strength,
        timeout=args.timeout, safety=cli_safety(args),
    )


async def generate_files(settings: Settings, args: argparse.Namespace) -> None:
    """On the local backend, or through the HTTP API at --api; the images written, each with its seed printed."""
    import asyncio

    from bot.core.build import build_generate_request, check_generate_choices

    choices = await generate_choices(args)
    # Every value and rule is checked before anything starts (the backend, the API call).
    checked = check_generate_choices(choices)
    if args.api:
        await generate_through_api(settings, args, choices, checked)
        return
    async with opened_backend(settings) as backend:
        built = await build_generate_request(library_for(settings, backend.store), choices)
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


def _print_job_notes(result: dict) -> None:
    from bot.core.results import job_notes

    for note in job_notes(result):
        print(note)


async def generate_through_api(settings: Settings, args: argparse.Namespace, choices: GenerateChoices,
                               checked: CheckedGenerate) -> None:
    """`toolbox generate --api URL`: the same request through the HTTP API's job endpoints, as a remote client
    would; `checked` (the seed drawn) names the files, known writable before the call."""
    import asyncio
    import base64

    from bot.api import ApiClient

    request = checked.request
    paths = output_paths(args.output, request.seed, request.count)
    for path in paths:
        await asyncio.to_thread(writable_output, path)
    photos = {API_PHOTO_FIELDS[field]: base64.b64encode(photo).decode("ascii")
              for field in API_PHOTO_FIELDS if (photo := getattr(choices, field)) is not None}
    body = {
        "kind": "generate", "prompt": choices.prompt, "model": checked.model.key, "negative_prompt": choices.negative,
        "width": request.width, "height": request.height, "count": choices.count, "steps": choices.steps,
        "cfg": choices.cfg, "seed": request.seed, "timeout": choices.timeout, **photos,
        "identity_strength": choices.identity_strength, "controlnet_strength": choices.controlnet_strength,
        "loras": [{"name": lora.name, "weight": lora.weight} for lora in choices.loras],
        "safety_check": not args.no_safety_check,
    }
    async with ApiClient(args.api, settings.api_token) as client:
        with job_bar(f"generate {request.count} × {request.width}×{request.height} via {args.api}") as show:
            result = await client.run({name: value for name, value in body.items() if value is not None}, show)
    width, height = result["image_size"]
    images = result.get("images_base64") or [result["image_base64"]]
    if result["safety"]["withheld"]:
        print(result["safety"]["note"], file=sys.stderr)
    for path, image, image_seed in zip(paths, images, result["metadata"]["seeds_used"]):
        if image is not None:
            await asyncio.to_thread(path.write_bytes, base64.b64decode(image))
            print(f"{path} ({width}×{height}, seed {image_seed}, {result['model_info']['base_model']})")
    _print_job_notes(result)
