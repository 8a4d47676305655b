"""What InstantID's face path adds to text-to-image, on the tiny SDXL (CPU).

The same request (size, steps, CFG 5.5, seed) through `SdxlEngine.generate`
without and with a face photo. With one, the engine reads the face, swaps
the face adapter into the shared UNet and runs the IdentityNet beside it
every step, then puts everything back: the IdentityNet is a ControlNet as
deep as the UNet's encoder, so on a GPU the face path costs roughly what
any SDXL ControlNet costs (on paper: +30-40 % per step), plus one face
analysis (SCRFD + ArcFace, tens of milliseconds on a GPU, well under a
second on a CPU). Faces here are read by the tests' stand-in analyser, so
the figure is the pipeline's share alone; the tiny IdentityNet is half a
tiny UNet, so the ratio says how the work is wired, not what an A10G does.

Each case runs `--repeats` times after a warm-up, alternately; the median
is reported in process CPU time and wall time, on `--threads` torch threads.

    .venv/bin/python bench/bench_instantid.py [--size 512] [--steps 20] [--repeats 3] [--threads 1]
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
    args = tiny_model_arguments(__doc__.splitlines()[0]).parse_args()

    import torch

    from modal_services.layout import Layout
    from modal_services.engines.sdxl.engine import SdxlEngine
    from modal_services.jobs.requests import GenerateRequest
    from tests.fixtures.tiny_faces import StandInFaceAnalyser, face_picture
    from tests.fixtures.tiny_instantid import add_tiny_instantid
    from tests.fixtures.tiny_sdxl_checkpoint import build_tiny_volume

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        volume = build_tiny_volume(Path(root))
        add_tiny_instantid(volume.models_dir)
        engine = SdxlEngine(Layout(volume.models_dir, volume.loras_dir), face_analyser=StandInFaceAnalyser())
        engine.load()
        fields = dict(prompt="a cat", width=args.size, height=args.size, steps=args.steps, cfg=5.5, seed=1, timeout=300)
        plain_request, face_request = GenerateRequest(**fields), GenerateRequest(**fields, face_image=face_picture())

        def run(request):
            return lambda: engine.generate(request, lambda fraction, stage: None, preview=lambda jpeg: None)


        print(f"== the face path vs text-to-image, {args.size}², {args.steps} steps, CFG 5.5, "
              f"median of {args.repeats}, {args.threads} thread(s) ==")
        plain, with_face = compare(run(plain_request), run(face_request), args.repeats)
        report("text-to-image", "with a face", plain, with_face, "what the face path adds")


if __name__ == "__main__":
    main()
