"""The upscale engine on a tiny single-file SDXL checkpoint, tiny ControlNet, VAE, image encoder and IP-Adapter (CPU)."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.imaging import encode_png
from modal_services.layout import IP_ADAPTER_FILE, SDXL_CONFIG_DIR, Layout
from modal_services.safety.nsfw_classifier import NsfwClassifier
from modal_services.safety.tagger import Tagger
from modal_services.services import SERVICES, build_engine, run_on_engine
from modal_services.engines.sdxl.engine import SdxlEngine
from modal_services.jobs.requests import RegionPrompt, UpscaleRequest
from tests.fixtures.tiny_sdxl_checkpoint import build_tiny_volume

# Small tiles so that a 160x192 output has 2x2 denoising tiles and several VAE tiles.
ENGINE_OPTIONS = dict(max_tile=128, min_overlap=32, vae_tile=96, vae_overlap=32, upscale_preview_interval=0.0)
JOB = dict(scale=2.0, prompt="a cat", steps=4, creativity=0.5, seed=7)


def upscale(engine, image: bytes, progress=lambda fraction, stage: None, preview=None, **fields) -> bytes:
    """One upscale job on `engine`, its request parsed from `image` and `fields` as the worker parses a payload."""
    return engine.upscale(UpscaleRequest.parse({"image": image, **fields}), progress, preview)


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    return build_tiny_volume(tmp_path_factory.mktemp("volume"))


@pytest.fixture(scope="module")
def engine(volume):
    engine = SdxlEngine(Layout(volume.models_dir, volume.loras_dir), **ENGINE_OPTIONS)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def picture() -> bytes:
    rng = np.random.default_rng(0)
    # A smooth gradient with some noise: something a VAE can roughly reproduce.
    y, x = np.mgrid[0:96, 0:80]
    base = np.stack([x * 3, y * 2, (x + y) * 1.5], axis=-1)
    return encode_png(Image.fromarray(np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)))


@pytest.fixture(scope="module")
def base_output(engine, picture) -> bytes:
    return upscale(engine, picture, **JOB)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def lora(volume, name, weight=1.0, triggers=()):
    return {"name": name, "path": str(volume.loras[name]), "weight": weight, "trigger_words": list(triggers)}


# ---------------------------------------------------------------- the checkpoint fixture itself


def test_single_file_checkpoint_loads_offline_with_the_local_configs(volume):
    import torch
    from diffusers import StableDiffusionXLPipeline

    from tests.fixtures.tiny_sdxl import tiny_sdxl_components

    pipe = StableDiffusionXLPipeline.from_single_file(
        str(volume.checkpoint), config=str(volume.models_dir / SDXL_CONFIG_DIR), local_files_only=True
    )
    reference = tiny_sdxl_components(0)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        expected, loaded = reference[name].state_dict(), getattr(pipe, name).state_dict()
        assert expected.keys() == loaded.keys()
        assert all(torch.equal(expected[key], loaded[key]) for key in expected), name


def test_vae_conversion_round_trips():
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from tests.fixtures.tiny_sdxl_checkpoint import tiny_vae, vae_to_original

    vae = tiny_vae()
    original = vae_to_original(vae.state_dict(), vae.config)
    assert all(key.startswith("first_stage_model.") for key in original)
    back = convert_ldm_vae_checkpoint(original, vae.config)
    assert back.keys() == vae.state_dict().keys()
    assert all(torch.equal(back[key], value) for key, value in vae.state_dict().items())


# ---------------------------------------------------------------- output


def test_output_is_a_png_of_the_scaled_size(engine, picture, base_output):
    assert base_output.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(base_output)).size == (160, 192)
    odd = upscale(engine, picture, **{**JOB, "scale": 1.5})
    assert Image.open(io.BytesIO(odd)).size == (120, 144)


@pytest.mark.slow
def test_same_seed_same_output_other_seed_other_output(engine, picture, base_output):
    assert upscale(engine, picture, **JOB) == base_output
    assert upscale(engine, picture, **{**JOB, "seed": 8}) != base_output


def test_batched_tiles_match_one_tile_per_call(volume, engine, picture, base_output):
    single = SdxlEngine(Layout(volume.models_dir), **{**ENGINE_OPTIONS, "tile_batch": 1})
    single.load()
    difference = np.abs(pixels(upscale(single, picture, **JOB)) - pixels(base_output))
    assert difference.max() <= 2  # the same maths; batched convolutions may round differently


def test_output_stays_close_to_the_input(engine, picture, base_output):
    # Creativity 0.5 on random weights still starts from the input's latents:
    # the result is nearer the resized input than an unrelated image is.
    resized = np.asarray(Image.open(io.BytesIO(picture)).resize((160, 192), Image.Resampling.LANCZOS), dtype=np.int16)
    unrelated = np.full_like(resized, 128)
    out = pixels(base_output)
    assert np.abs(out - resized).mean() < np.abs(unrelated - resized).mean() + np.abs(out - unrelated).mean()


def test_region_prompts_reach_the_tiles_under_them(engine, picture, base_output):
    from modal_services.engines.sdxl.tiling import plan_tiles
    from modal_services.engines.sdxl.upscale import check_regions, region_prompt

    # 80x96 input, 160x192 output in 2x2 tiles: the left half's region covers the left tiles' centres.
    regions = check_regions([RegionPrompt(box=[0, 0, 40, 96], prompt="sky"), RegionPrompt(box=[40, 0, 80, 96], prompt="grass")],
                            80, 96)
    tiles = plan_tiles(160, 192, max_tile=128, min_overlap=32).tiles
    assert [region_prompt(regions, tile, 2.0) for tile in tiles] == ["sky", "grass", "sky", "grass"]
    left_only = upscale(engine, picture, **JOB, region_prompts=[{"box": [0, 0, 40, 96], "prompt": "sky"}])
    both = upscale(engine, picture, **JOB, region_prompts=[{"box": [0, 0, 40, 96], "prompt": "sky"},
                                                          {"box": [40, 0, 80, 96], "prompt": "grass"}])
    assert len({left_only, both, base_output}) == 3
    # The tiles under the region change most; the others only through the overlaps they share (every step).
    change = np.abs(pixels(left_only) - pixels(base_output))
    assert change[:, :20].mean() > 3 * change[:, -20:].mean()
    for bad in ([{"box": [0, 0, 100, 10], "prompt": "x"}], [{"box": [0, 0], "prompt": "x"}], [{"prompt": "x"}]):
        with pytest.raises(ToolboxError) as error:
            upscale(engine, picture, **JOB, region_prompts=bad)
        assert error.value.code is ErrorCode.INVALID_INPUT


def test_ip_adapter_scale_changes_the_output(engine, picture, base_output):
    assert upscale(engine, picture, **JOB, ip_adapter_scale=1.0) != base_output
    assert upscale(engine, picture, **JOB, ip_adapter_scale=0.0) == base_output


# ---------------------------------------------------------------- LoRAs


@pytest.mark.slow
def test_lora_changes_the_output_and_leaves_no_trace(volume, engine, picture, base_output):
    with_lora = upscale(engine, picture, **JOB, loras=[lora(volume, "detail")])
    assert np.abs(pixels(with_lora) - pixels(base_output)).max() > 0
    # Same seed, no LoRA, after a LoRA job: exactly the output of a fresh pipeline.
    assert upscale(engine, picture, **JOB) == base_output
    fresh = SdxlEngine(Layout(volume.models_dir), **ENGINE_OPTIONS)
    fresh.load()
    assert upscale(fresh, picture, **JOB) == base_output


@pytest.mark.slow
def test_lora_weights_and_two_loras(volume, engine, picture, base_output):
    half = upscale(engine, picture, **JOB, loras=[lora(volume, "detail", 0.5)])
    full = upscale(engine, picture, **JOB, loras=[lora(volume, "detail", 1.0)])
    both = upscale(engine, picture, **JOB, loras=[lora(volume, "detail", 1.0), lora(volume, "style", 0.8)])
    assert len({half, full, both, base_output}) == 4
    # Loading the same LoRA again (every job unloads its own) gives the same result.
    assert upscale(engine, picture, **JOB, loras=[lora(volume, "detail", 0.5)]) == half
    assert upscale(engine, picture, **JOB) == base_output


@pytest.mark.slow
def test_library_files_are_found_on_the_lora_volume(volume, engine, picture, base_output):
    by_path = upscale(engine, picture, **JOB, loras=[lora(volume, "detail")])
    by_file = upscale(engine, picture, **JOB, loras=[{"name": "detail", "file": "detail.safetensors", "weight": None}])
    assert by_file == by_path
    by_file_name = upscale(engine, picture, **JOB, checkpoint=volume.other_checkpoint.name)
    assert by_file_name == upscale(engine, picture, **JOB, checkpoint=str(volume.other_checkpoint))
    assert upscale(engine, picture, **JOB, checkpoint="illustrious-xl") == base_output
    for bad in ({"loras": [{"name": "x", "file": "../../models/secret.safetensors"}]}, {"checkpoint": "../x.safetensors"}):
        with pytest.raises(ToolboxError) as error:
            upscale(engine, picture, **JOB, **bad)
        assert error.value.code is ErrorCode.INVALID_INPUT


@pytest.mark.slow
def test_trigger_words_reach_the_prompt(volume, engine, picture):
    plain = upscale(engine, picture, **{**JOB, "prompt": "a cat"}, loras=[lora(volume, "detail")])
    triggered = upscale(engine, picture, **{**JOB, "prompt": "a cat"}, loras=[lora(volume, "detail", triggers=["shiny"])])
    already = upscale(engine, picture, **{**JOB, "prompt": "shiny, a cat"}, loras=[lora(volume, "detail", triggers=["shiny"])])
    assert triggered != plain
    assert already == triggered


@pytest.mark.slow
@pytest.mark.parametrize("name", ["wrong-shape", "not-a-lora", "missing"])
def test_a_lora_that_fails_is_named_and_leaves_no_trace(volume, engine, picture, base_output, name):
    entry = lora(volume, "detail") if name == "missing" else lora(volume, name)
    if name == "missing":
        entry = {**entry, "name": "missing", "path": str(volume.loras_dir / "nope.safetensors")}
    with pytest.raises(ToolboxError) as error:
        upscale(engine, picture, **JOB, loras=[entry])
    assert error.value.code is ErrorCode.LORA_LOAD_FAILED
    assert repr(name) in error.value.message
    assert upscale(engine, picture, **JOB) == base_output


# ---------------------------------------------------------------- checkpoints


@pytest.mark.slow
def test_checkpoint_switch_reloads_only_the_unet_and_text_encoders(volume, engine, picture, base_output):
    controlnet, vae, unet = engine.models.pipe.controlnet, engine.models.pipe.vae, engine.models.pipe.unet
    stages = []
    other = upscale(engine, picture, **JOB, checkpoint=str(volume.other_checkpoint), progress=lambda f, s: stages.append(s))
    assert any(stage.startswith("switching checkpoint") for stage in stages)
    assert other != base_output
    assert engine.models.pipe.controlnet is controlnet and engine.models.pipe.vae is vae and engine.models.pipe.unet is not unet
    # LoRAs load onto the new UNet, and switching back restores the first checkpoint's output exactly.
    assert upscale(engine, picture, **JOB, checkpoint=str(volume.other_checkpoint), loras=[lora(volume, "detail")]) != other
    assert upscale(engine, picture, **JOB) == base_output


def test_missing_checkpoint_file(volume, engine, picture):
    with pytest.raises(ToolboxError) as error:
        upscale(engine, picture, **JOB, checkpoint=str(volume.loras_dir / "checkpoints" / "gone.safetensors"))
    assert error.value.code is ErrorCode.MODELS_MISSING and "gone.safetensors" in error.value.message


# ---------------------------------------------------------------- limits and errors


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"scale": 4.5}, "Scale"),
        ({"scale": 4.0}, "limit is"),  # 320x384 > the test's 300x300 output limit
        ({"creativity": 0.0}, "Creativity"),
        ({"steps": 0}, "Steps"),
        ({"seed": None}, "seed"),
        ({"seed": -1}, "seed"),
        ({"ip_adapter_scale": 3.0}, "IP-Adapter"),
        ({"prompt": "x" * 2000}, "characters"),
        ({"loras": [{"name": "a", "path": "/x", "weight": 5}]}, "weight"),
        ({"loras": [{"name": f"l{i}", "path": "/x"} for i in range(6)]}, "At most"),
        ({"loras": [{"name": "a", "path": "/x"}, {"name": "a", "path": "/y"}]}, "twice"),
        ({"loras": [{"path": "/x"}]}, "needs a name"),
    ],
)
def test_bad_requests_fail_before_any_model_work(volume, picture, changes, words):
    # Never loaded: reaching any model code would fail differently.
    engine = SdxlEngine(Layout(volume.models_dir), max_output_pixels=300 * 300)
    with pytest.raises(ToolboxError) as error:
        upscale(engine, picture, **{**JOB, **changes})
    assert error.value.code is ErrorCode.INVALID_INPUT
    assert words in error.value.message
    assert engine.models.pipe is None


def test_input_limits(volume):
    engine = SdxlEngine(Layout(volume.models_dir), max_input_pixels=50 * 50)
    big = encode_png(Image.new("RGB", (60, 60)))
    with pytest.raises(ToolboxError) as error:
        upscale(engine, big, scale=2.0)
    assert error.value.code is ErrorCode.INVALID_INPUT
    with pytest.raises(ToolboxError) as error:
        upscale(engine, b"not an image", scale=2.0)
    assert error.value.code is ErrorCode.INVALID_INPUT
    with pytest.raises(ToolboxError) as error:
        upscale(engine, encode_png(Image.new("RGB", (8, 40))), scale=2.0)
    assert "16 px" in error.value.message


def test_models_missing_names_what_is_missing(volume, tmp_path):
    with pytest.raises(ToolboxError) as error:
        SdxlEngine(Layout(tmp_path / "empty")).load()
    assert error.value.code is ErrorCode.MODELS_MISSING
    for key in ("illustrious-xl", "controlnet-tile", "sdxl-vae", "ip-adapter", "clip-vit-h", "sdxl-base"):
        assert key in error.value.message

    partial = tmp_path / "models"
    shutil.copytree(volume.models_dir, partial)
    (partial / IP_ADAPTER_FILE).unlink()
    with pytest.raises(ToolboxError) as error:
        SdxlEngine(Layout(partial)).load()
    assert "ip-adapter" in error.value.message and "controlnet-tile" not in error.value.message


@pytest.mark.slow
def test_out_of_memory_retries_one_tile_at_a_time_then_gives_up(engine, picture, base_output, monkeypatch):
    import torch

    unet = engine.models.pipe.unet
    real_forward = unet.forward
    calls = []

    def forward_failing_on_batches(sample, *args, **kwargs):
        calls.append(sample.shape[0])
        if sample.shape[0] > 2:  # more than one tile (x2 for CFG)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", forward_failing_on_batches)
    stages = []
    retried = upscale(engine, picture, **JOB, progress=lambda f, s: stages.append(s))
    assert any("retrying one tile at a time" in stage for stage in stages)
    assert np.abs(pixels(retried) - pixels(base_output)).max() <= 2

    def forward_always_failing(sample, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(unet, "forward", forward_always_failing)
    with pytest.raises(ToolboxError) as error:
        upscale(engine, picture, **JOB)
    assert error.value.code is ErrorCode.CUDA_OOM


# ---------------------------------------------------------------- progress and previews


@pytest.mark.slow
def test_progress_reports_tiles_steps_and_previews(engine, picture):
    reports, previews = [], []
    upscale(engine, picture, **JOB, progress=lambda f, s: reports.append((f, s)), preview=previews.append)
    stages = [stage for _, stage in reports]
    fractions = [fraction for fraction, _ in reports]
    assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] < 1
    assert "encoding the image" in stages and stages[-1] == "decoding"
    # 4 tiles in one batch, int(4 steps * 0.5) = 2 denoising steps.
    assert "tile 4/4 · step 1/2" in stages and "tile 4/4 · step 2/2" in stages
    assert len(previews) == 2
    for jpeg in previews:
        assert jpeg.startswith(b"\xff\xd8") and len(jpeg) < 20_000
        assert Image.open(io.BytesIO(jpeg)).size == (20, 24)  # the latent's size: 160x192 / 8


@pytest.mark.slow
def test_one_tile_per_call_reports_every_tile(volume, picture):
    engine = SdxlEngine(Layout(volume.models_dir), **{**ENGINE_OPTIONS, "tile_batch": 1})
    engine.load()
    stages = []
    upscale(engine, picture, **JOB, progress=lambda f, s: stages.append(s))
    assert [s for s in stages if s.startswith("tile")] == [
        f"tile {tile}/4 · step {step}/2" for step in (1, 2) for tile in (1, 2, 3, 4)
    ]


def test_the_upscale_job_kind_runs_through_run_on_engine(volume, picture, base_output):
    spec = SERVICES[UpscaleRequest]
    assert spec.modal_class == "SdxlService"
    engine = build_engine(spec.engine, Layout(volume.models_dir, volume.loras_dir))
    assert isinstance(engine, SdxlEngine) and not engine.loaded
    stages = []
    engine.upscaler.max_tile, engine.upscaler.min_overlap = ENGINE_OPTIONS["max_tile"], ENGINE_OPTIONS["min_overlap"]
    result = run_on_engine(engine, spec, {"image": picture, **JOB}, lambda f, s: stages.append(s),
                           classifier=NsfwClassifier(volume.models_dir), tagger=Tagger(volume.models_dir))
    assert stages[:2] == ["loading the safety classifier", "loading model"] and stages[-1] == "safety check"
    assert Image.open(io.BytesIO(result["image"])).size == (160, 192)
    assert result["safety"]["images"][0]["decision"] == "post"
