"""Text-to-image benchmarks on the tiny SDXL (CPU), against diffusers itself.

1. Engine overhead: `SdxlEngine.generate` (request checks, the shared
   pipeline, IP-Adapter off, the step callback with progress and previews,
   PNG encoding) vs a bare diffusers `StableDiffusionXLPipeline` call on the
   same checkpoint, VAE, size, steps and seed: goal <= 1.05x.
2. Batching: count 4 in one call vs 4 calls of one image: goal >= 1.3x.

Each case runs `--repeats` times after a warm-up; the median is reported,
in process CPU time (what the work costs, whatever else the machine runs)
and in wall time. torch runs on `--threads` threads (1 by default: on a
shared machine more threads mostly measure the neighbours). CPU figures on a tiny model say little about an A10G: there the UNet is
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


def timed(work) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    work()
    return time.process_time() - cpu, time.perf_counter() - wall


def compare(first, second, repeats: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Median (CPU, wall) seconds of each, after a warm-up of each, run alternately so that a
    neighbour's load on the machine hits both alike."""
    first(), second()
    runs: tuple[list, list] = ([], [])
    for _ in range(repeats):
        runs[0].append(timed(first))
        runs[1].append(timed(second))
    return tuple(tuple(statistics.median(column) for column in zip(*times)) for times in runs)


def report(label_first: str, label_second: str, first, second, goal: str) -> None:
    (first_cpu, first_wall), (second_cpu, second_wall) = first, second
    print(f"{label_first}: {first_cpu:.2f} s CPU ({first_wall:.2f} s wall)   "
          f"{label_second}: {second_cpu:.2f} s CPU ({second_wall:.2f} s wall)")
    print(f"ratio {second_cpu / first_cpu:.3f} CPU, {second_wall / first_wall:.3f} wall ({goal})")


def bench_overhead(volume, engine, size: int, steps: int, repeats: int) -> None:
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    from modal_services.jobs.requests import GenerateRequest
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

    request = GenerateRequest(prompt="a cat", width=size, height=size, steps=steps, cfg=5.5, seed=1, timeout=300)

    def engine_call():
        engine.generate(request, lambda fraction, stage: None, preview=lambda jpeg: None)

    print(f"== engine overhead, {size}², {steps} steps, CFG 5.5, median of {repeats} ==")
    bare_s, engine_s = compare(bare_call, engine_call, repeats)
    report("bare StableDiffusionXLPipeline", "SdxlEngine.generate", bare_s, engine_s, "engine / bare, goal <= 1.05")


def bench_batch(engine, size: int, steps: int, repeats: int) -> None:
    from modal_services.jobs.requests import GenerateRequest

    fields = dict(prompt="a cat", width=size, height=size, steps=steps, timeout=300)

    def ignore(fraction, stage):
        pass

    def one_call():
        engine.generate(GenerateRequest(**fields, seed=1, count=4), ignore)

    def four_calls():
        for seed in range(1, 5):
            engine.generate(GenerateRequest(**fields, seed=seed), ignore)

    print(f"== count 4, {size}², {steps} steps, median of {repeats} ==")
    apart, together = compare(four_calls, one_call, repeats)
    report("4 calls of 1", "1 call of 4", apart, together, "1 call / 4 calls; goal: the inverse >= 1.3")


def tiny_model_arguments(description: str) -> argparse.ArgumentParser:
    """The options every tiny-model benchmark takes: image size, steps, repeats, torch threads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    return parser


def main() -> None:
    parser = tiny_model_arguments(__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("overhead", "batch"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from modal_services.layout import Layout
    from modal_services.engines.sdxl.engine import SdxlEngine
    from tests.fixtures.tiny_sdxl_checkpoint import build_tiny_volume

    with tempfile.TemporaryDirectory() as root:
        volume = build_tiny_volume(Path(root))
        engine = SdxlEngine(Layout(volume.models_dir, volume.loras_dir))
        engine.load()
        if args.only in (None, "overhead"):
            bench_overhead(volume, engine, args.size, args.steps, args.repeats)
        if args.only in (None, "batch"):
            bench_batch(engine, args.size, args.steps, args.repeats)


if __name__ == "__main__":
    main()
