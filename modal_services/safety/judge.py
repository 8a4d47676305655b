"""What happens to a job's images after the engine made them: read, then posted, spoilered or withheld.

The worker runs this for every job kind marked in `SERVICES` (the engines
know nothing of it), so that an image that is withheld never leaves the
worker: its bytes are dropped from the result, and the result says for every
image its NSFW score, its rating, the decision and why. Pure Python: the bot
reads the reports with the same code.

Two models read each image: the NSFW classifier (a score, trained mostly on
photographs) and the booru tagger (a rating and Danbooru tags, trained on drawn
images). `judge_image` combines them, first row that applies:

| the tagger says                         | the classifier | where, and the policy            | decision            |
|-----------------------------------------|----------------|----------------------------------|---------------------|
| a minor tag, rated questionable/explicit | (any)          | anywhere, any policy, unchecked  | withheld, always    |
| rated explicit, from a real person's photo | (any)        | anywhere, any policy             | withheld, always    |
| (anything else), from a real person's photo | >= the lower of the server's and the default threshold | anywhere | withheld, always |
| (anything else)                         | (any)          | policy off, or age-restricted    | posted as generated |
| rated explicit                          | (any)          | elsewhere                        | flagged: the policy |
| (anything else)                         | >= threshold   | elsewhere                        | flagged: the policy |
| (anything else)                         | < threshold    | elsewhere                        | posted              |

"Flagged: the policy" is a spoiler or withheld, as the server's policy says
(`decide`). The first row never turns off: the tagger runs even where the
classifier does not (`safety_check: false`, `policy: off`, age-restricted
channels). A job made from a real person's photo (a face reference, an
uploaded source) is always classified, so its two rows apply everywhere too.
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable

from modal_services.jobs.requests import DEFAULT_NSFW_THRESHOLD, SafetyContext

if TYPE_CHECKING:
    from modal_services.safety.tagger import Tags


class Decision(str, Enum):
    POST = "post"
    SPOILER = "spoiler"
    WITHHOLD = "withhold"


class Reason(str, Enum):
    """Why an image was not posted as generated."""

    NSFW = "nsfw"  # flagged (classifier or explicit rating), and the server's policy spoilers or withholds it
    DRAWN_MINOR = "drawn_minor"  # tagged as a minor and rated questionable or explicit: withheld whatever the policy
    REAL_PHOTO = "real_photo"  # made from a real person's photo and flagged: withheld whatever the policy


# The Danbooru tags that say the figure drawn is a child. Body types adults have too (`petite`, `flat_chest`,
# `small_breasts`, `short`) and clothes adults wear (`school_uniform`) are not minor tags.
MINOR_TAGS = frozenset({
    "loli", "shota", "oppai_loli", "child", "female_child", "male_child", "toddler", "baby", "aged_down",
    "kindergarten_uniform", "randoseru",
})
# Lower than the captions' threshold on purpose: the rule errs toward withholding, and it applies only to
# images rated questionable or explicit.
MINOR_TAG_THRESHOLD = 0.3
SEXUAL_RATINGS = ("questionable", "explicit")


def minor_tags(tags: Tags) -> list[str]:
    """The minor tags the tagger gave an image, at or above MINOR_TAG_THRESHOLD."""
    return sorted(tag for tag in MINOR_TAGS if tags.general.get(tag, 0.0) >= MINOR_TAG_THRESHOLD)


def rated_sexual(tags: Tags) -> bool:
    """Rated questionable or explicit: the likeliest rating, or the two together at least as likely as not."""
    return tags.rating in SEXUAL_RATINGS or sum(tags.rating_scores.get(rating, 0.0) for rating in SEXUAL_RATINGS) >= 0.5


def decide(score: float | None, age_restricted: bool, policy: str, threshold: float = DEFAULT_NSFW_THRESHOLD,
           explicit: bool = False) -> Decision:
    """The server's policy for one image (the table's last four rows): as generated in an age-restricted
    channel or with the policy off; elsewhere an image rated explicit or scoring `threshold` or more is
    spoilered or withheld, as the policy says."""
    if policy == "off" or age_restricted:
        return Decision.POST
    if score is None:
        raise ValueError("an image shown outside an age-restricted channel needs its NSFW score")
    if score < threshold and not explicit:
        return Decision.POST
    return Decision.SPOILER if policy == "spoiler" else Decision.WITHHOLD


# ------------------------------------------------------------------ real people's photos


def real_photo_flagged(score: float | None, tags: Tags, context: SafetyContext) -> bool:
    """Made from a real person's photo and flagged: scored at the server's threshold (never a laxer one than
    the default: raising the threshold does not loosen this rule) or rated explicit."""
    flagged = (score is not None and score >= min(context.threshold, DEFAULT_NSFW_THRESHOLD)) or tags.rating == "explicit"
    return context.real_photo and flagged


# ------------------------------------------------------------------ reports


@dataclass(frozen=True)
class JudgedImage:
    decision: Decision
    nsfw_score: float | None = None
    rating: str | None = None  # the tagger's
    reason: Reason | None = None  # None where posted as generated


def judge_image(score: float | None, tags: Tags, context: SafetyContext) -> JudgedImage:
    """One image's row of the table in this module's docstring."""
    if minor_tags(tags) and rated_sexual(tags):
        return JudgedImage(Decision.WITHHOLD, score, tags.rating, Reason.DRAWN_MINOR)
    if real_photo_flagged(score, tags, context):
        return JudgedImage(Decision.WITHHOLD, score, tags.rating, Reason.REAL_PHOTO)
    decision = decide(score, context.age_restricted, context.policy, context.threshold,
                      explicit=tags.rating == "explicit")
    return JudgedImage(decision, score, tags.rating, None if decision is Decision.POST else Reason.NSFW)


@dataclass(frozen=True)
class SafetyReport:
    """How a job's images were judged, in the result and the job record (no image bytes)."""

    policy: str
    age_restricted: bool
    threshold: float
    images: list[JudgedImage] = field(default_factory=list)
    classify_seconds: float = 0.0  # tagging and classifying together
    # Made from a real person's photo: classified always, and a flagged image withheld always.
    real_photo: bool = False

    @property
    def checked(self) -> bool:
        """Whether the images were classified (the drawn-minor rule always applies)."""
        return self.real_photo or (self.policy != "off" and not self.age_restricted)

    @property
    def withheld(self) -> list[int]:
        """0-based positions of the images the result no longer holds."""
        return [index for index, image in enumerate(self.images) if image.decision is Decision.WITHHOLD]

    @property
    def spoilered(self) -> list[int]:
        return [index for index, image in enumerate(self.images) if image.decision is Decision.SPOILER]

    def withheld_for(self, reason: Reason) -> list[int]:
        """0-based positions of the images withheld for `reason`."""
        return [index for index in self.withheld if self.images[index].reason is reason]

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
        record["images"] = [{"nsfw_score": image.nsfw_score, "decision": image.decision.value, "rating": image.rating,
                             "reason": image.reason and image.reason.value} for image in self.images]
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "SafetyReport":
        images = [JudgedImage(Decision(image["decision"]), image.get("nsfw_score"), image.get("rating"),
                              Reason(image["reason"]) if image.get("reason") else None)
                  for image in record.get("images", [])]
        return cls(record["policy"], record["age_restricted"], record["threshold"], images,
                   record.get("classify_seconds", 0.0), record.get("real_photo", False))


# Classifies encoded images in one batch: one NSFW probability each.
Classify = Callable[[list[bytes]], list[float]]
# Tags encoded images in one batch: one `Tags` each.
Tag = Callable[[list[bytes]], list["Tags"]]


def judge(images: list[bytes], context: SafetyContext, classify: Classify | None,
          tag: Tag) -> tuple[list[bytes | None], SafetyReport]:
    """The images as they may leave the worker (None where withheld) and the report on them. The tagger reads
    every image; the classifier only those the context classifies."""
    started = time.monotonic()
    scores: list[float | None] = [None] * len(images)
    if context.classifies:
        if classify is None:
            raise ValueError("the safety context asks for a classifier and none was given")
        scores = [round(float(score), 4) for score in classify(images)]
    judged = [judge_image(score, tags, context) for score, tags in zip(scores, tag(images), strict=True)]
    kept = [None if image.decision is Decision.WITHHOLD else data for image, data in zip(judged, images)]
    report = SafetyReport(context.policy, context.age_restricted, context.threshold, judged,
                          round(time.monotonic() - started, 4), context.real_photo)
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
