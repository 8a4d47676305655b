"""The NSFW image classifier: a transformers image-classification model from its folder on the models volume.

One per worker process, loaded once, on the same device as the engine it
follows (on Modal, inside the GPU class's load, so it adds no cold start of
its own). `scores` classifies a job's images in one batch and returns each
one's probability of the `nsfw` label.
"""

from __future__ import annotations

import threading
from pathlib import Path

from modal_services.engines.loading import loading
from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.imaging import decode_image
from modal_services.layout import NSFW_CLASSIFIER_DIR


NSFW_LABEL = "nsfw"
# A result the classifier reads is at most an upscale's largest output, with room to spare.
MAX_CLASSIFIED_PIXELS = 80_000_000
MISSING_MESSAGE = f"The NSFW classifier that checks images is not installed: {remedies.download('nsfw-classifier')}."


class NsfwClassifier:
    def __init__(self, models_dir: Path, device: str | None = None):
        self.folder = models_dir / NSFW_CLASSIFIER_DIR
        self.device = device
        self.model = None
        self.processor = None
        self.nsfw_index: int | None = None
        self._loading = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def missing_files(self) -> list[str]:
        """The files `load` needs that are not on the volume."""
        missing = [] if (self.folder / "config.json").is_file() else ["config.json"]
        return missing + ([] if any(self.folder.glob("*.safetensors")) else ["*.safetensors"])

    def load(self, staging_device: str | None = None) -> None:
        """Load once (thread-safe); MODELS_MISSING if its files are not on the volume."""
        with self._loading:
            if self.loaded:
                return
            if self.missing_files():
                raise ToolboxError(ErrorCode.MODELS_MISSING, MISSING_MESSAGE)
            import torch
            from transformers import AutoImageProcessor, AutoModelForImageClassification

            self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
            with loading("the NSFW classifier", self.folder):
                processor = AutoImageProcessor.from_pretrained(self.folder)
                model = AutoModelForImageClassification.from_pretrained(self.folder, dtype=dtype)
            labels = {str(label).lower(): int(index) for index, label in model.config.id2label.items()}
            if NSFW_LABEL not in labels:
                raise ToolboxError(ErrorCode.MODEL_LOAD_FAILED,
                                   f"The NSFW classifier has no {NSFW_LABEL!r} label (it has {sorted(labels)}).")
            self.nsfw_index = labels[NSFW_LABEL]
            self.processor = processor
            self.model = model.to(staging_device or self.device).eval()

    def place(self) -> None:
        """Move a model staged in host memory to its device."""
        if self.model is not None:
            self.model.to(self.device)

    def scores(self, images: list[bytes]) -> list[float]:
        """Each encoded image's probability of being NSFW, from one batched forward pass."""
        import torch

        self.load()
        pictures = [decode_image(data, max_pixels=MAX_CLASSIFIED_PIXELS, name="A result image").image.convert("RGB")
                    for data in images]
        inputs = self.processor(images=pictures, return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.model.device, self.model.dtype)
        with torch.inference_mode():
            logits = self.model(pixel_values=pixels).logits
        return logits.float().softmax(dim=-1)[:, self.nsfw_index].tolist()
