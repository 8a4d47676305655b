"""Text-to-image and variations on the tiny single-file SDXL checkpoint (CPU), through the shared SdxlEngine."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.layout import Layout
from modal_services.engines.sdxl.engine import SdxlEngine
from modal_services.jobs.requests import GenerateRequest
from tests.fixtures.tiny_sdxl_checkpoint import build_tiny_volume, kohya_lora
from tests.servers import running_handler

# The smallest request the contract allows: 512², 20 steps (the longest timeout: CI machines are slow).
REQUEST = dict(prompt="a cat", width=512, height=512, steps=20, seed=5, timeout=300)
# CFG 1 runs the UNet once per step instead of twice: for tests that compare like with like.
QUICK = {**REQUEST, "cfg": 1.0}


def generate(engine, progress=lambda fraction, stage: None, preview=None, **fields) -> dict:
    """One generate job on `engine`, its request parsed from `fields` as the worker parses a payload."""
    return engine.generate(GenerateRequest.parse(fields), progress, preview)


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    return build_tiny_volume(tmp_path_factory.mktemp("volume"))


def new_engine(volume, **options) -> SdxlEngine:
    """A loaded engine on the tiny volume; `options` are SdxlEngine's."""
    engine = SdxlEngine(Layout(volume.models_dir, volume.loras_dir), generate_preview_interval=0.0, **options)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def engine(volume):
    return new_engine(volume)


@pytest.fixture(scope="module")
def base(volume) -> dict:
    """QUICK on a fresh engine of its own, with its progress and previews."""
    reports, previews = [], []
    result = generate(new_engine(volume), **QUICK, progress=lambda f, s: reports.append((f, s)), preview=previews.append)
    return {**result, "reports": reports, "previews": previews}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def lora(volume, name, weight=1.0, triggers=()):
    return {"name": name, "path": str(volume.loras[name]), "weight": weight, "trigger_words": list(triggers)}


def no_adapters_left(engine) -> bool:
    pipe = engine.models.pipe
    modules = [pipe.unet, pipe.text_encoder, pipe.text_encoder_2]
    return not pipe.get_list_adapters() and not any(
        "lora" in type(module).__module__ for model in modules for module in model.modules()
    )


# ---------------------------------------------------------------- the result


def test_result_is_pngs_with_the_settings_that_made_them(base):
    (png,) = base["images"]
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size == (512, 512)
    assert base["seeds"] == [5] and base["steps"] == 20 and base["cfg"] == 1.0
    assert base["prompt"] == "a cat" and base["negative_prompt"] == "" and base["loras"] == []
    assert base["checkpoint"] == "Illustrious-XL-v2.0" and base["strength"] is None
    assert base["width"] == 512 and base["height"] == 512 and base["generation_time_seconds"] > 0


def test_progress_every_step_and_a_preview_per_step(base):
    stages = [stage for _, stage in base["reports"]]
    assert [s for s in stages if s.startswith("step")] == [f"step {n}/20" for n in range(1, 21)]
    fractions = [fraction for fraction, _ in base["reports"]]
    assert fractions == sorted(fractions) and fractions[-1] < 1
    assert len(base["previews"]) == 20
    for jpeg in base["previews"]:
        assert jpeg.startswith(b"\xff\xd8") and Image.open(io.BytesIO(jpeg)).size == (64, 64)  # the latent: 512 / 8


# ---------------------------------------------------------------- batches and OOM


