"""Face analysis: the faces in a photo, each with its box, five keypoints and identity embedding.

What InstantID needs from a reference photo is one face: its 512-d identity
embedding (ArcFace, from antelopev2's `glintr100`) and its five keypoints
(eyes, nose tip, mouth corners, from antelopev2's SCRFD detector), which
become the IdentityNet's keypoint image. Everything that reads faces goes
through `FaceAnalyser.detect`; `InsightFaceAnalyser` is the real one, over
insightface's own detector and recogniser on the ONNX files in
`models/antelopev2/`, run by onnxruntime on the CPU or the GPU (a deploy
setting: `TOOLBOX_FACE_PROVIDER`).
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from modal_services.engines.loading import loading
from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.base_models.registry import FACE_DETECTOR_FILE, FACE_RECOGNISER_FILE


# Face analysis runs on antelopev2's detector and recogniser (FACE_DETECTOR_FILE, FACE_RECOGNISER_FILE);
# the pack's landmark and age models are not needed.
# The detector's square input, as InstantID prepares it.
DETECTION_SIZE = 640
EMBEDDING_SIZE = 512
# onnxruntime's providers per setting; CUDA falls back to the CPU when it cannot start.
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}
FACE_PROVIDER_SETTING = "TOOLBOX_FACE_PROVIDER"


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face, in the pixel coordinates of the image it was found in."""

    bbox: np.ndarray  # (4,) x1, y1, x2, y2
    kps: np.ndarray  # (5, 2) left eye, right eye, nose tip, left and right mouth corners
    embedding: np.ndarray  # (512,) float32

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = (float(v) for v in self.bbox)
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


class FaceAnalyser(Protocol):
    def detect(self, image: Image.Image) -> list[Face]: ...


@dataclass(frozen=True, eq=False)
class FaceReading:
    """The face a photo is read for (the largest) and how many faces it holds."""

    face: Face
    count: int
    size: tuple[int, int]  # the photo's (width, height)


def read_face(analyser: FaceAnalyser, image: Image.Image, name: str) -> FaceReading:
    """The largest face in `image`; INVALID_INPUT naming `name` when it holds none."""
    faces = analyser.detect(image.convert("RGB"))
    if not faces:
        raise ToolboxError(
            ErrorCode.INVALID_INPUT,
            f"No face was found in {name}: use a photo where one face is clearly visible, front-on and well lit.",
        )
    return FaceReading(face=max(faces, key=lambda face: face.area), count=len(faces), size=image.size)


def keypoints_on_canvas(reading: FaceReading, width: int, height: int) -> np.ndarray:
    """The face's keypoints where they land when its photo is scaled to cover width x height, centred."""
    source_width, source_height = reading.size
    scale = max(width / source_width, height / source_height)
    offset = np.array([(source_width * scale - width) / 2, (source_height * scale - height) / 2])
    return np.asarray(reading.face.kps, dtype=np.float64) * scale - offset


# InstantID's keypoint drawing (its pipeline's `draw_kps`): the IdentityNet was trained on exactly these.
KPS_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
KPS_LIMBS = [(0, 2), (1, 2), (3, 2), (4, 2)]
KPS_STICK_WIDTH = 4
KPS_RADIUS = 10


def draw_keypoints(kps: np.ndarray, width: int, height: int) -> Image.Image:
    """The IdentityNet's condition image: the five keypoints and the limbs to the nose on black."""
    import cv2

    kps = np.asarray(kps, dtype=np.float64)
    canvas = np.zeros((height, width, 3), dtype=np.float64)
    for start, end in KPS_LIMBS:
        xs, ys = kps[[start, end], 0], kps[[start, end], 1]
        length = math.hypot(xs[0] - xs[1], ys[0] - ys[1])
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), KPS_STICK_WIDTH),
                                   int(angle), 0, 360, 1)
        canvas = cv2.fillConvexPoly(canvas.copy(), polygon, KPS_COLOURS[start])
    canvas = (canvas * 0.6).astype(np.uint8)
    for (x, y), colour in zip(kps, KPS_COLOURS):
        canvas = cv2.circle(canvas.copy(), (int(x), int(y)), KPS_RADIUS, colour, -1)
    return Image.fromarray(canvas)


def face_provider() -> str:
    """Where face analysis runs: `cpu` (the default) or `cuda`."""
    provider = os.environ.get(FACE_PROVIDER_SETTING, "cpu").strip().lower() or "cpu"
    if provider not in PROVIDERS:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"{FACE_PROVIDER_SETTING} must be one of {', '.join(PROVIDERS)}.")
    return provider


class InsightFaceAnalyser:
    """insightface's SCRFD detector and ArcFace recogniser on antelopev2, loaded at the first photo."""

    def __init__(self, folder: Path, provider: str = "cpu"):
        self.folder = folder
        self.provider = provider
        self._app = None
        self._lock = threading.Lock()

    def missing_files(self) -> list[str]:
        return [name for name in (FACE_DETECTOR_FILE, FACE_RECOGNISER_FILE) if not (self.folder / name).is_file()]

    def _loaded(self):
        with self._lock:
            if self._app is None:
                missing = self.missing_files()
                if missing:
                    raise ToolboxError(
                        ErrorCode.MODELS_MISSING,
                        f"The face-analysis models (antelopev2) are not installed ({', '.join(missing)}): "
                        f"{remedies.download('antelopev2')}.",
                    )
                self._app = self._load()
            return self._app

    def _load(self):
        try:
            from insightface.app import FaceAnalysis
        except ImportError:
            raise ToolboxError(
                ErrorCode.MODEL_LOAD_FAILED,
                "Face analysis needs insightface and onnxruntime, which this worker lacks: install the `faces` "
                "extra (pip install -e '.[engines,faces]').",
            ) from None
        with loading("the face-analysis models", self.folder):
            app = FaceAnalysis(name=str(self.folder), allowed_modules=["detection", "recognition"],
                               providers=PROVIDERS[self.provider])
            app.prepare(ctx_id=0 if self.provider == "cuda" else -1, det_size=(DETECTION_SIZE, DETECTION_SIZE))
        if "recognition" not in app.models:
            raise ToolboxError(ErrorCode.MODEL_LOAD_FAILED, f"{FACE_RECOGNISER_FILE} is not a face recogniser.")
        return app

    def detect(self, image: Image.Image) -> list[Face]:
        app = self._loaded()
        # insightface reads OpenCV's BGR order.
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        return [
            Face(bbox=np.asarray(found.bbox[:4], dtype=np.float32), kps=np.asarray(found.kps, dtype=np.float32),
                 embedding=np.asarray(found.embedding, dtype=np.float32))
            for found in app.get(bgr)
            if found.kps is not None and found.embedding is not None
        ]
