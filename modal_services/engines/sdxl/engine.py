"""The SDXL engine: text-to-image, variations and upscales on one set of loaded models.

One warm worker (a Modal container, or the local backend's thread) holds
one `SdxlEngine`, so a generate job and an upscale job share the UNet, text
encoders and VAE, and a checkpoint switch applies to both.
"""

from __future__ import annotations

from typing import Any

from modal_services.engines.sdxl.generate import PREVIEW_INTERVAL as GENERATE_PREVIEW_INTERVAL
from modal_services.engines.sdxl.generate import TextToImage
from modal_services.engines.sdxl.faces import FaceAnalyser, InsightFaceAnalyser, face_provider
from modal_services.engines.sdxl.instantid import InstantId
from modal_services.jobs.records import ProgressFn
from modal_services.jobs.requests import GenerateRequest, UpscaleRequest
from modal_services.layout import ANTELOPEV2_DIR, Layout
from modal_services.engines.sdxl.request_loras import RequestLoras
from modal_services.engines.sdxl.pipeline import PreviewFn, SdxlModels
from modal_services.engines.sdxl.upscale import PREVIEW_INTERVAL as UPSCALE_PREVIEW_INTERVAL
from modal_services.engines.sdxl.upscale import TiledUpscaler


class SdxlEngine:
    def __init__(
        self,
        layout: Layout,
        device: str | None = None,
        generate_preview_interval: float = GENERATE_PREVIEW_INTERVAL,
        upscale_preview_interval: float = UPSCALE_PREVIEW_INTERVAL,
        face_analyser: FaceAnalyser | None = None,
        **upscale_options: Any,
    ):
        """`upscale_options` are TiledUpscaler's (tile sizes, limits, tile batch, guidance); faces are
        read with insightface on the models folder's antelopev2 unless `face_analyser` says otherwise."""
        self.models = SdxlModels(layout, device)
        # Per-request LoRAs are kept for the worker's life in a scratch folder of its own, made at the first one.
        request_loras = RequestLoras()
        analyser = face_analyser or InsightFaceAnalyser(layout.models_dir / ANTELOPEV2_DIR, face_provider())
        self.instant_id = InstantId(self.models, analyser)
        self.text_to_image = TextToImage(self.models, request_loras, self.instant_id,
                                         preview_interval=generate_preview_interval)
        self.upscaler = TiledUpscaler(self.models, preview_interval=upscale_preview_interval, **upscale_options)

    @property
    def loaded(self) -> bool:
        return self.models.loaded

    def load(self, staging_device: str | None = None) -> None:
        self.models.load(staging_device)

    def missing_models(self, request: GenerateRequest | UpscaleRequest) -> list[str]:
        """What `request` needs that the volume lacks, each with its files: the SDXL base models until they are
        loaded; for a face photo, InstantID's models and the face-analysis models too."""
        missing = [] if self.loaded else self.models.missing_files()
        if getattr(request, "face_image", None) is not None:
            if self.instant_id.identitynet is None and (absent := self.instant_id.missing_files()):
                missing.append(f"instantid ({', '.join(absent)})")
            # A face reader of another kind (a test's) brings no files of its own.
            analyser_missing = getattr(self.instant_id.analyser, "missing_files", list)()
            if analyser_missing:
                missing.append(f"antelopev2 ({', '.join(analyser_missing)})")
        return missing

    def place(self) -> None:
        self.models.place()

    def generate(self, request: GenerateRequest, progress: ProgressFn, preview: PreviewFn | None = None) -> dict:
        return self.text_to_image.generate(request, progress, preview)

    def upscale(self, request: UpscaleRequest, progress: ProgressFn, preview: PreviewFn | None = None) -> bytes:
        return self.upscaler.upscale(request, progress, preview)
