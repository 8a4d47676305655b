"""The booru tagger: SmilingWolf's WD tagger (ONNX, on onnxruntime) from its folder on the models volume.

It reads drawn images as Danbooru does: a rating (general, sensitive,
questionable, explicit), general tags (`1girl`, `long_hair`...) and character
tags, each with its probability. The worker runs it beside the NSFW classifier
on every judged image, whatever the safety policy (`judge.py` says what it
decides), and the `tags` caption style takes its tags.

The folder holds `model.onnx` (input NHWC float32, BGR, 0..255, a white-padded
square; output one sigmoid probability per tag) and `selected_tags.csv`
(tag_id,name,category,count; category 9 is a rating, 0 general, 4 a
character). One per worker process, loaded once, like the classifier.
"""

from __future__ import annotations

import csv
import threading
from dataclasses import dataclass, field
from pathlib import Path

from modal_services.engines.loading import loading
from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.imaging import decode_image
from modal_services.layout import TAGGER_DIR
from modal_services.safety.nsfw_classifier import MAX_CLASSIFIED_PIXELS

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
RATINGS = ("general", "sensitive", "questionable", "explicit")
RATING_CATEGORY, GENERAL_CATEGORY, CHARACTER_CATEGORY = "9", "0", "4"
# Tags below this are never reported: nothing here reads a tag that unlikely, and the report stays small.
REPORTED_FLOOR = 0.2
# SmilingWolf's own default for character tags: below it a name is mostly a guess.
CHARACTER_THRESHOLD = 0.85
# onnxruntime's providers per device; CUDA falls back to the CPU where it cannot start.
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
MISSING_MESSAGE = f"The booru tagger that checks images is not installed: {remedies.download('wd-tagger')}."


@dataclass(frozen=True)
class Tags:
    """What the tagger read in one image: its rating (the likeliest of the four), every rating's
    probability, and the general and character tags at or above the reporting floor."""

    rating: str
    rating_scores: dict[str, float]
    general: dict[str, float] = field(default_factory=dict)
    characters: dict[str, float] = field(default_factory=dict)

    def above(self, threshold: float) -> list[str]:
        """The general tags at or above `threshold`, likeliest first."""
        return [tag for tag, score in sorted(self.general.items(), key=lambda item: -item[1]) if score >= threshold]


@dataclass(frozen=True)
class TagList:
    """`selected_tags.csv`: each output position's tag name, and which positions are ratings, general tags
    and characters."""

    names: list[str]
    ratings: dict[str, int]
    general: list[int]
    characters: list[int]

    @classmethod
    def read(cls, path: Path) -> "TagList":
        names: list[str] = []
        ratings: dict[str, int] = {}
        general: list[int] = []
        characters: list[int] = []
        with path.open(newline="", encoding="utf-8") as file:
            for index, row in enumerate(csv.DictReader(file)):
                names.append(row["name"])
                category = row["category"].strip()
                if category == RATING_CATEGORY:
                    ratings[row["name"]] = index
                elif category == GENERAL_CATEGORY:
                    general.append(index)
                elif category == CHARACTER_CATEGORY:
                    characters.append(index)
        return cls(names, ratings, general, characters)


def prepare(image, size: int):
    """One RGB image as the tagger reads it: padded to a square with white (the training data's background),
    resized to `size`, as float32 BGR values 0..255 (height, width, 3)."""
    import numpy as np
    from PIL import Image

    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]


class Tagger:
    def __init__(self, models_dir: Path, device: str | None = None):
        self.folder = models_dir / TAGGER_DIR
        self.device = device
        self.tag_list: TagList | None = None
        self.session = None
        # The model's bytes, read into host memory while no GPU is attached (a Modal snapshot keeps them);
        # `place` makes the session on the device from them.
        self._staged: bytes | None = None
        self._loading = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self.session is not None or self._staged is not None

    def missing_files(self) -> list[str]:
        """The files `load` needs that are not on the volume."""
        return [name for name in (MODEL_FILE, TAGS_FILE) if not (self.folder / name).is_file()]

    def load(self, staging_device: str | None = None) -> None:
        """Load once (thread-safe); MODELS_MISSING if its files are not on the volume. With `staging_device`
        "cpu" the model is only read into memory, and `place` puts it on its device."""
        with self._loading:
            if self.loaded:
                return
            if self.missing_files():
                raise ToolboxError(ErrorCode.MODELS_MISSING, MISSING_MESSAGE)
            with loading("the booru tagger", self.folder):
                tag_list = TagList.read(self.folder / TAGS_FILE)
                _check_tag_list(tag_list)
                if staging_device == "cpu" and self._device() != "cpu":
                    self._staged = (self.folder / MODEL_FILE).read_bytes()
                else:
                    self.session = self._session(str(self.folder / MODEL_FILE))
            self.tag_list = tag_list

    def place(self) -> None:
        """Make the session on its device from the model staged in host memory."""
        with self._loading:
            if self._staged is not None:
                with loading("the booru tagger", self.folder):
                    self.session = self._session(self._staged)
                self._staged = None

    def tag(self, images: list[bytes]) -> list[Tags]:
        """Each encoded image's rating and tags."""
        import numpy as np

        self.load()
        self.place()
        model_input = self.session.get_inputs()[0]
        size = int(model_input.shape[1])
        batch = np.stack([prepare(decode_image(data, max_pixels=MAX_CLASSIFIED_PIXELS, name="A result image").image,
                                  size) for data in images])
        # A model exported with a fixed batch of one takes the images one at a time.
        fixed_batch = isinstance(model_input.shape[0], int)
        chunks = np.split(batch, len(images)) if fixed_batch else [batch]
        probabilities = np.concatenate([self.session.run(None, {model_input.name: chunk})[0] for chunk in chunks])
        return [self._read(row) for row in probabilities]

    def _read(self, probabilities) -> Tags:
        tag_list = self.tag_list
        ratings = {name: round(float(probabilities[index]), 4) for name, index in tag_list.ratings.items()}

        def reported(indexes: list[int], floor: float) -> dict[str, float]:
            return {tag_list.names[index]: round(float(probabilities[index]), 4)
                    for index in indexes if probabilities[index] >= floor}

        return Tags(max(ratings, key=ratings.get), ratings, reported(tag_list.general, REPORTED_FLOOR),
                    reported(tag_list.characters, CHARACTER_THRESHOLD))

    def _device(self) -> str:
        if self.device is None:
            import onnxruntime

            self.device = "cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"
        return self.device

    def _session(self, model):
        import onnxruntime

        # The CPU build of onnxruntime has no CUDA provider: asked for it, the session runs on the CPU.
        wanted = PROVIDERS["cuda" if self._device().startswith("cuda") else "cpu"]
        available = onnxruntime.get_available_providers()
        return onnxruntime.InferenceSession(model, providers=[name for name in wanted if name in available])


def _check_tag_list(tag_list: TagList) -> None:
    """A tag list without the four ratings, or without any of the tags that mark minors, cannot do the
    tagger's job: refused, rather than a check that can never fire."""
    from modal_services.safety.judge import MINOR_TAGS

    if set(tag_list.ratings) != set(RATINGS):
        raise ToolboxError(ErrorCode.MODEL_LOAD_FAILED,
                           f"The booru tagger's ratings are {sorted(tag_list.ratings)}, not {list(RATINGS)}.")
    if not MINOR_TAGS & set(tag_list.names):
        raise ToolboxError(ErrorCode.MODEL_LOAD_FAILED,
                           "The booru tagger's tag list has none of the tags that mark minors in drawn images.")
