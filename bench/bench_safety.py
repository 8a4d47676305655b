"""What the safety check adds to a generation, on the tiny models (CPU), and on paper for ViT-base on a GPU.

1. A 4-image generate job through the worker's own path (`run_on_engine`: prompt
   screening, the engine, then the NSFW classifier over the 4 images in one
   batch) with the policy `block`, against the same job with the policy `off`
   (no classification). Reported as a ratio; goal: <= 1.05x.
2. The classifier step alone on 4 images of the requested size: the tiny ViT of
   the test fixtures, and (`--vit-base`) a randomly initialised ViT-base/16 at
   224², the architecture of Falconsai/nsfw_image_detection, on this CPU; each
   as a share of the job's CPU time (steadier than 1. on a busy machine, where
   the difference of two long runs is mostly the neighbours').
3. On paper, ViT-base/16 on an A10G.

Each case runs `--repeats` times after a warm-up; medians, in process CPU time and
wall time, with torch on `--threads` threads (1 by default: the machine is shared).

    .venv/bin/python bench/bench_safety.py [--size 512] [--steps 20] [--repeats 3] [--vit-base]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.bench_generate import tiny_model_arguments  # noqa: E402

# ViT-B/16 at 224²: 196 patches + CLS, 12 layers of width 768; about 17.6 GFLOPs per image (forward).
VIT_BASE_GFLOPS = 17.6
# An A10G's fp16 tensor throughput (125 TFLOPS peak), of which a small batch of a ViT-base reaches about a third.
A10G_EFFECTIVE_TFLOPS = 40.0


def timed(work) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    work()
    return time.process_time() - cpu, time.perf_counter() - wall


def medians(work, repeats: int) -> tuple[float, float]:
    work()
    runs = [timed(work) for _ in range(repeats)]
    return tuple(statistics.median(column) for column in zip(*runs))


def bench_job(engine, classifier, size: int, steps: int, repeats: int) -> tuple[float, float]:
    """Median (CPU, wall) seconds of the job with the policy off."""
    from modal_services.jobs.requests import GenerateRequest
    from modal_services.services import SERVICES, run_on_engine

    spec = SERVICES[GenerateRequest]

    def job(policy: str):
        payload = {"prompt": "a lighthouse at dusk", "width": size, "height": size, "steps": steps, "count": 4,
                   "seed": 1, "timeout": 300, "safety": {"policy": policy}}
        return lambda: run_on_engine(engine, spec, payload, lambda fraction, stage: None, classifier=classifier)

    job("block")(), job("off")()
    runs: dict[str, list] = {"off": [], "block": []}
    for _ in range(repeats):  # alternately, so a neighbour's load hits both alike
        for policy in runs:
            runs[policy].append(timed(job(policy)))
    off, block = (tuple(statistics.median(column) for column in zip(*runs[policy])) for policy in ("off", "block"))
    print(f"== a 4-image generate job, {size}², {steps} steps, median of {repeats} ==")
    print(f"policy off (not classified): {off[0]:.2f} s CPU ({off[1]:.2f} s wall)   "
          f"policy block (classified): {block[0]:.2f} s CPU ({block[1]:.2f} s wall)")
    print(f"ratio {block[0] / off[0]:.3f} CPU, {block[1] / off[1]:.3f} wall (block / off, goal <= 1.05)")
    return off


def bench_classifier(label: str, classifier, images: list[bytes], repeats: int, job_cpu: float) -> None:
    cpu, wall = medians(lambda: classifier.scores(images), repeats)
    print(f"{label}: {cpu * 1000:.1f} ms CPU ({wall * 1000:.1f} ms wall) for {len(images)} images, "
          f"{wall * 1000 / len(images):.1f} ms wall per image; {cpu / job_cpu:.2%} of the job's CPU time "
          f"(ratio {1 + cpu / job_cpu:.4f})")


def vit_base_classifier(folder: Path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from modal_services.safety.nsfw_classifier import NsfwClassifier

    config = ViTConfig(id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1})  # ViT-base/16, 224²
    ViTForImageClassification(config).save_pretrained(folder / "nsfw-classifier")
    ViTImageProcessor().save_pretrained(folder / "nsfw-classifier")
    classifier = NsfwClassifier(folder)
    classifier.load()
    return classifier


def on_paper() -> None:
    per_image_ms = VIT_BASE_GFLOPS / (A10G_EFFECTIVE_TFLOPS * 1000) * 1000
    print("== on paper: ViT-base/16 on an A10G, fp16 ==")
    print(f"forward: {VIT_BASE_GFLOPS} GFLOPs per image / ~{A10G_EFFECTIVE_TFLOPS:g} TFLOPS effective "
          f"≈ {per_image_ms:.2f} ms per image ({4 * per_image_ms:.1f} ms for 4 in one batch), plus the PNG decode "
          "and the resize to 224² on the CPU (a few ms per 1024² image); against ~10-20 s for 4 SDXL images "
          "at 28 steps on the same GPU, well under 1%")


def main() -> None:
    parser = tiny_model_arguments(__doc__.splitlines()[0])
    parser.add_argument("--vit-base", action="store_true", help="also time a random ViT-base/16 on this CPU")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from modal_services.jobs.requests import GenerateRequest
    from modal_services.layout import Layout
    from modal_services.safety.nsfw_classifier import NsfwClassifier
    from modal_services.engines.sdxl.engine import SdxlEngine
    from tests.fixtures.tiny_sdxl_checkpoint import build_tiny_volume

    with tempfile.TemporaryDirectory() as root:
        volume = build_tiny_volume(Path(root))
        engine = SdxlEngine(Layout(volume.models_dir, volume.loras_dir))
        engine.load()
        classifier = NsfwClassifier(volume.models_dir)
        classifier.load()
        job_cpu, _ = bench_job(engine, classifier, args.size, args.steps, args.repeats)

        request = GenerateRequest(prompt="a cat", width=args.size, height=args.size, steps=args.steps, seed=1, count=4,
                                  timeout=300)
        images = engine.generate(request, lambda fraction, stage: None)["images"]
        print(f"== the classifier step alone, 4 images of {args.size}², median of {args.repeats} ==")
        bench_classifier("tiny ViT (test fixture)", classifier, images, args.repeats, job_cpu)
        if args.vit_base:
            bench_classifier("ViT-base/16 at 224², random weights, this CPU",
                             vit_base_classifier(Path(root) / "vit-base"), images, args.repeats, job_cpu)
    on_paper()


if __name__ == "__main__":
    main()
