"""The shared request core: what a person asked for becomes one checked request, every rule with its one
code and message, against a real library on a SQLite state store."""

from __future__ import annotations

import pytest

from bot.core.build import (
    HALF_A_SIZE,
    build_generate_request,
    build_upscale_request,
    check_generate_choices,
)
from bot.core.choices import GenerateChoices, LoraChoice, UpscaleChoices
from bot.core.generate_models import FLUX, SDXL
from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.requests import (
    MAX_SEED,
    POSE_NEEDS_A_FACE,
    FluxGenerateRequest,
    GenerateRequest,
    SafetyContext,
    UpscaleRequest,
)
from modal_services.library.entries import ACTIVE_CHECKPOINT_KEY
from tests.bot.test_flux_cog import enable_flux
from tests.fixtures.tiny_instantid import enable_instantid
from tests.images import png_bytes

PHOTO = png_bytes(64, 64)
# The option names and commands of one front end or another, which no shared message may use.
FRONT_END_WORDS = ("--", "`", "/generate", "/upscale", "face:", "lora_url", "reference_image", "model flux")


async def refusal(build, library, choices) -> ToolboxError:
    with pytest.raises(ToolboxError) as caught:
        await build(library, choices)
    return caught.value


# ---------------------------------------------------------------- generate: what is built


async def test_an_sdxl_request_on_the_active_checkpoint_with_library_loras(library, store):
    await store.put(ACTIVE_CHECKPOINT_KEY, "pony_mix.safetensors")
    built = await build_generate_request(library, GenerateChoices(
        prompt="  a fox  ", aspect="16:9", count=4, seed=40, steps=30, cfg=7.0, negative="blurry",
        loras=(LoraChoice("detail"),), timeout=300))
    request = built.request
    assert isinstance(request, GenerateRequest) and built.model is SDXL
    assert (request.prompt, request.negative_prompt, request.width, request.height) == ("a fox", "blurry", 1344, 768)
    assert (request.count, request.seed, request.steps, request.cfg, request.timeout) == (4, 40, 30, 7.0, 300)
    # The library's recommended weight when none is asked for, and its trigger words.
    assert [lora.model_dump() for lora in request.loras] == [
        {"name": "Detail", "file": "detail.safetensors", "weight": 0.6, "trigger_words": ["shiny"]}]
    assert request.checkpoint == "pony_mix.safetensors" and built.checkpoint["name"] == "Pony Mix"


async def test_a_library_checkpoint_asked_for_is_generated_with(library, store):
    """What a remix asks for: the image's checkpoint, by name or file; the active one stays as it is."""
    built = await build_generate_request(library, GenerateChoices(prompt="a cat", checkpoint="Pony Mix"))
    assert built.request.checkpoint == "pony_mix.safetensors" and built.checkpoint["name"] == "Pony Mix"
    assert (await library.active_checkpoint())["file"] is None
    missing = await refusal(build_generate_request, library, GenerateChoices(prompt="a cat", checkpoint="nowhere"))
    assert missing.code is ErrorCode.INVALID_INPUT
    await enable_flux(store)
    flux = await refusal(build_generate_request, library,
                         GenerateChoices(prompt="a cat", model="flux", checkpoint="Pony Mix"))
    assert flux.code is ErrorCode.INVALID_INPUT and "a library checkpoint works with SDXL only" in flux.message


async def test_nothing_given_is_the_requests_defaults_with_a_drawn_seed(library):
    built = await build_generate_request(library, GenerateChoices(prompt="a fox"))
    request = built.request
    assert (request.width, request.height, request.steps, request.cfg, request.count) == (1024, 1024, 28, 5.5, 1)
    assert request.checkpoint is None and built.checkpoint["default"] is True
    assert 0 <= request.seed <= MAX_SEED
    assert request.safety == SafetyContext() and request.loras == []


async def test_a_flux_request_takes_cfg_as_guidance_and_its_own_sizes_and_loras(library, store):
    await enable_flux(store)
    built = await build_generate_request(library, GenerateChoices(
        prompt="a lighthouse", model="flux-dev", aspect="16:9 2MP", cfg=2.5, seed=9,
        loras=(LoraChoice("Flux Detail", 0.5),)))
    request = built.request
    assert isinstance(request, FluxGenerateRequest) and built.model is FLUX
    assert (request.width, request.height, request.guidance, request.seed) == (1920, 1088, 2.5, 9)
    assert request.loras[0].file == "flux_detail.safetensors" and request.loras[0].weight == 0.5
    assert built.checkpoint["name"] == "FLUX.1-dev"
    # Flux's own guidance default, never SDXL's CFG.
    assert (await build_generate_request(library, GenerateChoices(prompt="a fox", model="flux"))).request.guidance == 3.5


