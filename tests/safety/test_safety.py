"""The worker's safety step: the decision table, the NSFW classifier through its production loader,
and the runner step that judges a job's images before anything leaves the worker."""

from __future__ import annotations

import base64
import io
import json
import pytest
from PIL import Image

from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.records import create_job, load_job
from modal_services.jobs.requests import CaptionRequest, FluxGenerateRequest, GenerateRequest, UpscaleRequest
from modal_services.state.keys import preview_key
from modal_services.safety.nsfw_classifier import NsfwClassifier
from modal_services.safety.tagger import Tags
from modal_services.safety.judge import GENERATED_IMAGES, UPSCALED_IMAGE, Decision, SafetyReport, decide
from modal_services.engines.sdxl.previews import decode_preview
from modal_services.services import SERVICES, ServiceSpec, run_service_job
from tests.fixtures.tiny_nsfw import FLAGS, write_tiny_nsfw_classifier
from tests.images import encode, png_bytes

POST, SPOILER, WITHHOLD = Decision.POST, Decision.SPOILER, Decision.WITHHOLD


# ------------------------------------------------------------------ the decision


@pytest.mark.parametrize("score, age_restricted, policy, expected", [
    # Outside age-restricted channels: below the threshold posts, at or above it the policy decides.
    (0.10, False, "block", POST),
    (0.69, False, "block", POST),
    (0.70, False, "block", WITHHOLD),
    (0.99, False, "block", WITHHOLD),
    (0.10, False, "spoiler", POST),
    (0.70, False, "spoiler", SPOILER),
    (0.99, False, "spoiler", SPOILER),
    # The policy off: as generated, classified or not.
    (0.99, False, "off", POST),
    (None, False, "off", POST),
    # Age-restricted channels: as generated, whatever the policy, and no score is needed.
    (0.99, True, "block", POST),
    (0.99, True, "spoiler", POST),
    (None, True, "block", POST),
    (None, True, "off", POST),
])
def test_the_decision_table(score, age_restricted, policy, expected):
    assert decide(score, age_restricted, policy, threshold=0.7) is expected


def test_a_decision_outside_age_restricted_channels_needs_a_score():
    with pytest.raises(ValueError):
        decide(None, False, "block")


def test_the_threshold_is_the_servers():
    assert decide(0.5, False, "block", threshold=0.4) is WITHHOLD
    assert decide(0.5, False, "block", threshold=0.6) is POST


# ------------------------------------------------------------------ the classifier


def picture(colour, size=(64, 48)) -> bytes:
    return encode(Image.new("RGB", size, colour))


def test_the_tiny_vit_loads_through_the_production_path_and_scores_a_batch(tiny_nsfw_dirs, tmp_path):
    (tmp_path / "nsfw-classifier").symlink_to(tiny_nsfw_dirs["flags"])
    classifier = NsfwClassifier(tmp_path)
    assert not classifier.loaded
    scores = classifier.scores([picture("red"), picture("blue", (300, 200)), png_bytes(20, 90)])
    assert classifier.loaded and classifier.device == "cpu"
    assert len(scores) == 3 and all(0.99 < score <= 1.0 for score in scores)

    (tmp_path / "passes").mkdir()
    (tmp_path / "passes" / "nsfw-classifier").symlink_to(tiny_nsfw_dirs["passes"])
    assert all(score < 0.01 for score in NsfwClassifier(tmp_path / "passes").scores([picture("red")]))


def test_the_nsfw_label_is_found_by_name_not_position(tmp_path):
    write_tiny_nsfw_classifier(tmp_path / "nsfw-classifier", FLAGS, labels=("nsfw", "normal"))
    [score] = NsfwClassifier(tmp_path).scores([picture("green")])
    assert score > 0.99


def test_a_classifier_without_an_nsfw_label_is_refused(tmp_path):
    write_tiny_nsfw_classifier(tmp_path / "nsfw-classifier", labels=("cat", "dog"))
    with pytest.raises(ToolboxError) as caught:
        NsfwClassifier(tmp_path).load()
    assert caught.value.code is ErrorCode.MODEL_LOAD_FAILED and "'nsfw'" in caught.value.message


