"""Stand-in engines: the engine interface (`loaded`, `load()`, job methods taking the request and `progress`),
no model; and `StandInEngines`, the engine factory that gives them to a `LocalBackend`."""

from __future__ import annotations

import io
import threading
import time
from typing import Callable

from PIL import Image

from modal_services.jobs.records import ProgressFn
from modal_services.jobs.requests import CaptionRequest, FluxGenerateRequest, GenerateRequest, JobRequest, UpscaleRequest
from modal_services.layout import Layout
from modal_services.services import SERVICES, EngineClass, build_engine
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

    def caption(self, request: CaptionRequest, progress: ProgressFn) -> list[str]:
        self.batches.append(len(request.images))
        for step in range(self.steps):
            progress(step / self.steps, f"captioning · token {step}/{self.steps}")
            time.sleep(self.delay)
        sizes = [Image.open(io.BytesIO(data)).size for data in request.images]
        return [f"{request.question or request.style} {w}x{h}" for w, h in sizes]


def flat_png(size: tuple[int, int], seed: int) -> bytes:
    """A one-colour PNG whose colour comes from the seed: images of different seeds differ."""
    return encode(Image.new("RGB", size, (seed % 256, seed // 256 % 256, 7)))


class StandInImageEngine:
    """The SDXL engine (generate and upscale) or the Flux engine, without a model.

    A generate job gets the generate result's structure (PNG bytes per image, seeds, steps/cfg or guidance,
    checkpoint, LoRAs, the face summary) with one-colour images, `shrink` times smaller than the requested
    size (which the result still reports); an upscale gets a plain resize. Each job's request fields are kept
    in `generated` and `upscaled`, as the request's dict without the runner's safety context.

    `delay` is slept at each of its steps; `faces_found` is how many faces it reports in a face photo;
    `gate`, when given, holds each job until it is set; `fail_with` makes every job raise it; `load_error`
    makes loading fail (as a missing model does).
    """

    STEPS = 2

    def __init__(self, shrink: int = 1, delay: float = 0.0, faces_found: int = 1, gate: threading.Event | None = None,
                 fail_with: Exception | None = None, load_error: Exception | None = None):
        self.loaded = False
        self.shrink = shrink
        self.faces_found = faces_found
        self.delay = delay
        self.gate = gate
        self.fail_with = fail_with
        self.load_error = load_error
        self.generated: list[dict] = []
        self.upscaled: list[dict] = []

    def load(self):
        if self.load_error is not None:
            raise self.load_error
        self.loaded = True

    def generate(self, request: GenerateRequest | FluxGenerateRequest, progress: ProgressFn, preview=None) -> dict:
        fields = request.model_dump(exclude={"safety"})
        self.generated.append(fields)
        started = time.monotonic()
        for step in range(self.STEPS):
            progress(step / self.STEPS, f"step {step + 1}/{self.STEPS}")
            time.sleep(self.delay)
        if self.gate is not None:
            while not self.gate.wait(0.02):
                progress(0.5, "waiting")  # where a real engine would notice Cancel
        if self.fail_with is not None:
            raise self.fail_with
        seeds = [request.seed + i for i in range(request.count)]
        size = (request.width // self.shrink, request.height // self.shrink)
        flux = isinstance(request, FluxGenerateRequest)
        return {
            "images": [flat_png(size, seed) for seed in seeds], "seeds": seeds,
            "width": request.width, "height": request.height, "steps": request.steps,
            "cfg": request.guidance if flux else request.cfg, "prompt": request.prompt,
            # As the SDXL engine reports it (Flux has no sampler choice): the request's, else the config's Euler.
            **({} if flux else {"sampler": request.sampler or "Euler"}),
            "negative_prompt": request.negative_prompt,
            "checkpoint": "flux1-dev" if flux else request.checkpoint or "Illustrious-XL-v2.0",
            "loras": [{"name": lora["name"], "weight": lora["weight"]} for lora in fields["loras"]]
            + ([{"name": "lora_url", "weight": request.lora_scale}] if fields.get("lora_url") else []),
            "strength": request.strength if request.image is not None else None,
            "generation_time_seconds": time.monotonic() - started,
            "face": None if fields.get("face_image") is None else {
                "faces_found": self.faces_found, "pose_faces_found": 1 if request.pose_image else None,
                "identity_strength": request.identity_strength, "controlnet_strength": request.controlnet_strength},
        }

    def upscale(self, request: UpscaleRequest, progress: ProgressFn, preview=None) -> bytes:
        self.upscaled.append(request.model_dump(exclude={"safety"}))
        progress(0.5, "tile 1/1")
        if self.fail_with is not None:
            raise self.fail_with
        source = Image.open(io.BytesIO(request.image))
        return encode(source.resize((round(source.width * request.scale), round(source.height * request.scale))))


class StandInEngines:
    """An engine factory for `LocalBackend(settings, engines=...)`: the stand-in given for an engine class,
    the real engine for every other.

    `use(GenerateRequest, engine)` runs every job of that request's engine class on `engine` (one stand-in
    per engine class: a worker has one engine per class); `on_judged` is called when the class's jobs are judged.
    The real engine classes it built are kept in `built`.
    """

    def __init__(self, on_judged: Callable[[], None] = lambda: None):
        self.on_judged = on_judged
        self._stand_ins: dict[EngineClass, object] = {}
        self.built: list[EngineClass] = []

    def use(self, request: type[JobRequest], engine):
        spec = SERVICES[request]
        given = self._stand_ins.setdefault(spec.engine, engine)
        assert given is engine, f"{spec.engine.__name__} already has a stand-in: give it every job kind's method"
        if spec.judged_images is not None:
            self.on_judged()
        return engine

    def __call__(self, engine_class: EngineClass, layout: Layout):
        if engine_class in self._stand_ins:
            return self._stand_ins[engine_class]
        self.built.append(engine_class)
        return build_engine(engine_class, layout)


class GatedCaptionEngine:
    """Holds every job, reporting progress, until `gate` is set: nothing finishes before a test says so."""

    def __init__(self, gate: threading.Event | None = None):
        self.loaded = False
        self.gate = gate or threading.Event()

    def load(self):
        self.loaded = True

    def caption(self, request: CaptionRequest, progress: ProgressFn) -> list[str]:
        while not self.gate.wait(0.01):
            progress(0.5, "captioning")
        return ["a caption"] * len(request.images)
