"""FLUX.1-dev text-to-image and variations on the tiny Flux (CPU), through the production FluxEngine."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.engines.flux import FluxEngine, choose_precision, flux_preview_jpeg
from modal_services.layout import FLUX_DIR, Layout
from modal_services.jobs.requests import FluxGenerateRequest
from tests.fixtures.tiny_flux import build_tiny_flux_volume
from tests.fixtures.tiny_sdxl_checkpoint import build_tiny_volume
from tests.engines.test_generate_engine import lora, pixels
from tests.images import png_bytes

# The smallest request Flux's request allows: 512², 20 steps; the longest timeout (CI machines are slow).
REQUEST = dict(prompt="a cat", width=512, height=512, steps=20, seed=5, timeout=300)


def generate(engine, progress=lambda fraction, stage: None, preview=None, **fields) -> dict:
    """One Flux job on `engine`, its request parsed from `fields` as the worker parses a payload."""
    return engine.generate(FluxGenerateRequest.parse(fields), progress, preview)


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    return build_tiny_flux_volume(tmp_path_factory.mktemp("flux-volume"))


def new_engine(volume) -> FluxEngine:
    engine = FluxEngine(Layout(volume.models_dir, volume.loras_dir), preview_interval=0.0)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def engine(volume):
    return new_engine(volume)


@pytest.fixture(scope="module")
def base(volume) -> dict:
    """REQUEST on a fresh engine of its own, with its progress and previews."""
    reports, previews = [], []
    result = generate(new_engine(volume), **REQUEST, progress=lambda f, s: reports.append((f, s)), preview=previews.append)
    return {**result, "reports": reports, "previews": previews}


def no_adapters_left(engine) -> bool:
    pipe = engine.pipe
    return not pipe.get_list_adapters() and not any(
        "lora" in type(module).__module__ for model in (pipe.transformer, pipe.text_encoder) for module in model.modules()
    )


# ---------------------------------------------------------------- the result


def test_result_is_pngs_with_the_settings_that_made_them(base):
    (png,) = base["images"]
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size == (512, 512)
    assert base["seeds"] == [5] and base["steps"] == 20 and base["cfg"] == 3.5  # Flux's default guidance
    assert base["prompt"] == "a cat" and base["negative_prompt"] == "" and base["loras"] == []
    assert base["checkpoint"] == "flux1-dev" and base["strength"] is None and base["generation_time_seconds"] > 0


def test_progress_every_step_and_a_preview_per_step(base):
    stages = [stage for _, stage in base["reports"]]
    assert [s for s in stages if s.startswith("step")] == [f"step {n}/20" for n in range(1, 21)]
    fractions = [fraction for fraction, _ in base["reports"]]
    assert fractions == sorted(fractions) and fractions[-1] < 1
    assert len(base["previews"]) == 20
    preview = Image.open(io.BytesIO(base["previews"][-1]))
    assert preview.format == "JPEG" and max(preview.size) <= 256


def test_the_same_seed_gives_the_same_image_and_another_seed_another(engine, base):
    again = generate(engine, **REQUEST)
    assert again["images"] == base["images"]
    other = generate(engine, **{**REQUEST, "seed": 6})
    assert np.abs(pixels(other["images"][0]) - pixels(base["images"][0])).mean() > 1


@pytest.mark.slow
def test_four_in_one_batch_are_the_four_made_one_by_one(engine):
    batched = generate(engine, **{**REQUEST, "count": 4, "seed": 10})
    assert batched["seeds"] == [10, 11, 12, 13] and len(batched["images"]) == 4
    for seed, png in zip(batched["seeds"], batched["images"]):
        (alone,) = generate(engine, **{**REQUEST, "seed": seed})["images"]
        # Batched matrix products may round differently in the last bit.
        assert np.abs(pixels(png) - pixels(alone)).max() <= 2


def test_a_variation_starts_from_the_image(engine, base):
    start = png_bytes(300, 200, seed=3)
    result = generate(engine, **{**REQUEST, "image": start, "strength": 0.5})
    assert Image.open(io.BytesIO(result["images"][0])).size == (512, 512) and result["strength"] == 0.5
    assert np.abs(pixels(result["images"][0]) - pixels(base["images"][0])).mean() > 1


def test_the_preview_of_packed_latents_is_a_grid_of_the_images():
    import torch

    packed = torch.randn(4, 32 * 32, 4)  # four 512² images of a 1-channel VAE, packed 2x2
    preview = Image.open(io.BytesIO(flux_preview_jpeg(packed, 512, 512, 8)))
    assert preview.size == (128, 128)  # 2x2 grid of 64² latents
    flux1 = Image.open(io.BytesIO(flux_preview_jpeg(torch.randn(1, 64 * 64, 64), 1024, 1024, 8)))
    assert flux1.size == (128, 128)  # FLUX.1's 16 channels through their RGB map


# ---------------------------------------------------------------- LoRAs


@pytest.mark.parametrize("name", ["flux-diffusers", "flux-kohya", "flux-xlabs"])
def test_each_lora_layout_loads_changes_the_image_and_leaves_nothing_behind(engine, base, volume, name):
    result = generate(engine, **REQUEST, loras=[lora(volume, name, triggers=["glowing"])])
    assert result["loras"] == [{"name": name, "weight": 1.0}] and result["prompt"] == "glowing, a cat"
    assert np.abs(pixels(result["images"][0]) - pixels(base["images"][0])).mean() > 0.5
    assert no_adapters_left(engine)


def test_no_contamination_the_same_request_without_loras_is_a_fresh_engines(engine, base, volume):
    generate(engine, **REQUEST, loras=[lora(volume, "flux-kohya"), lora(volume, "flux-diffusers", weight=0.5)])
    assert no_adapters_left(engine)
    assert generate(engine, **REQUEST)["images"] == base["images"]


def test_an_sdxl_lora_is_refused_by_flux_and_leaves_nothing_loaded(engine, tmp_path):
    sdxl = build_tiny_volume(tmp_path)
    path = next(iter(sdxl.loras.values()))
    with pytest.raises(ToolboxError) as caught:
        generate(engine, **REQUEST, loras=[{"name": "sdxl-style", "path": str(path), "weight": 1.0}])
    assert caught.value.code is ErrorCode.LORA_LOAD_FAILED and "sdxl-style" in caught.value.message
    assert no_adapters_left(engine)


def test_a_lora_whose_file_is_gone_is_named(engine, volume, tmp_path):
    with pytest.raises(ToolboxError) as caught:
        generate(engine, **REQUEST, loras=[{"name": "gone", "path": str(tmp_path / "gone.safetensors"), "weight": 1.0}])
    assert caught.value.code is ErrorCode.LORA_LOAD_FAILED and "gone.safetensors" in caught.value.message


def test_loras_are_refused_on_a_quantised_transformer_before_any_work(volume):
    engine = FluxEngine(Layout(volume.models_dir, volume.loras_dir), device="cuda", precision="nf4")
    engine.precision = "nf4"  # as the Modal class sets it from the GPU's name
    with pytest.raises(ToolboxError) as caught:
        generate(engine, **REQUEST, loras=[lora(volume, "flux-kohya")])
    assert caught.value.code is ErrorCode.LORA_LOAD_FAILED
    assert "quantised to nf4" in caught.value.message and "TOOLBOX_FLUX_PRECISION=bf16" in caught.value.message


# ---------------------------------------------------------------- stops and refusals


def test_the_timeout_stops_between_steps(engine):
    with pytest.raises(ToolboxError) as caught:
        generate(engine, **{**REQUEST, "timeout": 0.001})
    assert caught.value.code is ErrorCode.TIMEOUT


def test_cancel_from_the_progress_callback_stops_the_job(engine):
    def progress(fraction, stage):
        if stage == "step 3/20":
            raise ToolboxError(ErrorCode.CANCELLED, "cancelled")

    with pytest.raises(ToolboxError) as caught:
        generate(engine, **REQUEST, progress=progress)
    assert caught.value.code is ErrorCode.CANCELLED


@pytest.mark.parametrize("change, code, words", [
    ({"negative_prompt": "ugly"}, ErrorCode.INVALID_INPUT, "Flux has no negative prompt"),
    ({"width": 2048, "height": 2048}, ErrorCode.INVALID_INPUT, "megapixels"),
    ({"guidance": 12}, ErrorCode.INVALID_INPUT, "guidance must be between 1 and 10"),
    ({"prompt": ""}, ErrorCode.INVALID_PROMPT, "prompt cannot be empty"),
    ({"image": b"not an image"}, ErrorCode.INVALID_INPUT, "start image"),
])
def test_bad_requests_are_refused_before_any_model_work(engine, change, code, words):
    with pytest.raises(ToolboxError) as caught:
        generate(engine, **{**REQUEST, **change})
    assert caught.value.code is code and words in caught.value.message


def test_missing_files_are_models_missing_with_the_way_to_get_them(tmp_path):
    (tmp_path / "models" / FLUX_DIR).mkdir(parents=True)
    engine = FluxEngine(Layout(tmp_path / "models"), device="cpu")
    with pytest.raises(ToolboxError) as caught:
        engine.load()
    assert caught.value.code is ErrorCode.MODELS_MISSING and remedies.enable("flux1-dev") in caught.value.message
    assert "transformer/*.safetensors" in caught.value.message and not engine.loaded


# ---------------------------------------------------------------- precision


@pytest.mark.parametrize("setting, memory, capability, chosen", [
    ("auto", 80, (9, 0), "bf16"),  # H100
    ("auto", 48, (8, 9), "bf16"),  # L40S
    ("auto", 24, (8, 9), "fp8"),  # L4
    ("auto", 24, (8, 6), "nf4"),  # A10G
    ("auto", 16, (7, 5), "nf4"),  # T4
    ("fp8", 80, (9, 0), "fp8"),  # a setting is obeyed
    ("BF16", 24, (8, 6), "bf16"),
])
def test_precision_by_gpu(setting, memory, capability, chosen):
    assert choose_precision(setting, True, memory, capability) == chosen


def test_precision_on_a_cpu_and_bad_settings():
    assert choose_precision("auto", False) == "fp32" and choose_precision("bf16", False) == "bf16"
    with pytest.raises(ToolboxError) as caught:
        choose_precision("nf4", False)
    assert caught.value.code is ErrorCode.MODEL_LOAD_FAILED and "CUDA GPU" in caught.value.message
    with pytest.raises(ToolboxError) as caught:
        choose_precision("int3", True, 80, (9, 0))
    assert caught.value.code is ErrorCode.INVALID_INPUT and "auto, bf16, fp8, nf4" in caught.value.message


@pytest.mark.slow
def test_bf16_on_a_cpu_loads_and_generates(volume):
    import torch

    engine = FluxEngine(Layout(volume.models_dir, volume.loras_dir), device="cpu", precision="bf16")
    engine.load()
    assert engine.precision == "bf16" and engine.pipe.transformer.dtype == torch.bfloat16
    (png,) = generate(engine, **REQUEST)["images"]
    assert Image.open(io.BytesIO(png)).size == (512, 512)


def test_staged_weights_wait_in_host_memory_until_placed(volume):
    engine = FluxEngine(Layout(volume.models_dir, volume.loras_dir), device="cuda", precision="bf16")
    engine.precision = "bf16"
    assert engine.can_stage
    engine.load(staging_device="cpu")
    assert engine.placement == "cpu" and next(engine.pipe.transformer.parameters()).device.type == "cpu"
    engine.precision = "nf4"
    assert not engine.can_stage  # a quantised transformer loads onto the GPU directly