async def test_width_and_height_given_win_over_the_aspect(library):
    request = (await build_generate_request(library, GenerateChoices(
        prompt="a fox", aspect="1:1 2MP", width=512, height=768))).request
    assert (request.width, request.height) == (512, 768)


async def test_a_variation_a_lora_link_and_a_face_reach_the_request(library, store):
    await enable_instantid(store)
    start, pose = png_bytes(32, 32, seed=1), png_bytes(16, 16, seed=2)
    request = (await build_generate_request(library, GenerateChoices(
        prompt="a portrait", variation_image=start, variation_strength=0.5,
        lora_url="https://r2.example/style.safetensors", lora_scale=0.9, lora_sha256="ab" * 32,
        face_image=PHOTO, pose_image=pose, identity_strength=1.1, controlnet_strength=0.4))).request
    assert (request.image, request.strength) == (start, 0.5)
    assert (request.lora_url, request.lora_scale, request.lora_sha256) == (
        "https://r2.example/style.safetensors", 0.9, "ab" * 32)
    assert (request.face_image, request.pose_image) == (PHOTO, pose)
    assert (request.identity_strength, request.controlnet_strength) == (1.1, 0.4)


async def test_a_lora_scale_without_a_lora_link_has_nothing_to_scale(library, store):
    await enable_flux(store)
    for model in ("sdxl", "flux"):
        request = (await build_generate_request(library, GenerateChoices(
            prompt="a fox", model=model, lora_scale=0.3, lora_sha256="ab" * 32))).request
        assert getattr(request, "lora_url", None) is None and getattr(request, "lora_scale", 1.0) == 1.0


async def test_the_safety_context_travels_and_screens_the_prompt(library):
    safety = SafetyContext(policy="spoiler", age_restricted=True, refused_words=["badger"])
    request = (await build_generate_request(library, GenerateChoices(prompt="a fox", safety=safety))).request
    assert request.safety == safety
    error = await refusal(build_generate_request, library, GenerateChoices(prompt="a badger", safety=safety))
    assert error.code is ErrorCode.INVALID_PROMPT


def test_the_values_are_checked_without_a_library():
    checked = check_generate_choices(GenerateChoices(prompt="a fox", model="flux", cfg=2.0, count=2,
                                                     loras=(LoraChoice("anything", 0.5),)))
    assert checked.model is FLUX and checked.request.guidance == 2.0 and checked.request.count == 2
    assert 0 <= checked.request.seed <= MAX_SEED
    assert [(lora.name, lora.weight) for lora in checked.loras] == [("anything", 0.5)]


# ---------------------------------------------------------------- generate: every rule, its code and its message