@pytest.mark.slow
def test_count_is_one_batched_call_with_a_seed_per_image_and_oom_retries_one_by_one(engine, monkeypatch):
    import torch

    previews = []
    batched = generate(engine, **QUICK, count=2, preview=previews.append)
    assert batched["seeds"] == [5, 6]
    # Two latents side by side in each preview.
    assert Image.open(io.BytesIO(previews[-1])).size == (128, 64)
    unet = engine.models.pipe.unet
    real_forward = unet.forward
    batch_sizes = []

    def forward_failing_on_batches(sample, *args, **kwargs):
        batch_sizes.append(sample.shape[0])
        if sample.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", forward_failing_on_batches)
    stages = []
    one_by_one = generate(engine, **QUICK, count=2, progress=lambda f, s: stages.append(s))
    assert batch_sizes[0] == 2 and set(batch_sizes[1:]) == {1}
    assert any("retrying one image at a time" in stage for stage in stages)
    assert "step 20/20 · image 2/2" in stages
    assert one_by_one["seeds"] == [5, 6]
    # The same maths: batched convolutions may round differently in the last bit.
    for together, alone in zip(batched["images"], one_by_one["images"]):
        assert np.abs(pixels(together) - pixels(alone)).max() <= 2
    assert np.abs(pixels(batched["images"][0]) - pixels(batched["images"][1])).mean() > 1  # seed 6 is another image

    def forward_always_failing(sample, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(unet, "forward", forward_always_failing)
    for count in (1, 2):
        with pytest.raises(ToolboxError) as error:
            generate(engine, **QUICK, count=count)
        assert error.value.code is ErrorCode.CUDA_OOM and "512×512" in error.value.message

    def forward_breaking(sample, *args, **kwargs):
        raise RuntimeError("an internal detail")

    monkeypatch.setattr(unet, "forward", forward_breaking)
    with pytest.raises(ToolboxError) as error:
        generate(engine, **QUICK)
    assert error.value.code is ErrorCode.GENERATION_FAILED and "internal detail" not in error.value.message


@pytest.mark.slow
def test_count_4_gives_the_images_of_4_requests_one_by_one(engine):
    together = generate(engine, **REQUEST, count=4)
    assert together["seeds"] == [5, 6, 7, 8]
    # The first and the last image stand for all four: each batch slot gets its own seed's noise, in order.
    for index in (0, 3):
        alone = generate(engine, **{**REQUEST, "seed": together["seeds"][index]})["images"][0]
        assert np.abs(pixels(together["images"][index]) - pixels(alone)).max() <= 2


# ---------------------------------------------------------------- LoRAs


@pytest.mark.slow
def test_a_lora_changes_the_image_and_leaves_nothing_behind(volume, engine, base):
    with_lora = generate(engine, **QUICK, loras=[lora(volume, "detail", 0.8, triggers=["shiny"])])
    assert with_lora["prompt"] == "shiny, a cat"
    assert with_lora["loras"] == [{"name": "detail", "weight": 0.8}]
    assert np.abs(pixels(with_lora["images"][0]) - pixels(base["images"][0])).mean() > 1
    assert no_adapters_left(engine)
    # The same request without the LoRA: exactly the fresh engine's image.
    assert generate(engine, **QUICK)["images"] == base["images"]


def test_an_sd15_lora_is_refused_by_name_and_leaves_nothing_behind(volume, engine, tmp_path):
    from safetensors.torch import save_file

    # SD 1.5's layout: one text encoder (`lora_te_`), cross-attention fed by its width alone (32 here, not 80).
    state = {key.replace("lora_te1_", "lora_te_"): value for key, value in kohya_lora("diffusers", seed=3).items()}
    for projection in ("attn2_to_k", "attn2_to_v"):
        key = f"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_{projection}.lora_down.weight"
        state[key] = state[key][:, :32].contiguous()
    path = tmp_path / "sd15-style.safetensors"
    save_file(state, str(path))
    with pytest.raises(ToolboxError) as error:
        generate(engine, **REQUEST, loras=[{"name": "sd15-style", "path": str(path)}])
    assert error.value.code is ErrorCode.LORA_LOAD_FAILED
    assert "'sd15-style'" in error.value.message and "SDXL" in error.value.message
    assert no_adapters_left(engine)


# ---------------------------------------------------------------- variations and checkpoints


@pytest.mark.slow
def test_a_variation_starts_from_the_image(engine, base):
    start = base["images"][0]
    variation = generate(engine, **{**REQUEST, "seed": 9}, image=start, strength=0.3)
    assert variation["strength"] == 0.3 and variation["seeds"] == [9] and variation["cfg"] == 5.5
    out = pixels(variation["images"][0])
    # Low strength keeps most of the start image: nearer to it than the image of another seed is.
    assert np.abs(out - pixels(start)).mean() < np.abs(pixels(generate(engine, **{**QUICK, "seed": 9})["images"][0]) - pixels(start)).mean()
    # At another size the start image is resized; without a seed one is drawn, and reported.
    unseeded = {name: value for name, value in REQUEST.items() if name != "seed"}
    resized = generate(engine, **{**unseeded, "width": 576}, image=start, strength=0.3)
    assert Image.open(io.BytesIO(resized["images"][0])).size == (576, 512)
    (seed,) = resized["seeds"]
    assert isinstance(seed, int) and 0 <= seed < 2**32


@pytest.mark.slow
def test_a_checkpoint_switch_applies_to_generate_and_upscale(volume, engine, base):
    other = generate(engine, **QUICK, checkpoint=volume.other_checkpoint.name)
    assert other["checkpoint"] == "other-sdxl"
    assert np.abs(pixels(other["images"][0]) - pixels(base["images"][0])).mean() > 1
    assert engine.models.checkpoint == volume.other_checkpoint
    text_to_image, img2img = engine.text_to_image._pipelines()
    assert text_to_image.unet is engine.models.pipe.unet is img2img.unet
    assert text_to_image.vae is engine.models.pipe.vae
    assert generate(engine, **QUICK)["images"] == base["images"]


# ---------------------------------------------------------------- stopping


def test_cancel_stops_between_steps(engine):
    stages = []

    def progress(fraction, stage):
        stages.append(stage)
        if stage == "step 3/20":
            raise ToolboxError(ErrorCode.CANCELLED, "Stopped on request.")

    with pytest.raises(ToolboxError) as error:
        generate(engine, **REQUEST, progress=progress)
    assert error.value.code is ErrorCode.CANCELLED
    assert stages[-1] == "step 3/20"


def test_a_request_past_its_timeout_ends_with_timeout(engine):
    def slow_progress(fraction, stage):
        time.sleep(0.1)

    with pytest.raises(ToolboxError) as error:
        generate(engine, **{**REQUEST, "timeout": 0.5}, progress=slow_progress)
    assert error.value.code is ErrorCode.TIMEOUT and "0.5 s" in error.value.message


# ---------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    "changes, code, words",
    [
        ({"prompt": ""}, ErrorCode.INVALID_PROMPT, "prompt cannot be empty"),
        ({"prompt": "   "}, ErrorCode.INVALID_PROMPT, "prompt cannot be empty"),
        ({"prompt": "x" * 1001}, ErrorCode.INVALID_PROMPT, "limited to 1000"),
        ({"negative_prompt": "x" * 1001}, ErrorCode.INVALID_PROMPT, "negative prompt"),
        ({"width": 448}, ErrorCode.INVALID_INPUT, "width must be between 512 and 1536"),
        ({"width": 1600}, ErrorCode.INVALID_INPUT, "width must be between 512 and 1536"),
        ({"height": 1000}, ErrorCode.INVALID_INPUT, "multiple of 64"),
        ({"steps": 19}, ErrorCode.INVALID_INPUT, "Steps must be between 20 and 50"),
        ({"steps": 51}, ErrorCode.INVALID_INPUT, "Steps"),
        ({"steps": 20.5}, ErrorCode.INVALID_INPUT, "whole number"),
        ({"cfg": 0.5}, ErrorCode.INVALID_INPUT, "CFG"),
        ({"cfg": 21}, ErrorCode.INVALID_INPUT, "CFG"),
        ({"count": 5}, ErrorCode.INVALID_INPUT, "image count"),
        ({"seed": -1}, ErrorCode.INVALID_INPUT, "seed"),
        ({"seed": "abc"}, ErrorCode.INVALID_INPUT, "seed"),
        ({"timeout": 301}, ErrorCode.INVALID_INPUT, "timeout"),
        ({"timeout": 0}, ErrorCode.INVALID_INPUT, "timeout"),
        ({"strength": 0.0}, ErrorCode.INVALID_INPUT, "strength"),
        ({"loras": [{"name": f"l{i}", "path": "/x"} for i in range(4)]}, ErrorCode.INVALID_INPUT, "At most 3"),
        ({"loras": [{"name": "a", "path": "/x", "weight": 5}]}, ErrorCode.INVALID_INPUT, "weight"),
        ({"loras": [{"name": "a", "file": "../../models/secret.safetensors"}]}, ErrorCode.INVALID_INPUT, "not a library file"),
        ({"loras": [{"name": "a", "path": "/x"}, {"name": "a", "path": "/y"}]}, ErrorCode.INVALID_INPUT, "twice"),
        ({"checkpoint": "../x.safetensors"}, ErrorCode.INVALID_INPUT, "checkpoint"),
        ({"image": b"not an image"}, ErrorCode.INVALID_INPUT, "start image"),
    ],
)
def test_bad_requests_fail_before_any_model_work(volume, changes, code, words):
    engine = SdxlEngine(Layout(volume.models_dir, volume.loras_dir))  # never loaded
    with pytest.raises(ToolboxError) as error:
        generate(engine, **{**REQUEST, **changes})
    assert error.value.code is code
    assert words in error.value.message
    assert engine.models.pipe is None


