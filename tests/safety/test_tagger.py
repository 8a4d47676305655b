"""The booru tagger and the drawn-minor rule: preprocessing, the tagger through onnxruntime on a tiny ONNX
stand-in with the real shapes, the decision table's rows, and the worker's runner withholding a drawn minor
wherever the image goes and whatever the policy says."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bot.api.payloads import api_safety
from bot.api.responses import safety_body
from bot.content_safety import public_lines, withheld_notice
from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.records import create_job
from modal_services.jobs.requests import GenerateRequest, SafetyContext
from modal_services.safety.judge import Decision, Reason, SafetyReport, judge_image
from modal_services.safety.nsfw_classifier import NsfwClassifier
from modal_services.safety.tagger import Tagger, Tags, prepare
from modal_services.services import SERVICES, run_service_job
from tests.fixtures.tiny_tagger import INPUT_SIZE, VERDICTS, write_tiny_tagger
from tests.images import encode

POST, SPOILER, WITHHOLD = Decision.POST, Decision.SPOILER, Decision.WITHHOLD


def picture(colour, size=(64, 48)) -> bytes:
    return encode(Image.new("RGB", size, colour))


def installed(tiny_tagger_dirs, tmp_path, verdict: str):
    """A models folder holding the tiny tagger of that verdict."""
    (tmp_path / verdict).mkdir()
    (tmp_path / verdict / "wd-tagger").symlink_to(tiny_tagger_dirs[verdict], target_is_directory=True)
    return tmp_path / verdict


# ------------------------------------------------------------------ preprocessing


def test_an_image_is_padded_white_to_a_centred_square_resized_and_turned_bgr():
    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    array = prepare(wide, INPUT_SIZE)
    assert array.shape == (INPUT_SIZE, INPUT_SIZE, 3) and array.dtype == np.float32
    middle, top, bottom = array[INPUT_SIZE // 2, INPUT_SIZE // 2], array[3, INPUT_SIZE // 2], array[-3, INPUT_SIZE // 2]
    assert middle.tolist() == [0.0, 0.0, 255.0]  # red, as BGR
    assert top.tolist() == bottom.tolist() == [255.0, 255.0, 255.0]  # white bands above and below, not black
    assert array.max() <= 255.0 and array.min() >= 0.0  # values 0..255, not normalised


def test_a_tall_image_gets_its_bands_at_the_sides():
    array = prepare(Image.new("RGB", (50, 100), (0, 0, 255)), 100)
    assert array[50, 2].tolist() == [255.0, 255.0, 255.0] and array[50, 50].tolist() == [255.0, 0.0, 0.0]


# ------------------------------------------------------------------ the tagger on onnxruntime


def test_the_tiny_tagger_runs_through_onnxruntime_and_reads_ratings_tags_and_characters(tiny_tagger_dirs, tmp_path):
    tagger = Tagger(installed(tiny_tagger_dirs, tmp_path, "safe"))
    assert not tagger.loaded
    red, blue = tagger.tag([picture("red"), picture("blue", (48, 48))])
    assert tagger.loaded
    assert red.rating == "general" and red.rating_scores["general"] == pytest.approx(0.9, abs=1e-3)
    assert set(red.rating_scores) == {"general", "sensitive", "questionable", "explicit"}
    assert red.characters == {"hatsune_miku": pytest.approx(0.92, abs=1e-3)}
    assert red.above(0.35) == ["red_theme", "1girl", "solo", "long_hair", "^_^", "smile"]  # likeliest first
    # Only `red_theme` reads the pixels, from the last channel: red reaches it as red only if the input is BGR.
    assert red.general["red_theme"] > 0.99 and "red_theme" not in blue.general
    assert "loli" not in red.general  # below the reporting floor: not reported


def test_a_model_with_a_fixed_batch_of_one_takes_the_images_one_at_a_time(tmp_path):
    write_tiny_tagger(tmp_path / "wd-tagger", VERDICTS["minor_explicit"], batch=1)
    tags = Tagger(tmp_path).tag([picture("red"), picture("green"), picture("blue")])
    assert [item.rating for item in tags] == ["explicit"] * 3 and all("loli" in item.general for item in tags)


def test_staged_in_host_memory_then_placed_as_on_modal(tiny_tagger_dirs, tmp_path):
    tagger = Tagger(installed(tiny_tagger_dirs, tmp_path, "safe"), device="cuda")
    tagger.load(staging_device="cpu")
    assert tagger.loaded and tagger.session is None  # read, no session before the GPU is attached
    tagger.place()
    # No CUDA here: the session runs on the CPU rather than failing.
    assert tagger.session.get_providers() == ["CPUExecutionProvider"]
    assert tagger.tag([picture("red")])[0].rating == "general"


def test_a_missing_tagger_is_models_missing(tmp_path):
    (tmp_path / "wd-tagger").mkdir()
    (tmp_path / "wd-tagger" / "selected_tags.csv").write_text("tag_id,name,category,count\n")
    with pytest.raises(ToolboxError) as caught:
        Tagger(tmp_path).load()
    assert caught.value.code is ErrorCode.MODELS_MISSING and remedies.download("wd-tagger") in caught.value.message


def test_a_tag_list_without_minor_tags_is_refused_rather_than_never_firing(tmp_path):
    folder = write_tiny_tagger(tmp_path / "wd-tagger", VERDICTS["safe"])
    tags_file = folder / "selected_tags.csv"
    tags_file.write_text(tags_file.read_text().replace(",loli,", ",cat_ears,").replace(",child,", ",dog_ears,"))
    with pytest.raises(ToolboxError) as caught:
        Tagger(tmp_path).load()
    assert caught.value.code is ErrorCode.MODEL_LOAD_FAILED and "minors" in caught.value.message


def test_a_corrupt_model_is_model_load_failed(tiny_tagger_dirs, tmp_path):
    folder = tmp_path / "wd-tagger"
    folder.mkdir()
    (folder / "selected_tags.csv").write_bytes((tiny_tagger_dirs["safe"] / "selected_tags.csv").read_bytes())
    (folder / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(ToolboxError) as caught:
        Tagger(tmp_path).load()
    assert caught.value.code is ErrorCode.MODEL_LOAD_FAILED


# ------------------------------------------------------------------ the decision table


def tags(rating_scores: dict[str, float], **general: float) -> Tags:
    return Tags(max(rating_scores, key=rating_scores.get), rating_scores, general)


EXPLICIT = {"general": 0.02, "sensitive": 0.03, "questionable": 0.1, "explicit": 0.85}
QUESTIONABLE = {"general": 0.05, "sensitive": 0.2, "questionable": 0.7, "explicit": 0.05}
GENERAL = {"general": 0.9, "sensitive": 0.08, "questionable": 0.01, "explicit": 0.01}
# Sensitive the likeliest alone, but questionable and explicit together more likely than not.
SPLIT = {"general": 0.05, "sensitive": 0.4, "questionable": 0.3, "explicit": 0.25}
EVERYWHERE = [SafetyContext(policy="block"), SafetyContext(policy="spoiler"), SafetyContext(policy="off"),
              SafetyContext(policy="block", age_restricted=True), SafetyContext(policy="off", age_restricted=True)]


@pytest.mark.parametrize("context", EVERYWHERE)
@pytest.mark.parametrize("image", [
    tags(EXPLICIT, loli=0.9), tags(QUESTIONABLE, child=0.6), tags(EXPLICIT, female_child=0.31),
    tags(SPLIT, shota=0.8), tags(EXPLICIT, toddler=0.5, mature_female=0.9),
])
def test_a_drawn_minor_rated_questionable_or_explicit_is_withheld_everywhere(image, context):
    judged = judge_image(0.01, image, context)
    assert (judged.decision, judged.reason) == (WITHHOLD, Reason.DRAWN_MINOR)


@pytest.mark.parametrize("image, context, expected", [
    # A minor tag rated general or sensitive: the policy decides on the score, as for any image.
    (tags(GENERAL, child=0.9), SafetyContext(policy="block"), POST),
    # Below the minor tags' threshold, or a tag adults have too: not the minor rule.
    (tags(EXPLICIT, loli=0.2), SafetyContext(policy="off"), POST),
    (tags(EXPLICIT, petite=0.9, flat_chest=0.9, school_uniform=0.9), SafetyContext(policy="off"), POST),
    # Rated explicit: flagged however low the photo-trained classifier scored it, then the policy decides.
    (tags(EXPLICIT, mature_female=0.9), SafetyContext(policy="block"), WITHHOLD),
    (tags(EXPLICIT, mature_female=0.9), SafetyContext(policy="spoiler"), SPOILER),
    (tags(EXPLICIT, mature_female=0.9), SafetyContext(policy="off"), POST),
    (tags(EXPLICIT, mature_female=0.9), SafetyContext(policy="block", age_restricted=True), POST),
    # Questionable alone does not flag: the classifier's score does.
    (tags(QUESTIONABLE, mature_female=0.9), SafetyContext(policy="block"), POST),
])
def test_the_other_rows_leave_it_to_the_policy(image, context, expected):
    judged = judge_image(0.01, image, context)
    assert judged.decision is expected
    assert judged.reason is (None if expected is POST else Reason.NSFW)


# ------------------------------------------------------------------ the worker's runner


class FourDrawings:
    loaded = True

    def __init__(self):
        self.images = [picture(colour) for colour in ("red", "green", "blue", "white")]

    def load(self):
        pass

    def generate(self, request, progress, preview=None):
        return {"images": list(self.images), "seeds": [1, 2, 3, 4]}


async def judged(store, models_dir, safety: SafetyContext) -> dict:
    engine = FourDrawings()
    job = await create_job(store, "generate")
    payload = {"prompt": "a portrait", "count": 4, "safety": safety.model_dump()}
    return await run_service_job(store, engine, SERVICES[GenerateRequest], job.id, payload,
                                 classifier=NsfwClassifier(models_dir), tagger=Tagger(models_dir))


def models_with(tiny_tagger_dirs, tiny_nsfw_dirs, tmp_path, tagger_verdict: str, classifier_verdict: str):
    models_dir = installed(tiny_tagger_dirs, tmp_path, tagger_verdict)
    (models_dir / "nsfw-classifier").symlink_to(tiny_nsfw_dirs[classifier_verdict], target_is_directory=True)
    return models_dir


@pytest.mark.parametrize("safety", [
    SafetyContext(policy="block", age_restricted=True),  # an age-restricted channel
    SafetyContext(policy="off"),  # the server's policy off
    api_safety(False),  # the API's `safety_check: false`
    SafetyContext(policy="spoiler"),
])
async def test_a_drawn_minor_is_withheld_by_the_real_tagger_whatever_the_context(
        store, tiny_tagger_dirs, tiny_nsfw_dirs, tmp_path, safety):
    # The photo-trained classifier passes every image: only the tagger sees what they depict.
    models_dir = models_with(tiny_tagger_dirs, tiny_nsfw_dirs, tmp_path, "minor_explicit", "passes")
    result = await judged(store, models_dir, safety)
    assert result["images"] == [None] * 4 and result["seeds"] == [1, 2, 3, 4]
    report = SafetyReport.from_dict(result["safety"])
    assert report.withheld_for(Reason.DRAWN_MINOR) == [0, 1, 2, 3]
    assert all(image.rating == "explicit" for image in report.images)


async def test_the_minor_rule_needs_no_classifier_where_the_policy_is_off(store, tiny_tagger_dirs, tmp_path):
    # No NSFW classifier installed at all: with the policy off it is not needed, the tagger still is.
    models_dir = installed(tiny_tagger_dirs, tmp_path, "minor_explicit")
    result = await judged(store, models_dir, SafetyContext(policy="off"))
    assert result["images"] == [None] * 4


async def test_a_missing_tagger_fails_the_job_even_with_the_policy_off(store, tmp_path):
    with pytest.raises(ToolboxError) as caught:
        await judged(store, tmp_path, SafetyContext(policy="off"))
    assert caught.value.code is ErrorCode.MODELS_MISSING and "tagger" in caught.value.message


@pytest.mark.parametrize("safety, classifier_verdict, expected", [
    (SafetyContext(policy="block"), "flags", WITHHOLD),
    (SafetyContext(policy="spoiler"), "flags", SPOILER),
    (SafetyContext(policy="block", age_restricted=True), "flags", POST),
    (SafetyContext(policy="off"), "flags", POST),
    (SafetyContext(policy="block"), "passes", POST),
])
async def test_a_drawn_adult_is_left_to_the_servers_policy_as_before(
        store, tiny_tagger_dirs, tiny_nsfw_dirs, tmp_path, safety, classifier_verdict, expected):
    models_dir = models_with(tiny_tagger_dirs, tiny_nsfw_dirs, tmp_path, "safe", classifier_verdict)
    report = SafetyReport.from_dict((await judged(store, models_dir, safety))["safety"])
    assert [image.decision for image in report.images] == [expected] * 4
    assert report.withheld_for(Reason.DRAWN_MINOR) == []


# ------------------------------------------------------------------ what people are told


def test_the_reports_say_why_a_drawn_minor_was_withheld_even_where_nothing_was_checked():
    report = SafetyReport("off", False, 0.7, [
        judge_image(None, tags(EXPLICIT, loli=0.9), SafetyContext(policy="off")),
        judge_image(None, tags(GENERAL), SafetyContext(policy="off")),
    ])
    assert SafetyReport.from_dict(report.to_dict()) == report
    lines = public_lines(report)
    assert any("Image 1 not posted" in line for line in lines) and any("not run" in line for line in lines)
    notice = withheld_notice(report)
    assert "Image 1 withheld" in notice and "minor" in notice and "whatever" in notice and "score" not in notice
    body = safety_body(report)
    assert body["withheld"] == [0] and "whatever safety_check says" in body["note"]


def test_an_image_the_rating_flagged_says_so():
    report = SafetyReport("block", False, 0.7, [
        judge_image(0.12, tags(EXPLICIT, mature_female=0.9), SafetyContext(policy="block"))])
    assert "0.12 (rated explicit)" in withheld_notice(report)
    assert "rated explicit" in safety_body(report)["note"]
