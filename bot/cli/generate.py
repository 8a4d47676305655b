"""`toolbox generate`: images from a prompt with SDXL (InstantID faces included) or FLUX.1-dev, on the
local backend or through the HTTP API (`--api URL`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.cli.common import (
    SAFETY_HELP, cli_safety, job_bar, library_for, opened_backend, read_input, report_withheld, run_with_bar,
    writable_output,
)
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.requests import FLUX_ASPECT_BUCKETS, GenerateRequest, field_bounds

if TYPE_CHECKING:
    from bot.settings import Settings
    from modal_services.jobs.requests import FluxGenerateRequest
    from modal_services.library.entries import Library

# The HTTP API's names for the request's photos.
API_PHOTO_FIELDS = {"face_image": "reference_image_base64", "pose_image": "pose_image_base64"}


def register(commands) -> None:
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


async def generate_choices(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The terminal's options as the request's choices (None for a default, the photos read) and LoRAs
    ({name, weight}); the rules between options are checked here, before anything starts."""
    import asyncio

    from bot.generate_requests import FACE_NEEDS_SDXL, generate_model
    from bot.upscale_requests import parse_lora_option
    from modal_services.jobs.requests import ASPECT_BUCKETS

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
    return choices, [parse_lora_option(option) for option in args.lora]


async def build_request(library: Library, model: str, choices: dict[str, Any],
                        loras: list[dict[str, Any]]) -> tuple[GenerateRequest | FluxGenerateRequest, dict]:
    """The checked request for `model` (SDXL or Flux) on its checkpoint, and that checkpoint."""
    from bot.generate_requests import flux_generate_request, generate_model, generate_request

    build = flux_generate_request if generate_model(model) == "flux" else generate_request
    return await build(library, choices, loras)


async def generate_files(settings: Settings, args: argparse.Namespace) -> None:
    """On the local backend, or through the HTTP API at --api; the images written, each with its seed printed."""
    import asyncio

    choices, loras = await generate_choices(args)
    if args.api:
        await generate_through_api(settings, args, choices, loras)
        return
    async with opened_backend(settings) as backend:
        request, checkpoint = await build_request(library_for(settings, backend.store), args.model, choices, loras)
        paths = output_paths(args.output, request.seed, request.count)
        for path in paths:
            await asyncio.to_thread(writable_output, path)
        result = await run_with_bar(backend, request, f"generate {request.count} × {choices['width']}×{choices['height']}")
    report_withheld(result)
    for path, png, image_seed in zip(paths, result["images"], result["seeds"]):
        if png is not None:
            await asyncio.to_thread(path.write_bytes, png)
            print(f"{path} ({result['width']}×{result['height']}, seed {image_seed}, {checkpoint['name']})")
    _print_face_notes(result)


def _print_face_notes(result: dict) -> None:
    from bot.generate_requests import face_notes

    for note in face_notes(result.get("face")):
        print(note)


async def generate_through_api(settings: Settings, args: argparse.Namespace, choices: dict, loras: list[dict]) -> None:
    """`toolbox generate --api URL`: the same request through the HTTP API's job endpoints, as a remote client would."""
    import asyncio
    import base64

    from bot.api_client import ApiClient
    from bot.generate_requests import generate_model
    from modal_services.jobs.requests import FluxGenerateRequest

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
        await asyncio.to_thread(writable_output, path)
    async with ApiClient(args.api, settings.api_token) as client:
        with job_bar(f"generate {request.count} × {request.width}×{request.height} via {args.api}") as show:
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
    _print_face_notes(result)