def test_a_missing_classifier_is_models_missing(tmp_path):
    with pytest.raises(ToolboxError) as caught:
        NsfwClassifier(tmp_path).load()
    assert caught.value.code is ErrorCode.MODELS_MISSING and remedies.download("nsfw-classifier") in caught.value.message


def test_a_corrupt_classifier_is_model_load_failed(tiny_nsfw_dirs, tmp_path):
    folder = tmp_path / "nsfw-classifier"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (folder / name).write_bytes((tiny_nsfw_dirs["passes"] / name).read_bytes())
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ToolboxError) as caught:
        NsfwClassifier(tmp_path).load()
    assert caught.value.code is ErrorCode.MODEL_LOAD_FAILED


# ------------------------------------------------------------------ the runner step


class ByRedness:
    """A stand-in classifier: an image's NSFW score is how red its first pixel is; counts its batches."""

    loaded = True

    def __init__(self):
        self.batches: list[int] = []

    def load(self):
        pass

    def scores(self, images):
        self.batches.append(len(images))
        return [Image.open(io.BytesIO(data)).getpixel((0, 0))[0] / 255 for data in images]


class DrawnAdults:
    """A stand-in tagger: every image a drawing of an adult woman, rated general; counts its batches."""

    loaded = True

    def __init__(self):
        self.batches: list[int] = []

    def load(self):
        pass

    def tag(self, images):
        self.batches.append(len(images))
        return [Tags("general", {"general": 0.9, "sensitive": 0.1, "questionable": 0.0, "explicit": 0.0},
                     {"1girl": 0.9, "mature_female": 0.8}) for _ in images]


class FourImages:
    """Makes a red, a dark, a pink and a blue image (previews along the way), as a generate result."""

    loaded = True
    COLOURS = [(255, 0, 0), (20, 20, 20), (200, 90, 90), (0, 0, 255)]

    def __init__(self):
        self.images = [picture(colour) for colour in self.COLOURS]

    def load(self):
        pass

    def generate(self, request, progress, preview=None):
        preview(self.images[0])
        return {"images": list(self.images), "seeds": [1, 2, 3, 4]}


async def everything_stored(store) -> str:
    return json.dumps(await store.items(""))


async def test_withheld_images_never_leave_the_worker(store):
    engine, classifier = FourImages(), ByRedness()
    job = await create_job(store, "generate")
    payload = {"prompt": "a beach", "count": 4, "safety": {"policy": "block", "threshold": 0.7}}
    result = await run_service_job(store, engine, SERVICES[GenerateRequest], job.id, payload, classifier=classifier,
                                   tagger=DrawnAdults())

    red, dark, pink, blue = engine.images
    assert result["images"] == [None, dark, None, blue]  # red scores 1.0 and pink 0.78: at 0.7 or more
    assert result["seeds"] == [1, 2, 3, 4]
    report = SafetyReport.from_dict(result["safety"])
    assert [image.decision for image in report.images] == [WITHHOLD, POST, WITHHOLD, POST]
    assert classifier.batches == [4]  # one batch for the job
    # The job record keeps the scores and decisions, and nothing in the store holds the withheld bytes.
    stored = await load_job(store, job.id)
    assert stored.safety == result["safety"]
    everything = await everything_stored(store)
    for withheld in (red, pink):
        assert base64.b64encode(withheld).decode() not in everything and withheld.hex() not in everything
    assert not await store.contains(preview_key(job.id))


async def test_the_decisions_follow_each_score(store):
    engine, classifier = FourImages(), ByRedness()
    job = await create_job(store, "generate")
    payload = {"prompt": "a beach", "count": 4, "safety": {"policy": "spoiler", "threshold": 0.75}}
    result = await run_service_job(store, engine, SERVICES[GenerateRequest], job.id, payload, classifier=classifier,
                                   tagger=DrawnAdults())
    report = SafetyReport.from_dict(result["safety"])
    assert [image.decision for image in report.images] == [SPOILER, POST, SPOILER, POST]
    assert [round(image.nsfw_score, 2) for image in report.images] == [1.0, 0.08, 0.78, 0.0]
    assert result["images"] == engine.images and report.spoilered == [0, 2] and report.withheld == []


