"""Stand-in engines: the engine interface (`loaded`, `load()`, a method taking `progress=`), no model."""

from __future__ import annotations

import io
import threading
import time

from PIL import Image

from tests.images import encode


class SlowCaptionEngine:
    """Captions an image with its size, slowly, reporting progress like the real engine."""

    def __init__(self, steps: int = 6, delay: float = 0.05):
        self.loaded = False
        self.steps = steps
        self.delay = delay
        self.batches: list[int] = []

    def load(self):
        self.loaded = True

    def caption(self, images, style, question, progress):
        self.batches.append(len(images))
        for step in range(self.steps):
            progress(step / self.steps, f"captioning · token {step}/{self.steps}")
            time.sleep(self.delay)
        sizes = [Image.open(io.BytesIO(data)).size for data in images]
        return [f"{question or style} {w}x{h}" for w, h in sizes]


def flat_png(size: tuple[int, int], seed: int) -> bytes:
    """A one-colour PNG whose colour comes from the seed: images of different seeds differ."""
    return encode(Image.new("RGB", size, (seed % 256, seed // 256 % 256, 7)))


class StandInGenerateEngine:
    """The generate job's result structure (PNG bytes per image, seeds, steps/cfg, checkpoint, LoRAs), no model.

    `gate`, when given, holds each job until it is set; `fail_with` makes every job raise it;
    `load_error` makes loading fail (as a missing model does). Each job's fields are kept in `calls`.
    """

    def __init__(self, gate=None, fail_with: Exception | None = None, load_error: Exception | None = None):
        self.loaded = False
        self.gate = gate
        self.fail_with = fail_with
        self.load_error = load_error
        self.calls: list[dict] = []

    def load(self):
        if self.load_error is not None:
            raise self.load_error
        self.loaded = True

    def generate(self, progress, preview=None, **fields):
        self.calls.append(fields)
        started = time.monotonic()
        progress(0.1, "step 1/2")
        if self.gate is not None:
            while not self.gate.wait(0.02):
                progress(0.5, "waiting")  # where a real engine would notice Cancel
        if self.fail_with is not None:
            raise self.fail_with
        seed = 1234 if fields.get("seed") is None else fields["seed"]
        seeds = [seed + i for i in range(fields.get("count", 1))]
        size = (fields.get("width", 1024), fields.get("height", 1024))
        return {
            "images": [flat_png(size, s) for s in seeds], "seeds": seeds, "width": size[0], "height": size[1],
            "steps": fields.get("steps", 28), "cfg": fields.get("cfg", 5.5), "prompt": fields["prompt"],
            "negative_prompt": fields.get("negative_prompt", ""),
            "checkpoint": fields.get("checkpoint") or "Illustrious-XL-v2.0",
            "loras": [{"name": lora["name"], "weight": lora["weight"]} for lora in fields.get("loras", [])]
            + ([{"name": "lora_url", "weight": fields["lora_scale"]}] if fields.get("lora_url") else []),
            "strength": None, "generation_time_seconds": time.monotonic() - started,
            "face": None if fields.get("face_image") is None else {
                "faces_found": 1, "pose_faces_found": 1 if fields.get("pose_image") else None,
                "identity_strength": fields["identity_strength"], "controlnet_strength": fields["controlnet_strength"]},
        }


class StandInUpscaleEngine:
    """Upscales with a plain resize, taking the upscale job's fields."""

    def __init__(self):
        self.loaded = False
        self.calls: list[dict] = []

    def load(self):
        self.loaded = True

    def upscale(self, image, scale, progress, preview=None, **fields):
        self.calls.append({"scale": scale, **fields})
        progress(0.5, "tile 1/1")
        source = Image.open(io.BytesIO(image))
        return encode(source.resize((round(source.width * scale), round(source.height * scale))))


class GatedCaptionEngine:
    """Holds every job, reporting progress, until `gate` is set: nothing finishes before a test says so."""

    def __init__(self, gate: threading.Event | None = None):
        self.loaded = False
        self.gate = gate or threading.Event()

    def load(self):
        self.loaded = True

    def caption(self, images, style, question, progress):
        while not self.gate.wait(0.01):
            progress(0.5, "captioning")
        return ["a caption"] * len(images)
