"""Stand-in engines: the engine interface (`loaded`, `load()`, a method taking `progress=`), no model."""

from __future__ import annotations

import io
import threading
import time

from PIL import Image


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