def test_a_field_the_request_does_not_have_is_refused():
    from modal_services.jobs.requests import GenerateRequest

    with pytest.raises(ToolboxError) as error:
        GenerateRequest.parse({"prompt": "a cat", "lora_version": "2.0"})
    assert error.value.code is ErrorCode.INVALID_INPUT and "no field 'lora_version'" in error.value.message


def test_a_request_without_a_prompt_is_refused(volume):
    engine = SdxlEngine(Layout(volume.models_dir))
    with pytest.raises(ToolboxError) as error:
        generate(engine, width=512, height=512)
    assert error.value.code is ErrorCode.INVALID_PROMPT and "needs a prompt" in error.value.message


# ---------------------------------------------------------------- a request's own LoRA (lora_url)


@pytest.fixture
def lora_server(volume, monkeypatch):
    """A loopback server with the detail LoRA at /lora.safetensors and an expired presigned link."""
    from http.server import BaseHTTPRequestHandler

    body = volume.loras["detail"].read_bytes()
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path.startswith("/lora.safetensors"):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_response(403)
                self.send_header("Content-Length", "0")
                self.end_headers()

        def log_message(self, *args):
            pass

    with running_handler(Handler) as url:
        monkeypatch.setenv("TOOLBOX_ALLOWED_HOSTS", url.removeprefix("http://"))
        yield url, hits, body


