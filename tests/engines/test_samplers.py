"""Every sampler on the tiny single-file SDXL checkpoint (CPU), through one shared SdxlEngine: each makes an image
of its own, one job's sampler never reaches the next (A, B, A gives A's pixels), seeded SDE noise repeats, and
the PNG names the sampler as A1111 writes it."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from modal_services.engines.sdxl.engine import SdxlEngine
from modal_services.engines.sdxl.samplers import job_scheduler
from modal_services.image_info.reading import read_generation_settings
from modal_services.imaging import encode_png
from modal_services.jobs.requests import GenerateRequest, UpscaleRequest
from modal_services.jobs.samplers import SAMPLER_NAMES, SAMPLERS
from modal_services.layout import Layout
from tests.fixtures.tiny_sdxl_checkpoint import build_tiny_volume

REQUEST = dict(prompt="a cat", width=512, height=512, steps=20, seed=5, timeout=300, cfg=1.0)
# Small tiles so that the upscales below are quick.
ENGINE_OPTIONS = dict(max_tile=128, min_overlap=32, vae_tile=96, vae_overlap=32, upscale_preview_interval=0.0)
# The stochastic samplers: their steps draw noise (generators, or DPM++ SDE's Brownian tree).
STOCHASTIC = ("Euler a", "DPM++ 2M SDE Karras", "DPM++ SDE Karras")


def small(**fields) -> GenerateRequest:
    """A request parsed as the worker parses one, then shrunk below the contract's minimums (128², 6 steps) so
    that every sampler runs in seconds on a CPU; the engine runs it as any other."""
    return GenerateRequest.parse({**REQUEST, **fields}).model_copy(update={"width": 128, "height": 128, "steps": 6})


def generate(engine, **fields) -> dict:
    return engine.generate(small(**fields), lambda fraction, stage: None)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    volume = build_tiny_volume(tmp_path_factory.mktemp("volume"))
    engine = SdxlEngine(Layout(volume.models_dir, volume.loras_dir), generate_preview_interval=0.0, **ENGINE_OPTIONS)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def by_sampler(engine) -> dict[str, dict]:
    """One result per sampler, each from the same seed and prompt."""
    return {name: generate(engine, sampler=name) for name in SAMPLER_NAMES}


def parameters(png: bytes) -> str:
    return Image.open(io.BytesIO(png)).text["parameters"]


@pytest.mark.slow
def test_every_sampler_makes_an_image_of_its_own_and_reports_it(by_sampler):
    for name, result in by_sampler.items():
        (png,) = result["images"]
        assert Image.open(io.BytesIO(png)).size == (128, 128)
        assert result["sampler"] == name
    images = {result["images"][0] for result in by_sampler.values()}
    assert len(images) == len(SAMPLER_NAMES)


@pytest.mark.slow
def test_the_png_names_the_sampler_as_a1111_writes_it_and_reads_back_to_it(by_sampler):
    for name, result in by_sampler.items():
        text = parameters(result["images"][0])
        sampler, schedule = SAMPLERS[name].infotext
        assert f"Sampler: {sampler}," in text
        assert (f"Schedule type: {schedule}," in text) == (schedule is not None)
        assert read_generation_settings(result["images"][0]).sampler in (name, f"{sampler} {schedule}")
    assert "Schedule type: Karras" in parameters(by_sampler["DPM++ 2M Karras"]["images"][0])


@pytest.mark.slow
def test_a_b_a_gives_a_s_pixels_and_the_loaded_scheduler_is_never_changed(engine, by_sampler):
    base = engine.models.pipe.scheduler
    kind, config = type(base), dict(base.config)
    for a, b in (("Euler a", "DPM++ SDE Karras"), ("DPM++ 2M SDE Karras", "DDIM"), ("UniPC", "DPM++ 2M Karras")):
        first, between, again = generate(engine, sampler=a), generate(engine, sampler=b), generate(engine, sampler=a)
        assert first["images"] == again["images"] == by_sampler[a]["images"]
        assert between["images"] == by_sampler[b]["images"]
    assert engine.models.pipe.scheduler is base and type(base) is kind and dict(base.config) == config


@pytest.mark.slow
def test_seeded_stochastic_samplers_repeat_and_change_with_the_seed(engine, by_sampler):
    for name in STOCHASTIC:
        assert generate(engine, sampler=name)["images"] == by_sampler[name]["images"]
        assert generate(engine, sampler=name, seed=6)["images"] != by_sampler[name]["images"]


@pytest.mark.slow
def test_no_sampler_is_the_checkpoint_config_s_euler_as_before(engine, by_sampler):
    unnamed = generate(engine)
    assert unnamed["sampler"] == "Euler" and unnamed["images"] == by_sampler["Euler"]["images"]


@pytest.mark.slow
def test_each_job_s_scheduler_is_new_and_built_from_the_loaded_config(engine):
    base = engine.models.pipe.scheduler
    for name, sampler in SAMPLERS.items():
        first, second = job_scheduler(name, base, [5, 6]), job_scheduler(name, base, [5, 6])
        assert first is not second and first is not base and type(first).__name__ == sampler.scheduler
        assert all(first.config[option] == value for option, value in sampler.options.items())
        # The checkpoint's own settings carry over: its betas and timestep spacing.
        assert first.config["beta_schedule"] == base.config["beta_schedule"] == "scaled_linear"
        assert first.config["timestep_spacing"] == base.config["timestep_spacing"]
    assert job_scheduler("DPM++ SDE Karras", base, [5, 6]).noise_sampler_seed == [5, 6]
    assert not base.config["use_karras_sigmas"]


@pytest.mark.slow
def test_an_upscale_with_a_sampler_repeats_and_says_so(engine):
    picture = encode_png(Image.new("RGB", (80, 96), (120, 80, 200)))
    job = dict(image=picture, scale=2.0, prompt="a cat", steps=4, creativity=0.5, seed=7)

    def upscale(**fields) -> bytes:
        return engine.upscale(UpscaleRequest.parse({**job, **fields}), lambda fraction, stage: None)

    sde = upscale(sampler="DPM++ SDE Karras")
    assert upscale(sampler="Euler a") != sde
    assert upscale(sampler="DPM++ SDE Karras") == sde
    assert "Sampler: DPM++ SDE, Schedule type: Karras," in parameters(sde)
    assert "Sampler: Euler," in parameters(upscale())