GENERATE_REFUSALS = [
    # The model, by name.
    (dict(model="sd3"), ErrorCode.INVALID_INPUT, "The model must be one of 'sdxl', 'flux', 'flux-dev' or 'flux1-dev' (got 'sd3')."),
    # A face, a pose or their weights with a model InstantID has no weights for.
    *[(dict(model="flux", **{name: value}), ErrorCode.INVALID_INPUT,
       "A face photo works with SDXL only: InstantID has no Flux weights. Generate with SDXL to use one.")
      for name, value in (("face_image", PHOTO), ("pose_image", PHOTO), ("identity_strength", 0.5),
                          ("controlnet_strength", 0.5))],
    # A LoRA of the request's own, by link, with a model that takes LoRAs from the library only.
    (dict(model="flux", lora_url="https://example.com/x.safetensors"), ErrorCode.INVALID_INPUT,
     "A LoRA URL works with SDXL only: Flux takes LoRAs from the library."),
    # A sampler: one of the table's, for a model that takes one.
    (dict(sampler="Heun"), ErrorCode.INVALID_INPUT, "The sampler must be one of Euler a, Euler, DPM++ 2M, "
     "DPM++ 2M Karras, DPM++ 2M SDE, DPM++ 2M SDE Karras, DPM++ SDE, DPM++ SDE Karras, UniPC, DDIM (got 'Heun')."),
    (dict(sampler="Euler a'); DROP TABLE" + "x" * 100), ErrorCode.INVALID_INPUT, "The sampler must be one of Euler a, "
     "Euler, DPM++ 2M, DPM++ 2M Karras, DPM++ 2M SDE, DPM++ 2M SDE Karras, DPM++ SDE, DPM++ SDE Karras, UniPC, DDIM "
     "(got \"Euler a'); DROP TABLExxxxxxxxxxxxxxxxxxx…\")."),
    (dict(model="flux", sampler="Euler a"), ErrorCode.INVALID_INPUT,
     "A sampler is chosen for SDXL only: Flux runs on its own scheduler."),
    # Sizes.
    (dict(aspect="1:1 2MP"), ErrorCode.INVALID_INPUT,
     "The 1:1 2MP size is made by Flux only: pick Flux as the model, or another aspect."),
    (dict(aspect="7:3"), ErrorCode.INVALID_INPUT,
     "The aspect is one of 1:1, 4:5, 5:4, 2:3, 3:2, 9:16, 16:9, 9:21, 21:9, 1:1 2MP, 16:9 2MP, 9:16 2MP (got '7:3')."),
    (dict(width=512), ErrorCode.INVALID_INPUT, HALF_A_SIZE),
    (dict(height=512, model="flux"), ErrorCode.INVALID_INPUT, HALF_A_SIZE),
    (dict(width=2048, height=1024), ErrorCode.INVALID_INPUT, "The width must be between 512 and 1536 (got 2048)."),
    (dict(width=2048, height=2048, model="flux"), ErrorCode.INVALID_INPUT,
     "2048×2048 is more than Flux's 2.1 megapixels: choose a smaller size."),
    # The rules of a request on its own.
    (dict(pose_image=PHOTO), ErrorCode.INVALID_INPUT, POSE_NEEDS_A_FACE),
    (dict(model="flux", negative="blurry"), ErrorCode.INVALID_INPUT,
     "Flux has no negative prompt: leave it out and describe what you want instead."),
    (dict(model="flux", cfg=12.0), ErrorCode.INVALID_INPUT, "The guidance must be between 1 and 10 (got 12)."),
    (dict(cfg=25.0), ErrorCode.INVALID_INPUT, "CFG must be between 1 and 20 (got 25)."),
    (dict(loras=(LoraChoice("Detail", 3.0),)), ErrorCode.INVALID_INPUT, "A LoRA weight must be between -2 and 2 (got 3)."),
    (dict(loras=(LoraChoice("Detail"), LoraChoice("detail.safetensors"))), ErrorCode.INVALID_INPUT,
     "The same LoRA is listed twice."),
    (dict(prompt="   "), ErrorCode.INVALID_PROMPT, "The prompt cannot be empty."),
    # Control characters (an escape sequence, a bell) are no part of a prompt; line breaks and tabs are.
    (dict(prompt="a fox\x1b[2J"), ErrorCode.INVALID_PROMPT,
     "The prompt contains a control character (U+001B, at position 5): only text, line breaks and tabs are allowed."),
    (dict(negative="blurry\x07"), ErrorCode.INVALID_PROMPT, "The negative prompt contains a control character "
     "(U+0007, at position 6): only text, line breaks and tabs are allowed."),
    # The library: a LoRA of the other family, either way.
    (dict(model="flux", loras=(LoraChoice("Detail"),)), ErrorCode.INCOMPATIBLE_MODEL,
     "The LoRA 'Detail' is made for SDXL; it cannot be used with Flux. Pick a Flux LoRA."),
    (dict(loras=(LoraChoice("Flux Detail"),)), ErrorCode.INCOMPATIBLE_MODEL,
     "The LoRA 'Flux Detail' is made for Flux; it cannot be used with SDXL. Pick a SDXL LoRA."),
]


@pytest.mark.parametrize("asked, code, message", GENERATE_REFUSALS)
async def test_each_generate_rule_has_one_code_and_one_message(library, store, asked, code, message):
    await enable_flux(store)
    await enable_instantid(store)
    error = await refusal(build_generate_request, library, GenerateChoices(**{"prompt": "a fox", **asked}))
    assert (error.code, error.message) == (code, message)
    assert not any(word in error.message for word in FRONT_END_WORDS)


@pytest.mark.parametrize("asked, words", [
    (dict(model="flux"), f"FLUX.1-dev is not enabled: {remedies.enable('flux1-dev')}."),
    (dict(face_image=PHOTO), f"InstantID (IdentityNet and face adapter) is not enabled: {remedies.enable('instantid')}."),
])
async def test_an_optional_model_an_admin_has_not_enabled_is_models_missing(library, asked, words):
    error = await refusal(build_generate_request, library, GenerateChoices(prompt="a fox", **asked))
    assert error.code is ErrorCode.MODELS_MISSING and words in error.message


async def test_an_enabled_model_not_yet_downloaded_is_models_missing(library, store):
    from modal_services.base_models.optional_models import set_enabled

    await set_enabled(store, "flux1-dev", True, by="Ada (1)")
    error = await refusal(build_generate_request, library, GenerateChoices(prompt="a fox", model="flux"))
    assert error.code is ErrorCode.MODELS_MISSING and "enabled but not downloaded yet" in error.message


async def test_an_unknown_lora_is_named(library):
    error = await refusal(build_generate_request, library, GenerateChoices(prompt="a fox", loras=(LoraChoice("nope"),)))
    assert error.code is ErrorCode.INVALID_INPUT and "No lora named 'nope'" in error.message


