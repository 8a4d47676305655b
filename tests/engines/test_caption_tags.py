"""The `tags` caption style: the booru tagger's tags as LoRA trainers caption a dataset, on the tiny stand-in tagger
(tests/fixtures/tiny_tagger.py; its "safe" stand-in's scores are in its VERDICTS)."""

from __future__ import annotations

import pytest

from modal_services.base_models.registry import models_for
from modal_services.engines.caption import GENERAL_THRESHOLD, CaptionEngine, booru_caption, caption_purpose
from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.requests import CaptionRequest
from modal_services.layout import CAPTION_MODEL, TAGGER_DIR, Layout
from modal_services.safety.tagger import Tags
from tests.images import encode, png_bytes

# The "safe" stand-in, read as a caption: its character (0.92), its general tags at 0.35 or more likeliest first
# (1girl 0.95, solo 0.9, long_hair 0.6, ^_^ 0.5, smile 0.4), its rating (general 0.9).
SAFE_TAGS = "hatsune miku, 1girl, solo, long hair, ^_^, smile, general"


def one_colour_png(rgb: tuple[int, int, int]) -> bytes:
    from PIL import Image

    return encode(Image.new("RGB", (64, 64), rgb))


def caption(engine, images: list[bytes], progress=lambda fraction, stage: None, **fields) -> list[str]:
    return engine.caption(CaptionRequest.parse({"images": images, **fields}), progress)


def models_dir(tmp_path, tagger=None, qwen=None):
    """A models folder holding the given stand-ins where the engine looks for them."""
    folder = tmp_path / "models"
    folder.mkdir()
    for name, source in ((TAGGER_DIR, tagger), (CAPTION_MODEL, qwen)):
        if source is not None:
            (folder / name).symlink_to(source, target_is_directory=True)
    return folder


@pytest.fixture
def tagger_only(tmp_path, tiny_tagger_dirs):
    """An engine with the stand-in tagger and no VLM at all."""
    engine = CaptionEngine(Layout(models_dir(tmp_path, tagger=tiny_tagger_dirs["safe"])))
    engine.load()
    return engine


def test_tags_are_the_taggers_in_score_order_with_the_rating(tagger_only):
    blue, red = one_colour_png((0, 0, 255)), one_colour_png((255, 0, 0))
    stages = []
    captions = caption(tagger_only, [blue, red], progress=lambda fraction, stage: stages.append(stage), style="tags")
    assert captions[0] == SAFE_TAGS
    # The stand-in's red_theme follows the red channel: the image reached the model, and its likeliest
    # general tag (0.998) comes first after the character.
    assert captions[1] == "hatsune miku, red theme, " + SAFE_TAGS.removeprefix("hatsune miku, ")
    assert stages == ["tagging"] and not tagger_only.vlm_ready


def test_a_drawn_minor_in_a_sexual_context_is_not_captioned(tmp_path, tiny_tagger_dirs):
    engine = CaptionEngine(Layout(models_dir(tmp_path, tagger=tiny_tagger_dirs["minor_explicit"])))
    with pytest.raises(ToolboxError) as refused:
        caption(engine, [one_colour_png((0, 0, 255))], style="tags")
    assert refused.value.code is ErrorCode.INVALID_INPUT and "Image 1 reads as a drawing of a minor" in refused.value.message


@pytest.mark.parametrize("verdict, expected", [("minor_general", "1girl, child, general"),
                                               ("adult_explicit", "1girl, mature female, explicit")])
def test_a_minor_rated_general_and_an_adult_rated_explicit_are_written_as_read(tmp_path, tiny_tagger_dirs,
                                                                              verdict, expected):
    engine = CaptionEngine(Layout(models_dir(tmp_path, tagger=tiny_tagger_dirs[verdict])))
    assert caption(engine, [one_colour_png((0, 0, 255))], style="tags") == [expected]


def test_thresholds_order_and_underscores():
    tags = Tags(
        rating="questionable",
        rating_scores={"general": 0.05, "sensitive": 0.2, "questionable": 0.7, "explicit": 0.05},
        general={"long_hair": GENERAL_THRESHOLD, "blue_eyes": 0.3499, "^_^": 0.8, "x_x": 0.36, "1girl": 0.99,
                 "looking_at_viewer": 0.5},
        characters={"hatsune_miku": 0.9, "kagamine_rin": 0.97},
    )
    assert booru_caption(tags) == ("kagamine rin, hatsune miku, 1girl, ^_^, looking at viewer, x_x, long hair, "
                                   "questionable")


def test_no_vlm_call_for_tags(tmp_path, tiny_tagger_dirs, tiny_qwen_dir):
    engine = CaptionEngine(Layout(models_dir(tmp_path, tagger=tiny_tagger_dirs["safe"], qwen=tiny_qwen_dir)))
    engine.load()
    assert engine.loaded and engine.vlm_ready

    def no_generation(**inputs):
        raise AssertionError("the VLM ran for a tags caption")

    engine.model.generate = no_generation
    assert caption(engine, [one_colour_png((0, 0, 255))], style="tags") == [SAFE_TAGS]
    with pytest.raises(AssertionError, match="the VLM ran"):  # every other style still goes to the VLM
        caption(engine, [one_colour_png((0, 0, 255))], style="prompt")


def test_missing_tagger_fails_tags_only(tmp_path, tiny_qwen_dir):
    engine = CaptionEngine(Layout(models_dir(tmp_path, qwen=tiny_qwen_dir)))
    engine.load()
    with pytest.raises(ToolboxError) as caught:
        caption(engine, [png_bytes()], style="tags")
    assert caught.value.code is ErrorCode.MODELS_MISSING and remedies.download("wd-tagger") in caught.value.message
    [description] = caption(engine, [png_bytes()], style="descriptive")
    assert description
    # A question with the tags style is the VLM's: it needs no tagger.
    assert caption(engine, [png_bytes()], style="tags", question="What is it?")[0]


def test_missing_vlm_fails_the_vlm_styles_only(tagger_only):
    with pytest.raises(ToolboxError) as caught:
        caption(tagger_only, [png_bytes()], style="descriptive")
    assert caught.value.code is ErrorCode.MODELS_MISSING and "qwen3-vl-2b" in caught.value.message
    assert caption(tagger_only, [one_colour_png((0, 0, 255))], style="tags") == [SAFE_TAGS]


def test_a_tagger_installed_later_is_picked_up(tmp_path, tiny_tagger_dirs):
    folder = models_dir(tmp_path)
    engine = CaptionEngine(Layout(folder))
    engine.load()
    assert not engine.loaded
    (folder / TAGGER_DIR).symlink_to(tiny_tagger_dirs["safe"], target_is_directory=True)  # /setup downloads it
    engine.load()  # what the worker does before the next job, while the engine is not fully loaded
    assert engine.tagger.loaded
    assert caption(engine, [one_colour_png((0, 0, 255))], style="tags") == [SAFE_TAGS]


def test_bad_images_are_named(tagger_only):
    with pytest.raises(ToolboxError) as caught:
        caption(tagger_only, [png_bytes(), b"not an image"], style="tags")
    assert caught.value.code is ErrorCode.INVALID_INPUT and "Image 2" in caught.value.message


def test_a_caption_needs_only_its_own_model():
    def needed(**fields):
        return models_for(caption_purpose(CaptionRequest.parse({"images": [b"x"], **fields})))

    assert needed(style="tags") == ["wd-tagger"]
    assert needed(style="descriptive") == needed(style="prompt") == ["qwen3-vl-2b"]
    assert needed(style="tags", question="What is it?") == ["qwen3-vl-2b"]
