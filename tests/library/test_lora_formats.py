"""LoRA formats: classified, checked against SDXL's layout, converted, and loaded on a tiny SDXL pipeline."""

from __future__ import annotations

import pytest

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.library.lora_formats.layouts import ModelLayout
from modal_services.library.lora_formats.sdxl import classify, normalize_lora
from tests.fixtures import tiny_loras

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")


@pytest.fixture(scope="module")
def pipe():
    from tests.fixtures.tiny_sdxl import tiny_sdxl_controlnet_img2img

    return tiny_sdxl_controlnet_img2img()


@pytest.fixture(scope="module")
def layout(pipe):
    return ModelLayout.of_pipeline(pipe)


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))


def run(pipe, image):
    return pipe("a cat photo", image=image, control_image=image, strength=1.0, num_inference_steps=2,
                guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.fixture(scope="module")
def base_output(pipe, image):
    return run(pipe, image)


def write(tmp_path, state, name="lora.safetensors"):
    path = tmp_path / name
    tiny_loras.save(state, path)
    return path


FORMATS = [
    ("kohya", lambda: tiny_loras.kohya(), False),
    ("kohya", lambda: tiny_loras.kohya(style="sgm"), False),
    ("locon", lambda: tiny_loras.locon(), False),
    ("locon", lambda: tiny_loras.locon_cp(), True),
    ("loha", lambda: tiny_loras.loha(), True),
    ("lokr", lambda: tiny_loras.lokr(), True),
    ("full", lambda: tiny_loras.full_diff(), True),
    ("diffusers", lambda: tiny_loras.peft(), False),
]


@pytest.mark.slow
@pytest.mark.parametrize("fmt, build, converts", FORMATS, ids=["kohya", "kohya-sgm", "locon", "locon-cp", "loha", "lokr", "full", "peft"])
def test_each_accepted_format_loads_and_changes_the_output(tmp_path, pipe, layout, image, base_output, fmt, build, converts):
    src = write(tmp_path, build())
    dst = tmp_path / "converted.safetensors"
    report = normalize_lora(src, dst, layout)
    assert (report.format, report.converted) == (fmt, converts)
    assert dst.exists() == converts and src.exists()  # the original is kept
    pipe.load_lora_weights(str(dst if converts else src), adapter_name="under_test")
    try:
        changed = run(pipe, image)
    finally:
        pipe.unload_lora_weights()
    assert np.abs(changed - base_output).max() > 1e-3
    assert np.allclose(run(pipe, image), base_output, atol=1e-5)  # unloading restores the base exactly


@pytest.mark.parametrize("build", [tiny_loras.locon_cp, tiny_loras.loha, tiny_loras.lokr, tiny_loras.full_diff])
def test_conversions_apply_the_same_weight_change(tmp_path, layout, build):
    from safetensors.torch import load_file

    original = build()
    dst = tmp_path / "converted.safetensors"
    report = normalize_lora(write(tmp_path, original), dst, layout)
    assert report.notes == []  # exact: no truncation needed at these ranks
    got = tiny_loras.kohya_delta(load_file(str(dst)))
    want = tiny_loras.reference_delta(original)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-5), name


def test_rank_cap_is_recorded_as_a_note(tmp_path, layout):
    dst = tmp_path / "converted.safetensors"
    report = normalize_lora(write(tmp_path, tiny_loras.full_diff()), dst, layout, max_rank=4)
    assert report.rank == 4 and report.notes and "rank capped at 4" in report.notes[0]


def test_classify():
    assert classify(tiny_loras.kohya()) == "kohya"
    assert classify(tiny_loras.locon()) == "locon"
    assert classify(tiny_loras.loha()) == "loha"
    assert classify(tiny_loras.lokr()) == "lokr"
    assert classify(tiny_loras.peft()) == "diffusers"