@pytest.mark.parametrize("asked", [
    dict(loras=(LoraChoice("nope"),)),           # before the LoRA lookup
    dict(model="flux"),                          # before the optional-model check (Flux is not enabled)
    dict(face_image=PHOTO),                      # likewise for InstantID
])
async def test_a_bad_value_is_named_before_any_library_lookup(library, asked):
    error = await refusal(build_generate_request, library, GenerateChoices(prompt="a fox", steps=99, **asked))
    assert (error.code, error.message) == (ErrorCode.INVALID_INPUT, "Steps must be between 20 and 50 (got 99).")


# ---------------------------------------------------------------- upscale


async def test_an_upscale_on_the_active_checkpoint_with_its_output_size(library, store):
    await store.put(ACTIVE_CHECKPOINT_KEY, "pony_mix.safetensors")
    built = await build_upscale_request(library, UpscaleChoices(
        image=png_bytes(64, 48), scale=2.5, prompt="a fox", creativity=0.5, loras=(LoraChoice("Detail", 0.4),),
        region_prompts=({"box": [0, 0, 32, 48], "prompt": "fur"},)))
    request = built.request
    assert built.output_size == (160, 120) and request.scale == 2.5 and request.creativity == 0.5
    assert request.loras[0].file == "detail.safetensors" and request.loras[0].weight == 0.4
    assert request.checkpoint == "pony_mix.safetensors" and built.checkpoint["name"] == "Pony Mix"
    assert request.region_prompts[0].prompt == "fur" and 0 <= request.seed <= MAX_SEED


async def test_an_upscale_left_to_its_defaults(library):
    request = (await build_upscale_request(library, UpscaleChoices(image=png_bytes(64, 64)))).request
    defaults = UpscaleRequest.parse({"image": b"png"})
    assert (request.scale, request.creativity, request.steps, request.prompt) == (
        defaults.scale, defaults.creativity, defaults.steps, "")
    assert request.checkpoint is None


UPSCALE_REFUSALS = [
    (dict(creativity=5.0), ErrorCode.INVALID_INPUT, "Creativity must be between 0.05 and 1 (got 5)."),
    (dict(image=png_bytes(8, 8)), ErrorCode.INVALID_INPUT, "The image is 8×8: at least 16 px a side, please."),
    (dict(image=png_bytes(2048, 2048), scale=4.0), ErrorCode.INVALID_INPUT,
     "2048×2048 at 4x would be 8192×8192 (67.1 MP); the limit is 16 MP. The largest scale for this image is 2x."),
    (dict(image=b"not an image"), ErrorCode.INVALID_INPUT,
     "The file to upscale is not an image I can read (PNG, JPEG, WebP, GIF or BMP)."),
    (dict(loras=(LoraChoice("Flux Detail"),)), ErrorCode.INCOMPATIBLE_MODEL,
     "The LoRA 'Flux Detail' is made for Flux; it cannot be used with SDXL. Pick a SDXL LoRA."),
    (dict(loras=(LoraChoice("Detail"), LoraChoice("Detail"))), ErrorCode.INVALID_INPUT, "The same LoRA is listed twice."),
]


@pytest.mark.parametrize("asked, code, message", UPSCALE_REFUSALS)
async def test_each_upscale_rule_has_one_code_and_one_message(library, asked, code, message):
    error = await refusal(build_upscale_request, library, UpscaleChoices(**{"image": png_bytes(64, 64), **asked}))
    assert (error.code, error.message) == (code, message)
    assert not any(word in error.message for word in FRONT_END_WORDS)


async def test_an_upscale_value_is_named_before_any_library_lookup(library):
    error = await refusal(build_upscale_request, library, UpscaleChoices(
        image=png_bytes(64, 64), creativity=5.0, loras=(LoraChoice("nope"),)))
    assert "Creativity" in error.message


async def test_region_prompts_are_screened_like_the_prompt(library):
    safety = SafetyContext(refused_words=["badger"])
    built = await build_upscale_request(library, UpscaleChoices(image=png_bytes(64, 64), safety=safety))
    with pytest.raises(ToolboxError) as caught:
        built.request.with_region_prompts([{"box": [0, 0, 8, 8], "prompt": "a badger"}])
    assert caught.value.code is ErrorCode.INVALID_PROMPT
    tiled = built.request.with_region_prompts([{"box": [0, 0, 8, 8], "prompt": "fur"}])
    assert tiled.region_prompts[0].prompt == "fur" and tiled.seed == built.request.seed
    error = await refusal(build_upscale_request, library, UpscaleChoices(
        image=png_bytes(64, 64), safety=safety, region_prompts=({"box": [0, 0, 8, 8], "prompt": "a badger"},)))
    assert error.code is ErrorCode.INVALID_PROMPT