@pytest.mark.parametrize("safety", [{"policy": "off"}, {"policy": "block", "age_restricted": True}])
async def test_no_classification_with_the_policy_off_or_in_age_restricted_channels(store, safety):
    engine, classifier, tagger = FourImages(), ByRedness(), DrawnAdults()
    job = await create_job(store, "generate")
    result = await run_service_job(store, engine, SERVICES[GenerateRequest], job.id,
                                   {"prompt": "a beach", "count": 4, "safety": safety}, classifier=classifier,
                                   tagger=tagger)
    assert classifier.batches == [] and result["images"] == engine.images
    assert tagger.batches == [4]  # the tagger reads them all the same
    report = SafetyReport.from_dict(result["safety"])
    assert not report.checked and report.unchecked_reason()
    assert all(image.nsfw_score is None and image.decision is POST for image in report.images)


async def test_previews_are_blurred_while_the_images_are_still_to_be_judged(store):
    engine, classifier = FourImages(), ByRedness()
    seen = []
    original = store.put

    async def spying_put(key, value):
        if key.startswith("preview:"):
            seen.append(decode_preview(value))
        await original(key, value)

    store.put = spying_put
    job = await create_job(store, "generate")
    await run_service_job(store, engine, SERVICES[GenerateRequest], job.id, {"prompt": "a beach"},
                          classifier=classifier, tagger=DrawnAdults())
    [jpeg] = seen
    assert jpeg != engine.images[0] and Image.open(io.BytesIO(jpeg)).format == "JPEG"

    seen.clear()
    job = await create_job(store, "generate")
    await run_service_job(store, engine, SERVICES[GenerateRequest], job.id,
                          {"prompt": "a beach", "safety": {"policy": "off"}}, classifier=classifier, tagger=DrawnAdults())
    # Not classified, but still tagged (the drawn-minor rule never turns off): blurred all the same.
    [jpeg] = seen
    assert jpeg != engine.images[0] and Image.open(io.BytesIO(jpeg)).format == "JPEG"


async def test_a_refused_prompt_fails_in_the_worker_too_before_the_engine_runs(store):
    class Untouchable(FourImages):
        def load(self):
            raise AssertionError("the engine was loaded for a refused prompt")

    engine = Untouchable()
    engine.loaded = False
    job = await create_job(store, "generate")
    with pytest.raises(ToolboxError) as caught:
        await run_service_job(store, engine, SERVICES[GenerateRequest], job.id,
                              {"prompt": "a beach", "safety": {"refused_words": ["beach"]}}, classifier=ByRedness(),
                              tagger=DrawnAdults())
    assert caught.value.code is ErrorCode.INVALID_PROMPT
    assert (await load_job(store, job.id)).error_code == "INVALID_PROMPT"


async def test_a_missing_classifier_fails_the_job_before_the_engine_loads(store, tmp_path):
    class Untouchable(FourImages):
        loaded = False

        def load(self):
            raise AssertionError("the engine was loaded although the classifier is missing")

    engine = Untouchable()
    job = await create_job(store, "generate")
    with pytest.raises(ToolboxError) as caught:
        await run_service_job(store, engine, SERVICES[GenerateRequest], job.id, {"prompt": "a beach"},
                              classifier=NsfwClassifier(tmp_path / "empty"), tagger=DrawnAdults())
    assert caught.value.code is ErrorCode.MODELS_MISSING


async def test_an_upscale_result_is_judged_as_one_image(store):
    class Upscaler:
        loaded = True

        def load(self):
            pass

        def upscale(self, request, progress):
            return picture((255, 0, 0))

    engine = Upscaler()
    spec = ServiceSpec(UpscaleRequest, "SdxlService", lambda: Upscaler, lambda: Upscaler.upscale,
                       judged_images=UPSCALED_IMAGE)
    job = await create_job(store, "upscale")
    result = await run_service_job(store, engine, spec, job.id, {"image": picture("white")}, classifier=ByRedness(),
                                   tagger=DrawnAdults())
    assert result["image"] is None and SafetyReport.from_dict(result["safety"]).withheld == [0]


def test_the_image_making_kinds_are_judged():
    assert SERVICES[GenerateRequest].judged_images is GENERATED_IMAGES
    assert SERVICES[FluxGenerateRequest].judged_images is GENERATED_IMAGES
    assert SERVICES[UpscaleRequest].judged_images is UPSCALED_IMAGE
    assert SERVICES[CaptionRequest].judged_images is None