@pytest.mark.parametrize(
    "build, code, words",
    [
        (tiny_loras.wrong_shapes, ErrorCode.INCOMPATIBLE_MODEL, "another base model"),
        (tiny_loras.flux_like, ErrorCode.INCOMPATIBLE_MODEL, "SDXL does not have"),
        (tiny_loras.with_bias_delta, ErrorCode.LORA_LOAD_FAILED, "bias deltas"),
        (lambda: {**tiny_loras.kohya(), "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale":
                  torch.ones(64, 1)}, ErrorCode.LORA_LOAD_FAILED, "magnitudes on only some"),
        (lambda: tiny_loras.dora(input_side=True), ErrorCode.LORA_LOAD_FAILED, "input side"),
        (lambda: {"diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.ones(4, 8)},
         ErrorCode.INCOMPATIBLE_MODEL, "not an SDXL LoRA"),
        (lambda: {**tiny_loras.kohya(), "lora_unet_x.weird_param": torch.ones(1)}, ErrorCode.LORA_LOAD_FAILED, "Unknown"),
        # SGM and diffusers block names in one file: diffusers would silently drop the SGM half.
        (lambda: {**tiny_loras.kohya(style="sgm", text_encoder=False),
                  **{k: v for k, v in tiny_loras.locon().items() if "resnets" in k}}, ErrorCode.LORA_LOAD_FAILED, "would not load"),
    ],
    ids=["sd15-shapes", "flux", "bias", "partial-dora", "input-side-dora", "other-arch", "unknown-param", "mixed-naming"],
)
def test_refusals_say_why_and_write_nothing(tmp_path, layout, build, code, words):
    dst = tmp_path / "converted.safetensors"
    with pytest.raises(ToolboxError) as caught:
        normalize_lora(write(tmp_path, build()), dst, layout)
    assert caught.value.code is code and words in caught.value.message
    assert not dst.exists()


def test_dora_becomes_a_peft_dora_adapter_that_applies_the_same_weights(tmp_path, pipe, layout, image, base_output):
    """LyCORIS DoRA: W' = m * (W + dW) / ||W + dW|| per output row, as PEFT's DoRA layers compute it."""
    source = tiny_loras.dora(conv=True)
    dst = tmp_path / "converted.safetensors"
    report = normalize_lora(write(tmp_path, source), dst, layout)
    assert report.format == "dora" and report.converted and report.components == {"unet": 6, "text_encoder": 4}

    pipe.load_lora_weights(str(dst), adapter_name="dora")
    try:
        assert np.abs(run(pipe, image) - base_output).max() > 1e-3
        name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
        module = dict(pipe.unet.named_modules())["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
        magnitude = source[f"{name}.dora_scale"].reshape(-1, 1)
        base = module.base_layer.weight.detach()
        delta = source[f"{name}.lora_up.weight"] @ source[f"{name}.lora_down.weight"]
        merged = base + delta * (source[f"{name}.alpha"] / delta.new_tensor(4.0))
        expected = magnitude * merged / merged.norm(dim=1, keepdim=True)
        x = torch.randn(3, base.shape[1], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.allclose(module(x), torch.nn.functional.linear(x, expected, module.base_layer.bias), atol=1e-4)
    finally:
        pipe.unload_lora_weights()
    assert np.array_equal(run(pipe, image), base_output)


def test_not_a_safetensors_file_is_refused_without_unpickling(tmp_path, layout):
    import pickle

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ToolboxError) as caught:
        normalize_lora(path, tmp_path / "out.safetensors", layout)
    assert caught.value.code is ErrorCode.LORA_LOAD_FAILED


def test_real_sdxl_layout_without_weights(tmp_path):
    """The production layout: SDXL's own shapes, from its configs, on the meta device."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, (out, inp) in {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640),  # SGM naming
        "lora_unet_output_blocks_2_1_transformer_blocks_9_attn2_to_k": (1280, 2048),
        "lora_unet_middle_block_1_proj_in": (1280, 1280),
        "lora_te1_text_model_encoder_layers_11_self_attn_out_proj": (768, 768),
        "lora_te2_text_model_encoder_layers_31_mlp_fc1": (5120, 1280),
    }.items():
        state[f"{name}.lora_down.weight"] = torch.randn(1, inp, generator=g)
        state[f"{name}.lora_up.weight"] = torch.randn(out, 1, generator=g)
        state[f"{name}.alpha"] = torch.tensor(1.0)
    report = normalize_lora(write(tmp_path, state), tmp_path / "x.safetensors")
    assert report.components == {"unet": 3, "text_encoder": 1, "text_encoder_2": 1}
    # The tiny test LoRAs are, to real SDXL, LoRAs of another model.
    with pytest.raises(ToolboxError) as caught:
        normalize_lora(write(tmp_path, tiny_loras.kohya(), "tiny.safetensors"), tmp_path / "y.safetensors")
    assert caught.value.code is ErrorCode.INCOMPATIBLE_MODEL
