"""The caption engine on a tiny random Qwen3-VL, loaded from a folder in the volume layout."""

from __future__ import annotations

import pytest

from modal_services.engines.caption import CaptionEngine, tidy_caption
from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.layout import Layout
from modal_services.jobs.requests import CaptionRequest
from tests.images import png_bytes


def caption(engine, images: list[bytes], progress=lambda fraction, stage: None, **fields) -> list[str]:
    """One caption job on `engine`, its request parsed from `images` and `fields` as the worker parses a payload."""
    return engine.caption(CaptionRequest.parse({"images": images, **fields}), progress)


@pytest.fixture(scope="module")
def engine(tiny_qwen_dir):
    engine = CaptionEngine(Layout(tiny_qwen_dir.parent))
    engine.load()
    return engine


@pytest.mark.slow
def test_loads_from_the_volume_layout(engine):
    assert engine.vlm_ready and engine.device == "cpu"
    assert engine.processor.video_processor is None
    assert not engine.loaded  # no tagger beside it: each job looks for it again


@pytest.mark.slow
@pytest.mark.parametrize("style", ["descriptive", "short", "prompt"])
def test_each_vlm_style_gives_one_caption_per_image(engine, style):
    captions = caption(engine, [png_bytes(seed=1), png_bytes(80, 120, seed=2)], style=style)
    assert len(captions) == 2
    assert all(isinstance(text, str) and text for text in captions)


@pytest.mark.slow
def test_greedy_decoding_is_deterministic(engine):
    image = png_bytes(seed=3)
    assert caption(engine, [image], style="prompt") == caption(engine, [image], style="prompt")


@pytest.mark.slow
def test_batched_captions_match_one_at_a_time(engine):
    images = [png_bytes(seed=s) for s in (4, 5, 6)]
    batched = caption(engine, images, style="short")
    single = [caption(engine, [image], style="short")[0] for image in images]
    assert batched == single


@pytest.mark.slow
def test_question_replaces_the_style_prompt(engine):
    image = png_bytes(seed=7)
    # Even with the `tags` style a question goes to the VLM: no tagger is installed here.
    answer = caption(engine, [image], style="tags", question="What colour is the sky?")
    assert answer == caption(engine, [image], style="descriptive", question="What colour is the sky?")
    assert answer != caption(engine, [image], style="descriptive")


def test_progress_is_reported_per_token(engine):
    seen = []
    caption(engine, [png_bytes(seed=8)], style="short", progress=lambda fraction, stage: seen.append((fraction, stage)))
    assert seen[0] == (0.0, "captioning")
    fractions = [fraction for fraction, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] < 1.0
    assert any("token" in stage for _, stage in seen)


def test_bad_inputs(engine):
    with pytest.raises(ToolboxError) as caught:
        caption(engine, [png_bytes(), b"not an image"])
    assert caught.value.code is ErrorCode.INVALID_INPUT and "Image 2" in caught.value.message
    with pytest.raises(ToolboxError):
        caption(engine, [])
    with pytest.raises(ToolboxError):
        caption(engine, [png_bytes()], style="poem")


def test_missing_model_points_at_setup(tmp_path):
    engine = CaptionEngine(Layout(tmp_path / "models"))
    engine.load()  # nothing installed: each style says what it misses when asked
    with pytest.raises(ToolboxError) as caught:
        caption(engine, [png_bytes()], style="descriptive")
    assert caught.value.code is ErrorCode.MODELS_MISSING
    assert remedies.download("qwen3-vl-2b") in caught.value.message
    # The files are named inside the model's folder: the message never shows where the data dir is.
    assert "missing in qwen3-vl-2b/: config.json" in caught.value.message and str(tmp_path) not in caught.value.message
    assert not engine.loaded and not engine.vlm_ready


def test_partial_snapshot_is_missing_not_a_crash(tiny_qwen_dir, tmp_path):
    partial = tmp_path / "qwen3-vl-2b"
    partial.mkdir()
    for name in ("config.json", "tokenizer_config.json"):
        (partial / name).write_bytes((tiny_qwen_dir / name).read_bytes())
    with pytest.raises(ToolboxError) as caught:
        caption(CaptionEngine(Layout(partial.parent)), [png_bytes()], style="short")
    assert caught.value.code is ErrorCode.MODELS_MISSING
    assert "preprocessor_config.json" in caught.value.message and "safetensors" in caught.value.message


def test_corrupt_weights_fail_to_load_clearly(tiny_qwen_dir, tmp_path):
    broken = tmp_path / "qwen3-vl-2b"
    broken.mkdir()
    for source in tiny_qwen_dir.iterdir():
        (broken / source.name).write_bytes(source.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ToolboxError) as caught:
        CaptionEngine(Layout(broken.parent)).load()
    assert caught.value.code is ErrorCode.MODEL_LOAD_FAILED


def test_tidy_caption():
    assert tidy_caption(" 1girl, Solo,\nsolo, smile. ,", "prompt") == "1girl, solo, smile"
    assert tidy_caption("A  cat\n on a\x07 mat. ", "short") == "A cat on a mat."


@pytest.mark.slow
def test_two_step_loading_for_memory_snapshots(tiny_qwen_dir, engine):
    staged = CaptionEngine(Layout(tiny_qwen_dir.parent))
    staged.load_weights()  # what a snapshot captures: CPU memory only
    assert not staged.vlm_ready and staged.model is not None
    staged.move_to("cpu")  # after restore: onto the GPU (the CPU here)
    assert staged.vlm_ready
    image = png_bytes(seed=9)
    assert caption(staged, [image], style="short") == caption(engine, [image], style="short")
