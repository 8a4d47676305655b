"""Text-to-image benchmarks on the tiny SDXL (CPU), against diffusers itself.

1. Engine overhead: `SdxlEngine.generate` (request checks, the shared
   pipeline, IP-Adapter off, the step callback with progress and previews,
   PNG encoding) vs a bare diffusers `StableDiffusionXLPipeline` call on the
   same checkpoint, VAE, size, steps and seed: goal <= 1.05x.
2. Batching: count 4 in one call vs 4 calls of one image: goal >= 1.3x.

Each case runs `--repeats` times after a warm-up; the median is reported.
CPU figures on a tiny model say little about an A10G: there the UNet is
compute-bound and a batch of 4 fills the GPU that one image leaves idle.

    .venv/bin/python bench/bench_generate.py [--only overhead|batch] [--size 512] [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def median_seconds(work, repeats: int) -> float:
    work()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_overhead(volume, engine, size: int, steps: int, repeats: int) -> None:
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    from modal_services.layout import SDXL_CONFIG_DIR, SDXL_VAE_DIR

    bare = StableDiffusionXLPipeline.from_single_file(
        str(volume.checkpoint), config=str(volume.models_dir / SDXL_CONFIG_DIR), local_files_only=True,
        vae=AutoencoderKL.from_pretrained(volume.models_dir / SDXL_VAE_DIR),
    )
    bare.set_progress_bar_config(disable=True)

    def bare_call():
        with torch.inference_mode():
            bare(prompt="a cat", width=size, height=size, num_inference_steps=steps, guidance_scale=5.5,
                 generator=torch.Generator("cpu").manual_seed(1))

    def engine_call():
        engine.generate(prompt="a cat", width=size, height=size, steps=steps, cfg=5.5, seed=1, timeout=300,
                        progress=lambda fraction, stage: None, preview=lambda jpeg: None)

    # Alternating, so that a neighbour's load on the machine hits both alike.
    bare_times, engine_times = [], []
    bare_call(), engine_call()
    for _ in range(repeats):
        for work, times in ((bare_call, bare_times), (engine_call, engine_times)):
            started = time.perf_counter()
            work()
            times.append(time.perf_counter() - started)
    bare_s, engine_s = statistics.median(bare_times), statistics.median(engine_times)
    print(f"== engine overhead, {size}², {steps} steps, CFG 5.5, median of {repeats} ==")
    print(f"bare StableDiffusionXLPipeline: {bare_s:.2f} s   SdxlEngine.generate: {engine_s:.2f} s   "
          f"ratio {engine_s / bare_s:.3f} (goal <= 1.05)")


def bench_batch(engine, size: int, steps: int, repeats: int) -> None:
    request = dict(prompt="a cat", width=size, height=size, steps=steps, seed=1, timeout=300)

    def one_call():
        engine.generate(**request, count=4)

    def four_calls():
        for seed in range(1, 5):
            engine.generate(**{**request, "seed": seed})

    together = median_seconds(one_call, repeats)
    apart = median_seconds(four_calls, repeats)
    print(f"== count 4, {size}², {steps} steps, median of {repeats} ==")
    print(f"4 calls: {apart:.2f} s   1 call of 4: {together:.2f} s   speed-up {apart / together:.2f}x (goal >= 1.3)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("overhead", "batch"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from modal_services.sdxl_engine import SdxlEngine
    from tests.fixtures.tiny_sdxl_checkpoint import build_tiny_volume

    with tempfile.TemporaryDirectory() as root:
        volume = build_tiny_volume(Path(root))
        engine = SdxlEngine(volume.models_dir, loras_dir=volume.loras_dir)
        engine.load()
        if args.only in (None, "overhead"):
            bench_overhead(volume, engine, args.size, args.steps, args.repeats)
        if args.only in (None, "batch"):
            bench_batch(engine, args.size, args.steps, args.repeats)


if __name__ == "__main__":
    main()
