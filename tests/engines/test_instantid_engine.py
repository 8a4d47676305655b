"""InstantID on the tiny SDXL (CPU): a tiny IdentityNet and face adapter, faces read by the stand-in."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.engines.sdxl.engine import SdxlEngine
from modal_services.jobs.requests import GenerateRequest
from tests.fixtures.tiny_faces import StandInFaceAnalyser, face_picture
from tests.fixtures.tiny_instantid import add_tiny_instantid
from tests.fixtures.tiny_sdxl_checkpoint import build_tiny_volume
from tests.engines.test_generate_engine import new_engine as new_tiny_engine

QUICK = dict(prompt="a cat", width=512, height=512, steps=20, seed=5, timeout=300, cfg=1.0)
FACE = face_picture()
OTHER_FACE = face_picture(mark=8)


def generate(engine, progress=lambda fraction, stage: None, preview=None, **fields) -> dict:
    """One generate job on `engine`, its request parsed from `fields` as the worker parses a payload."""
    return engine.generate(GenerateRequest.parse(fields), progress, preview)


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    volume = build_tiny_volume(tmp_path_factory.mktemp("volume"))
    add_tiny_instantid(volume.models_dir)
    return volume


def new_engine(volume) -> SdxlEngine:
    return new_tiny_engine(volume, face_analyser=StandInFaceAnalyser())


@pytest.fixture(scope="module")
def engine(volume):
    return new_engine(volume)


@pytest.fixture(scope="module")
def plain(volume) -> bytes:
    """QUICK without a face, on a fresh engine."""
    return generate(new_engine(volume), **QUICK)["images"][0]


@pytest.fixture(scope="module")
def with_face(engine) -> dict:
    reports = []
    result = generate(engine, **QUICK, face_image=FACE, progress=lambda f, s: reports.append(s))
    return {**result, "reports": reports}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_the_face_changes_the_image_and_the_result_says_what_was_read(with_face, plain):
    (png,) = with_face["images"]
    assert Image.open(io.BytesIO(png)).size == (512, 512)
    assert with_face["face"] == {"faces_found": 1, "pose_faces_found": None, "identity_strength": 0.8,
                                 "controlnet_strength": 0.8}
    assert np.abs(pixels(png) - pixels(plain)).mean() > 1
    stages = with_face["reports"]
    assert stages.index("reading the face") < stages.index("step 1/20")
    assert [s for s in stages if s.startswith("step")] == [f"step {n}/20" for n in range(1, 21)]


@pytest.mark.slow
def test_the_same_face_gives_the_same_image_and_another_face_another(engine, with_face):
    again = generate(engine, **QUICK, face_image=FACE)["images"][0]
    assert np.abs(pixels(again) - pixels(with_face["images"][0])).max() <= 1
    other = generate(engine, **QUICK, face_image=OTHER_FACE)["images"][0]
    assert np.abs(pixels(other) - pixels(with_face["images"][0])).mean() > 0.5


@pytest.mark.slow
def test_both_strengths_at_zero_give_the_plain_image(engine, plain):
    """At 0 neither the face adapter nor the IdentityNet adds anything: the face path is exactly text-to-image."""
    off = generate(engine, **QUICK, face_image=FACE, identity_strength=0.0, controlnet_strength=0.0)["images"][0]
    assert np.abs(pixels(off) - pixels(plain)).max() <= 2


@pytest.mark.slow
def test_each_strength_alone_changes_the_image(engine, plain):
    only_identity = generate(engine, **QUICK, face_image=FACE, controlnet_strength=0.0)["images"][0]
    only_pose = generate(engine, **QUICK, face_image=FACE, identity_strength=0.0)["images"][0]
    for image in (only_identity, only_pose):
        assert np.abs(pixels(image) - pixels(plain)).mean() > 0.5
    assert np.abs(pixels(only_identity) - pixels(only_pose)).mean() > 0.5


@pytest.mark.slow
def test_the_identitynet_sees_the_pose_photos_keypoints_and_the_face_tokens(engine):
    from modal_services.engines.sdxl.faces import draw_keypoints, keypoints_on_canvas, read_face

    pose_photo = face_picture(size=(300, 200), boxes=((150, 20, 240, 120), (10, 10, 40, 40)))
    seen = []

    def capture(module, args, kwargs, output):
        """What the IdentityNet ran on, after every pre-hook: the pipeline itself hands it the prompt."""
        seen.append((kwargs["controlnet_cond"].clone(), kwargs["encoder_hidden_states"].clone()))

    engine.instant_id.load()  # as the first face request does; a no-op once loaded
    hook = engine.instant_id.identitynet.register_forward_hook(capture, with_kwargs=True)
    try:
        result = generate(engine, **QUICK, face_image=FACE, pose_image=pose_photo)
    finally:
        hook.remove()
    assert result["face"]["pose_faces_found"] == 2 and result["face"]["faces_found"] == 1
    assert len(seen) == 20
    condition, tokens = seen[0]
    # The pose photo's largest face, its photo scaled to cover 512² and centred, drawn as InstantID draws it.
    reading = read_face(StandInFaceAnalyser(), Image.open(io.BytesIO(pose_photo)), "the pose image")
    expected = np.asarray(draw_keypoints(keypoints_on_canvas(reading, 512, 512), 512, 512), dtype=np.float32) / 255
    drawn = condition[0].permute(1, 2, 0).numpy()
    assert drawn.shape == (512, 512, 3) and np.abs(drawn - expected).max() < 1 / 255 + 1e-6
    # Its cross-attention gets the face's tokens (the adapter's projection of the embedding), not the prompt.
    identity = read_face(StandInFaceAnalyser(), Image.open(io.BytesIO(FACE)), "the face image").face.embedding
    projection = engine.instant_id.projection.image_projection_layers[0]
    with torch.inference_mode():
        expected_tokens = projection(torch.as_tensor(identity).reshape(1, 1, -1))
    torch.testing.assert_close(tokens, expected_tokens)
    assert all(torch.equal(step_tokens, tokens) for _, step_tokens in seen)


@pytest.mark.slow
def test_a_crowded_face_photo_uses_its_largest_face(engine):
    crowd = generate(engine, **QUICK, face_image=face_picture(boxes=((64, 48, 192, 208), (0, 0, 30, 30))))
    assert crowd["face"]["faces_found"] == 2


def test_no_face_is_invalid_input_before_any_denoising(volume, monkeypatch):
    engine = new_engine(volume)
    calls = []
    monkeypatch.setattr(engine.models.pipe.unet, "forward", lambda *a, **k: calls.append(1))
    for fields in ({"face_image": face_picture(boxes=())},
                   {"face_image": FACE, "pose_image": face_picture(boxes=())}):
        with pytest.raises(ToolboxError) as error:
            generate(engine, **QUICK, **fields)
        assert error.value.code is ErrorCode.INVALID_INPUT and "No face was found" in error.value.message
    with pytest.raises(ToolboxError) as error:
        generate(engine, **QUICK, face_image=b"not an image")
    assert error.value.code is ErrorCode.INVALID_INPUT and "face image" in error.value.message.lower()
    assert calls == [] and engine.instant_id.identitynet is None


@pytest.mark.slow
def test_after_a_face_request_the_engine_is_as_fresh(volume, plain):
    engine = new_engine(volume)
    unet = engine.models.pipe.unet
    processors, projection = unet.attn_processors, unet.encoder_hid_proj
    # Stopped after its first step, with the adapter and the hook in place: a whole one ends the same way.
    with pytest.raises(ToolboxError) as error:
        generate(engine, **{**QUICK, "timeout": 1e-6}, face_image=FACE)
    assert error.value.code is ErrorCode.TIMEOUT and engine.instant_id.identitynet is not None
    after = unet.attn_processors
    assert after.keys() == processors.keys() and all(after[name] is processors[name] for name in processors)
    assert unet.encoder_hid_proj is projection
    assert not engine.instant_id.identitynet._forward_pre_hooks
    assert np.abs(pixels(generate(engine, **QUICK)["images"][0]) - pixels(plain)).max() <= 1


@pytest.mark.slow
def test_guided_batches_with_a_lora_and_the_oom_retry_keep_the_face(volume, engine, monkeypatch):
    lora = {"name": "detail", "path": str(volume.loras["detail"]), "weight": 0.8, "trigger_words": ["shiny"]}
    fields = {**QUICK, "cfg": 5.5, "count": 2, "face_image": FACE, "loras": [lora]}
    tokens = []
    engine.instant_id.load()
    hook = engine.instant_id.identitynet.register_forward_hook(
        lambda module, args, kwargs, output: tokens.append(kwargs["encoder_hidden_states"]), with_kwargs=True)
    try:
        batched = generate(engine, **fields)
    finally:
        hook.remove()
    assert batched["seeds"] == [5, 6] and batched["prompt"] == "shiny, a cat" and batched["face"]["faces_found"] == 1
    # Two images under guidance: the unguided half (no face) then the guided half (the face), as the pipeline
    # lays out its latents and prompts.
    first = tokens[0]
    assert first.shape[0] == 4 and torch.equal(first[0], first[1]) and torch.equal(first[2], first[3])
    assert not torch.allclose(first[0], first[2])
    unet = engine.models.pipe.unet
    real_forward = unet.forward

    def forward_failing_on_batches(sample, *args, **kwargs):
        if sample.shape[0] > 2:  # one image under guidance is a batch of 2
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", forward_failing_on_batches)
    stages = []
    one_by_one = generate(engine, **fields, progress=lambda f, s: stages.append(s))
    assert any("retrying one image at a time" in stage for stage in stages) and one_by_one["face"] is not None
    # The same images up to rounding (batched convolutions round differently, and CFG 5.5 through a tiny
    # random IdentityNet amplifies it on some pixels): each is far nearer its batched self than the other seed.
    apart = np.abs(pixels(batched["images"][0]) - pixels(batched["images"][1])).mean()
    for together, alone in zip(batched["images"], one_by_one["images"]):
        assert np.abs(pixels(together) - pixels(alone)).mean() < apart / 4


@pytest.mark.slow
def test_a_variation_keeps_the_face(engine, with_face):
    varied = generate(engine, **QUICK, face_image=FACE, image=with_face["images"][0], strength=0.5)
    assert varied["strength"] == 0.5 and varied["face"]["faces_found"] == 1
    assert np.abs(pixels(varied["images"][0]) - pixels(with_face["images"][0])).mean() > 0.1


def test_without_instantid_installed_a_face_request_is_models_missing(tmp_path):
    volume = build_tiny_volume(tmp_path)
    engine = new_engine(volume)
    with pytest.raises(ToolboxError) as error:
        generate(engine, **QUICK, face_image=FACE)
    assert error.value.code is ErrorCode.MODELS_MISSING and "InstantID" in error.value.message


def test_a_pose_image_needs_a_face_image(engine):
    with pytest.raises(ToolboxError) as error:
        generate(engine, **QUICK, pose_image=FACE)
    assert error.value.code is ErrorCode.INVALID_INPUT and "pose image" in error.value.message
