"""Flux engine overhead on the tiny Flux (CPU), against diffusers itself.

`FluxEngine.generate` (request checks, the step callback with progress and
previews, PNG encoding) vs a bare diffusers `FluxPipeline` call on the same
model folder, size, steps, guidance and seed: goal <= 1.05x. A second line
compares it with the bare call plus the PNG encoding every front end needs
(the engine's one sizeable fixed cost on a tiny model: ~30 ms for 512²). Medians of
`--repeats` alternating runs after a warm-up, in process CPU time and wall
time, with torch on `--threads` threads (see bench_generate.py). A tiny model
makes the fixed costs look large next to the denoising: on FLUX.1-dev, where
one step takes tens to hundreds of milliseconds, they vanish.

    .venv/bin/python bench/bench_flux.py [--size 512] [--steps 20] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.bench_generate import compare, report, tiny_model_arguments  # noqa: E402


def main() -> None:
    parser = tiny_model_arguments(__doc__.splitlines()[0])
    args = parser.parse_args()

    import torch
    from diffusers import FluxPipeline

    from modal_services.engines.flux import MAX_SEQUENCE_LENGTH, FluxEngine
    from modal_services.jobs.requests import FluxGenerateRequest
    from modal_services.imaging import encode_png
    from modal_services.layout import FLUX_DIR, Layout
    from tests.fixtures.tiny_flux import build_tiny_flux_volume

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        volume = build_tiny_flux_volume(Path(root))
        engine = FluxEngine(Layout(volume.models_dir, volume.loras_dir), device="cpu")
        engine.load()
        bare = FluxPipeline.from_pretrained(volume.models_dir / FLUX_DIR, local_files_only=True)
        bare.set_progress_bar_config(disable=True)

        def bare_call():
            with torch.inference_mode():
                return bare(prompt="a cat", width=args.size, height=args.size, num_inference_steps=args.steps,
                            guidance_scale=3.5, max_sequence_length=MAX_SEQUENCE_LENGTH,
                            generator=torch.Generator("cpu").manual_seed(1)).images

        def bare_call_and_png():
            return [encode_png(image) for image in bare_call()]

        request = FluxGenerateRequest(prompt="a cat", width=args.size, height=args.size, steps=args.steps, guidance=3.5,
                                      seed=1, timeout=300)

        def engine_call():
            engine.generate(request, lambda fraction, stage: None, preview=lambda jpeg: None)

        print(f"== Flux engine overhead, {args.size}², {args.steps} steps, guidance 3.5, median of {args.repeats} ==")
        bare_s, engine_s = compare(bare_call, engine_call, args.repeats)
        report("bare FluxPipeline", "FluxEngine.generate", bare_s, engine_s, "engine / bare, goal <= 1.05")
        bare_s, engine_s = compare(bare_call_and_png, engine_call, args.repeats)
        report("bare FluxPipeline + PNG", "FluxEngine.generate", bare_s, engine_s, "engine / (bare + PNG)")


if __name__ == "__main__":
    main()
