"""Upscaler benchmarks: UNet cost per output pixel, tile batching, and memory against output size.

1. Denoised area / output area at the default tile settings (computed from
   the tile plan): goal <= 1.2 for 1024² -> 2048² and -> 4096². Ultimate SD
   Upscale's 512 px tiles with its half-tile seam fix are about 2.8.
2. Batched tiles vs one tile per UNet call on the tiny CPU model: goal >= 1.3x.
3. Peak memory of a 4x upscale of a 1024² image vs a 2x one (tiny model, CPU,
   each case in its own process): with tiled VAE the model part of the peak
   should not grow with the output area; what does grow is the image buffers
   themselves (the resized input and the output canvas).

    .venv/bin/python bench/bench_upscale.py [--only area|batch|memory]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modal_services.jobs.requests import UpscaleRequest  # noqa: E402


def bench_area() -> None:
    from modal_services.engines.sdxl.tiling import plan_tiles

    print("== denoised area / output area (default tiles: <= 1152 px, >= 64 px overlap) ==")
    for source, scale in [(1024, 2), (1024, 4), (1024, 1.5), (1024, 3), (832, 2), (1216, 2)]:
        side = round(source * scale)
        plan = plan_tiles(side, side)
        print(
            f"{source}² -> {side}²: {len(plan)} tiles of {plan.tile_width}x{plan.tile_height}, "
            f"overlaps {plan.columns.overlaps()} px, area ratio {plan.area_ratio:.3f}"
        )
    # The same tiles without stretching (fixed 1024 px, 128 px overlap) for comparison.
    for side in (2048, 4096):
        per_side = -(-(side - 128) // (1024 - 128))
        print(f"fixed 1024 px tiles, 128 px overlap, {side}²: {per_side ** 2} tiles, area ratio {(per_side * 1024 / side) ** 2:.3f}")
    print("(Ultimate SD Upscale with its half-tile seam fix: about 2.8, per the upscale notes)")


def _tiny_engine(root: Path, **options):
    from modal_services.layout import Layout
    from modal_services.engines.sdxl.engine import SdxlEngine
    from tests.fixtures.tiny_sdxl_checkpoint import build_tiny_volume

    volume = build_tiny_volume(root)
    engine = SdxlEngine(Layout(volume.models_dir, volume.loras_dir), **options)
    engine.load()
    return engine.upscaler


def _image(side: int) -> bytes:
    import numpy as np
    from PIL import Image

    from modal_services.imaging import encode_png

    y, x = np.mgrid[0:side, 0:side]
    return encode_png(Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)))


def _ignore(fraction: float, stage: str) -> None:
    """Progress nobody follows."""


def _denoise_seconds(engine, picture, job) -> float:
    """Seconds from the end of the VAE encode to the start of the decode: the UNet loop alone."""
    marks = {}

    def progress(fraction, stage):
        if stage in ("encoding the image", "decoding"):
            marks[stage] = time.perf_counter()

    engine.upscale(UpscaleRequest(image=picture, **job), progress)
    return marks["decoding"] - marks["encoding the image"]


def bench_batch(rounds: int = 5) -> None:
    import torch

    torch.set_num_threads(1)
    print("== tiles per UNet call (tiny model, CPU, 1 thread; denoising loop only) ==")
    picture = _image(256)
    job = dict(scale=2.0, steps=8, creativity=0.5, seed=1, prompt="a cat")
    with tempfile.TemporaryDirectory() as scratch:
        # 512² output in tiles of at most 128 px: 5x5 = 25 tiles, 4 denoising steps.
        engine = _tiny_engine(Path(scratch), max_tile=128, min_overlap=32)
        tiles = len(engine.plan(512, 512))
        timings = {1: [], 4: []}
        engine.upscale(UpscaleRequest(image=picture, **job), _ignore)  # warm-up
        # Interleaved rounds, best of each: the machine is shared, so single runs are noisy.
        for _ in range(rounds):
            for batch in timings:
                engine.tile_batch = batch
                timings[batch].append(_denoise_seconds(engine, picture, job))
    for batch, runs in timings.items():
        print(f"{batch} tile(s) per call: {min(runs):.2f} s (best of {rounds}; {tiles} tiles x 4 steps)")
    print(f"speed-up: {min(timings[1]) / min(timings[4]):.2f}x")


def _memory_case(scale: float, vae_tile: int | None) -> None:
    """Child process: load, note RSS, upscale a 1024² image once, report the peak."""
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as scratch:
        options = {} if vae_tile is None else {"vae_tile": vae_tile}
        engine = _tiny_engine(Path(scratch), **options)
        warm_up = UpscaleRequest(image=_image(256), scale=2.0, steps=2, creativity=0.5, seed=1)
        engine.upscale(warm_up, _ignore)  # at a tiny size
        picture = _image(1024)
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        engine.upscale(UpscaleRequest(image=picture, scale=scale, steps=2, creativity=0.5, seed=1), _ignore)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    side = round(1024 * scale)
    # Buffers that are the image itself: the padded input canvas (uint8), the output canvas (float32),
    # the output as uint8 and as a PIL image, and the PNG.
    image_buffers = side * side * (3 + 12 + 3 + 3 + 2)
    print(json.dumps({"scale": scale, "vae_tile": vae_tile or "default", "seconds": round(seconds, 1),
                      "peak_growth_mb": round((peak - baseline) / 1024), "image_buffers_mb": round(image_buffers / 2**20)}))


def bench_memory() -> None:
    print("== peak RSS growth over the loaded engine, 1024² input (tiny model, CPU; one process per case) ==")
    cases = [(2.0, None), (4.0, None), (4.0, 100_000)]
    for scale, vae_tile in cases:
        args = [sys.executable, __file__, "--memory-case", str(scale)] + ([str(vae_tile)] if vae_tile else [])
        result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
        line = [l for l in result.stdout.splitlines() if l.startswith("{")]
        if not line:
            print(result.stderr[-2000:])
            continue
        record = json.loads(line[-1])
        label = "untiled VAE" if vae_tile else "tiled VAE"
        print(
            f"{scale:g}x ({label}): peak growth {record['peak_growth_mb']} MB, of which image buffers "
            f"~{record['image_buffers_mb']} MB; {record['seconds']} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["area", "batch", "memory"])
    parser.add_argument("--memory-case", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case:
        _memory_case(float(args.memory_case[0]), int(args.memory_case[1]) if len(args.memory_case) > 1 else None)
        return
    for name, run in (("area", bench_area), ("batch", bench_batch), ("memory", bench_memory)):
        if args.only in (None, name):
            run()


if __name__ == "__main__":
    main()
