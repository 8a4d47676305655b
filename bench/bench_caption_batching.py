"""Batched captions vs one image at a time, on the tiny Qwen3-VL, same images.

Goal: batched ≥ 1.5x faster. The tiny model is built in a temporary folder in
the volume layout and loaded through the production engine.

    .venv/bin/python bench/bench_caption_batching.py [--images 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modal_services.engines.caption import CaptionEngine  # noqa: E402
from modal_services.jobs.requests import CaptionRequest  # noqa: E402
from modal_services.layout import Layout  # noqa: E402
from tests.fixtures.tiny_qwen import build_tiny_qwen3vl  # noqa: E402
from tests.images import png_bytes  # noqa: E402


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--style", default="tags")
    args = parser.parse_args()

    engine = CaptionEngine(Layout(build_tiny_qwen3vl(Path(tempfile.mkdtemp(prefix="bench-qwen-")) / "qwen3-vl-2b").parent))
    engine.load()
    images = [png_bytes(256, 192, seed=i) for i in range(args.images)]

    def caption(batch: list[bytes]) -> list[str]:
        return engine.caption(CaptionRequest(images=batch, style=args.style), lambda fraction, stage: None)

    caption(images[:2])  # warm-up
    batched = best_of(args.repeats, lambda: caption(images))
    single = best_of(args.repeats, lambda: [caption([image]) for image in images])
    same = caption(images) == [caption([image])[0] for image in images]
    print(f"{args.images} images, style {args.style}, best of {args.repeats}")
    print(f"one at a time: {single:.3f} s   batched: {batched:.3f} s   speed-up: {single / batched:.2f}x (goal >= 1.5x)")
    print(f"batched captions identical to one-at-a-time: {same}")


if __name__ == "__main__":
    main()
