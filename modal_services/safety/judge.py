"""What happens to a job's images after the engine made them: classified, then posted, spoilered or withheld.

The worker runs this for every job kind marked in `SERVICES` (the engines
know nothing of it), so that an image that is withheld never leaves the
worker: its bytes are dropped from the result, and the result says for every
image its NSFW score and the decision. `decide` is the one place that
decision is made. Pure Python: the bot reads the reports with the same code.
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Callable

from modal_services.jobs.requests import DEFAULT_NSFW_THRESHOLD, SafetyContext


class Decision(str, Enum):
    POST = "post"
    SPOILER = "spoiler"
    WITHHOLD = "withhold"


def decide(score: float | None, age_restricted: bool, policy: str, threshold: float = DEFAULT_NSFW_THRESHOLD) -> Decision:
    """Post, spoiler or withhold one image: as generated in an age-restricted channel or with the policy off;
    elsewhere an image scoring `threshold` or more is spoilered or withheld, as the policy says."""
    if policy == "off" or age_restricted:
        return Decision.POST
    if score is None:
        raise ValueError("an image shown outside an age-restricted channel needs its NSFW score")
    if score < threshold:
        return Decision.POST
    return Decision.SPOILER if policy == "spoiler" else Decision.WITHHOLD


# ------------------------------------------------------------------ real people's photos


def real_person_rule(decision: Decision, score: float | None, context: SafetyContext) -> Decision:
    """`decision`, unless the job started from a real person's photo and the image is flagged: then it is
    withheld, whatever the policy or the channel. Flagged at the server's threshold, never a laxer one
    than the default: raising the threshold does not loosen this rule."""
    flagged = score is not None and score >= min(context.threshold, DEFAULT_NSFW_THRESHOLD)
    return Decision.WITHHOLD if context.real_photo and flagged else decision


# ------------------------------------------------------------------ reports


@dataclass(frozen=True)
class JudgedImage:
    decision: Decision
    nsfw_score: float | None = None


@dataclass(frozen=True)
class SafetyReport:
    """How a job's images were judged, in the result and the job record (no image bytes)."""

    policy: str
    age_restricted: bool
    threshold: float
    images: list[JudgedImage] = field(default_factory=list)
    classify_seconds: float = 0.0
    # Made from a real person's photo: classified always, and a flagged image withheld always.
    real_photo: bool = False

    @property
    def checked(self) -> bool:
        return self.real_photo or (self.policy != "off" and not self.age_restricted)

    @property
    def withheld(self) -> list[int]:
        """0-based positions of the images the result no longer holds."""
        return [index for index, image in enumerate(self.images) if image.decision is Decision.WITHHOLD]

    @property
    def spoilered(self) -> list[int]:
        return [index for index, image in enumerate(self.images) if image.decision is Decision.SPOILER]

    def unchecked_reason(self) -> str | None:
        """Why the images were not classified, in words for the result, or None if they were."""
        if self.checked:
            return None
        if self.policy == "off":
            return "the safety check is off"
        if self.age_restricted:
            return "age-restricted channel: posted as generated, not checked"
        return None

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["checked"] = self.checked
        record["images"] = [{"nsfw_score": image.nsfw_score, "decision": image.decision.value} for image in self.images]
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "SafetyReport":
        images = [JudgedImage(Decision(image["decision"]), image.get("nsfw_score")) for image in record.get("images", [])]
        return cls(record["policy"], record["age_restricted"], record["threshold"], images,
                   record.get("classify_seconds", 0.0), record.get("real_photo", False))


# Classifies encoded images in one batch: one NSFW probability each.
Classify = Callable[[list[bytes]], list[float]]


def judge(images: list[bytes], context: SafetyContext, classify: Classify | None) -> tuple[list[bytes | None], SafetyReport]:
    """The images as they may leave the worker (None where withheld) and the report on them."""
    started = time.monotonic()
    scores: list[float | None] = [None] * len(images)
    if context.classifies:
        if classify is None:
            raise ValueError("the safety context asks for a classifier and none was given")
        scores = [round(float(score), 4) for score in classify(images)]
    judged = [JudgedImage(real_person_rule(decide(score, context.age_restricted, context.policy, context.threshold),
                                           score, context), score)
              for score in scores]
    kept = [None if image.decision is Decision.WITHHOLD else data for image, data in zip(judged, images)]
    report = SafetyReport(context.policy, context.age_restricted, context.threshold, judged,
                          round(time.monotonic() - started, 4) if context.classifies else 0.0, context.real_photo)
    return kept, report


@dataclass(frozen=True)
class ResultImages:
    """Where a job kind's result holds its images: `take` them out, `give` back what may leave with the report."""

    take: Callable[[Any], list[bytes]]
    give: Callable[[Any, list[bytes | None], dict[str, Any]], Any]


# A generate result's `images` (None where withheld), and its `safety` report beside them.
GENERATED_IMAGES = ResultImages(
    take=lambda result: list(result["images"]),
    give=lambda result, images, report: {**result, "images": images, "safety": report},
)
# An upscale returns the PNG itself; judged, it becomes {"image": PNG or None, "safety": report}.
UPSCALED_IMAGE = ResultImages(
    take=lambda png: [png],
    give=lambda png, images, report: {"image": images[0], "safety": report},
)

# Previews of work that will be classified are blurred this much (relative to their longer side): the
# composition and progress show, what the image depicts does not, before the check has run.
PREVIEW_BLUR = 0.04


def obscured(preview: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """A preview sink that blurs each JPEG before passing it on."""
    from PIL import Image, ImageFilter

    def blurred(jpeg: bytes) -> None:
        with Image.open(io.BytesIO(jpeg)) as image:
            radius = max(2.0, PREVIEW_BLUR * max(image.size))
            buffer = io.BytesIO()
            image.convert("RGB").filter(ImageFilter.GaussianBlur(radius)).save(buffer, format="JPEG", quality=60)
        preview(buffer.getvalue())

    return blurred