@pytest.mark.slow
def test_a_lora_url_is_fetched_applied_cached_by_sha256_and_unloaded(engine, base, lora_server, volume):
    import hashlib

    root, hits, body = lora_server
    signed = f"{root}/lora.safetensors?X-Amz-Signature=secret123"
    with_url = generate(engine, **QUICK, lora_url=signed, lora_scale=0.8)
    assert with_url["loras"] == [{"name": "lora_url", "weight": 0.8}]
    by_library = generate(engine, **QUICK, loras=[lora(volume, "detail", 0.8)])
    # The same file at the same weight: the same pixels (the PNGs differ only in the LoRA's name in their text).
    assert [pixels(png).tolist() for png in with_url["images"]] == [pixels(png).tolist() for png in by_library["images"]]
    assert no_adapters_left(engine)
    assert generate(engine, **QUICK)["images"] == base["images"]
    # With its sha256 a repeat skips the download.
    digest = hashlib.sha256(body).hexdigest()
    again = generate(engine, **QUICK, lora_url=signed, lora_scale=0.8, lora_sha256=digest)
    assert again["images"] == with_url["images"] and len(hits) == 1


def test_an_expired_or_refused_lora_url(engine, lora_server, monkeypatch):
    root, hits, _ = lora_server
    with pytest.raises(ToolboxError) as error:
        generate(engine, **QUICK, lora_url=f"{root}/expired.safetensors?X-Amz-Signature=secret123")
    assert error.value.code is ErrorCode.LORA_DOWNLOAD_FAILED and "403" in error.value.message
    assert "secret123" not in error.value.message
    monkeypatch.setenv("TOOLBOX_ALLOWED_HOSTS", "")
    with pytest.raises(ToolboxError) as error:
        generate(engine, **QUICK, lora_url=f"{root}/lora.safetensors")
    assert error.value.code in (ErrorCode.INVALID_INPUT, ErrorCode.LORA_DOWNLOAD_FAILED)
    assert no_adapters_left(engine)
