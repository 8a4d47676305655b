"""`toolbox upscale`: one image upscaled with SDXL, tile by tile."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from bot.cli.common import (
    LORA_HELP, SAFETY_HELP, SEED_HELP, cli_safety, job_bar, opened_backend, parse_lora_option, read_input,
    report_withheld, run_with_bar, writable_output,
)
from bot.core.library import library_for
from modal_services.jobs.limits import CREATIVITY, SCALE
from modal_services.jobs.samplers import SAMPLER_NAMES

if TYPE_CHECKING:
    from bot.core.choices import UpscaleChoices
    from bot.settings import Settings


def register(commands) -> None:
    upscale = commands.add_parser("upscale", help=f"upscale an image with SDXL ({SCALE.low:g}x-{SCALE.high:g}x)")
    upscale.add_argument("image", type=Path, metavar="IMAGE")
    upscale.add_argument("--scale", type=float, help=SCALE.describe())
    upscale.add_argument("--prompt", help="words every tile's prompt starts with (default: none)")
    upscale.add_argument("--negative", help="what to steer away from (default: none)")
    upscale.add_argument("--lora", action="append", default=[], metavar="NAME[:WEIGHT]", help=LORA_HELP)
    upscale.add_argument("--creativity", type=float,
                         help=f"{CREATIVITY.low:g} (faithful) to {CREATIVITY.high:g} (repaint), {CREATIVITY.describe()}")
    upscale.add_argument("--seed", type=int, help=SEED_HELP)
    upscale.add_argument("--sampler", metavar="NAME",
                         help=f"one of {', '.join(SAMPLER_NAMES)} (default: the checkpoint config's, Euler)")
    upscale.add_argument("-o", "--output", type=Path, help="default: IMAGE_x<scale>.png beside the input")
    upscale.add_argument("--no-safety-check", action="store_true", help=SAFETY_HELP)
    upscale.add_argument("--tile-captions", action="store_true",
                         help="caption each tile (tags) and add that to its prompt: slower, more fitting detail")
    upscale.set_defaults(run=upscale_file)


def _read_image(path: Path) -> tuple[bytes, tuple[int, int]]:
    """The input as a PNG, and its size; one too large to upscale is refused here."""
    from modal_services.engines.sdxl.limits import DEFAULT_MAX_INPUT_PIXELS
    from modal_services.imaging import decode_image, encode_png

    image = decode_image(read_input(path), max_pixels=DEFAULT_MAX_INPUT_PIXELS, name=str(path)).image
    return encode_png(image), image.size


def upscale_choices(args: argparse.Namespace, png: bytes) -> UpscaleChoices:
    """The terminal's options as an upscale of `png` (None for a default)."""
    from bot.core.choices import UpscaleChoices

    return UpscaleChoices(image=png, scale=args.scale, prompt=args.prompt, negative=args.negative,
                          creativity=args.creativity, seed=args.seed, sampler=args.sampler,
                          safety=cli_safety(args, real_photo=True),
                          loras=tuple(parse_lora_option(option) for option in args.lora))


async def upscale_file(settings: Settings, args: argparse.Namespace) -> None:
    import asyncio

    from bot.core.build import build_upscale_request

    # Everything is checked before the job starts: the file, the output, the values, the LoRA names, the sizes.
    png, size = await asyncio.to_thread(_read_image, args.image)
    choices = upscale_choices(args, png)
    scale = args.scale or SCALE.default
    output = args.output or args.image.with_name(f"{args.image.stem}_x{scale:g}.png")
    await asyncio.to_thread(writable_output, output)
    async with opened_backend(settings) as backend:
        built = await build_upscale_request(library_for(settings, backend.store), choices)
        request, checkpoint, (width, height) = built.request, built.checkpoint, built.output_size
        if args.tile_captions:
            from bot.tile_prompts import tile_prompts

            with job_bar("tile captions") as show:
                regions = await tile_prompts(backend, png, size, (width, height), show)
            request = request.with_region_prompts(regions)
        result = await run_with_bar(backend, request, f"upscale {request.scale:g}x → {width}×{height}")
    report_withheld(result)
    if result["image"] is not None:
        await asyncio.to_thread(output.write_bytes, result["image"])
        print(f"{output} ({width}×{height}, seed {request.seed}, {checkpoint['name']})")
