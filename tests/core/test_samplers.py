"""The sampler table and where its names go: every spelling people use read to one name, the A1111 fields a PNG
carries read back to it, a default per checkpoint (its library entry's, else the base checkpoint's) under what a
request asks for, admins' edits of it, and Image info applying an image's sampler."""

from __future__ import annotations

import pytest

from bot.core.build import build_generate_request, build_upscale_request
from bot.core.choices import GenerateChoices, UpscaleChoices
from bot.core.image_settings import plan_generate
from modal_services.base_models.registry import BASE_MODELS
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.image_info.infotext import joined_sampler, parse_infotext
from modal_services.image_info.settings import GenerationSettings
from modal_services.image_info.writing import MadeWith
from modal_services.jobs.requests import GenerateRequest, UpscaleRequest
from modal_services.jobs.samplers import NO_SAMPLER, SAMPLER_NAMES, SAMPLERS, sampler_named, unknown_sampler
from modal_services.library.entries import ACTIVE_CHECKPOINT_KEY
from tests.bot.test_flux_cog import enable_flux
from tests.core.test_generation_data import a1111_parse
from tests.images import png_bytes

REQUIRED = ("Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE Karras", "DPM++ SDE Karras", "UniPC", "DDIM")


# ---------------------------------------------------------------- the table


def test_the_table_has_the_names_people_know_each_a_diffusers_scheduler_with_the_documented_options():
    assert set(REQUIRED) <= set(SAMPLER_NAMES) and len(SAMPLER_NAMES) <= 25  # Discord's most choices
    expected = {
        "Euler a": ("EulerAncestralDiscreteScheduler", {}),
        "Euler": ("EulerDiscreteScheduler", {}),
        "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
        "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
        "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                                "use_karras_sigmas": True}),
        "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
        "UniPC": ("UniPCMultistepScheduler", {}),
        "DDIM": ("DDIMScheduler", {}),
    }
    for name, (scheduler, options) in expected.items():
        assert (SAMPLERS[name].scheduler, SAMPLERS[name].options) == (scheduler, options)


@pytest.mark.parametrize("written, name", [
    ("euler a", "Euler a"), ("  Euler   A ", "Euler a"), ("k_euler_ancestral", "Euler a"),
    ("DPM++ 2M KARRAS", "DPM++ 2M Karras"), ("k_dpmpp_2m_ka", "DPM++ 2M Karras"), ("DPM++ 2M Uniform", "DPM++ 2M"),
    ("dpm++ sde karras", "DPM++ SDE Karras"), ("unipc", "UniPC"),
    ("Heun", None), ("DPM++ 2M Karras Karras", None), ("", None), (None, None), ("Euler a\x00", None),
    ("Euler a" * 10_000, None),
])
def test_every_spelling_reads_to_one_name_and_nothing_else_does(written, name):
    assert sampler_named(written) == name


def test_an_unknown_sampler_is_named_with_every_sampler_there_is_and_a_long_one_is_cut():
    message = unknown_sampler("x" * 10_000)
    assert all(name in message for name in SAMPLER_NAMES) and len(message) < 300 and message.endswith("…').")
    for request, fields in ((GenerateRequest, {"prompt": "a fox"}), (UpscaleRequest, {"image": b"png"})):
        with pytest.raises(ToolboxError) as caught:
            request.parse({**fields, "sampler": "Heun"})
        assert caught.value.code is ErrorCode.INVALID_INPUT and caught.value.message == unknown_sampler("Heun")
        assert request.parse({**fields, "sampler": "k_dpmpp_sde_ka"}).sampler == "DPM++ SDE Karras"


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_the_png_writes_each_as_a1111_does_and_reads_back_to_it(tmp_path, name):
    """A1111's own parser finds the two fields; the project's reader joins them back to the sampler's name."""
    text = MadeWith(prompt="a fox", negative_prompt="", steps=28, cfg=5.5, width=832, height=1216,
                    sampler=SAMPLERS[name].infotext, model="Illustrious-XL-v2.0", loras=[]).text(seed=1)
    read = a1111_parse(text)
    assert (read["Sampler"], read.get("Schedule type")) == SAMPLERS[name].infotext
    assert sampler_named(parse_infotext(text).sampler) == name


def test_a1111s_automatic_schedule_is_the_one_a1111_runs():
    """A1111 from 1.9 on gives DPM++ 2M and DPM++ SDE the Karras schedule when the Schedule type is Automatic."""
    assert joined_sampler("DPM++ 2M", "Automatic") == "DPM++ 2M Karras"
    assert joined_sampler("DPM++ SDE", "Automatic") == "DPM++ SDE Karras"
    assert joined_sampler("Euler a", "Automatic") == "Euler a"
    assert joined_sampler("DPM++ 2M", None) == "DPM++ 2M"


# ---------------------------------------------------------------- the default per checkpoint


def test_the_base_checkpoint_s_default_is_its_model_card_s():
    assert BASE_MODELS["illustrious-xl"].sampler == "Euler a" and sampler_named("Euler a") == "Euler a"


async def test_a_request_without_a_sampler_gets_the_checkpoint_s(library, store):
    built = await build_generate_request(library, GenerateChoices(prompt="a fox"))
    assert built.request.sampler == "Euler a" and built.checkpoint["sampler"] == "Euler a"
    # A library checkpoint with none of its own: the base checkpoint's; with one: its own.
    await store.put(ACTIVE_CHECKPOINT_KEY, "pony_mix.safetensors")
    assert (await build_generate_request(library, GenerateChoices(prompt="a fox"))).request.sampler == "Euler a"
    await library.edit("Pony Mix", sampler="dpm++ 2m karras")
    assert (await build_generate_request(library, GenerateChoices(prompt="a fox"))).request.sampler == "DPM++ 2M Karras"
    # What a request asks for comes first.
    asked = await build_generate_request(library, GenerateChoices(prompt="a fox", sampler="k_euler"))
    assert asked.request.sampler == "Euler"


async def test_flux_takes_no_sampler_and_gets_none(library, store):
    await enable_flux(store)
    built = await build_generate_request(library, GenerateChoices(prompt="a fox", model="flux"))
    assert "sampler" not in built.request.model_fields


async def test_an_upscale_runs_on_the_scheduler_it_is_tuned_on_unless_it_asks(library):
    plain = await build_upscale_request(library, UpscaleChoices(image=png_bytes(64, 64)))
    asked = await build_upscale_request(library, UpscaleChoices(image=png_bytes(64, 64), sampler="ddim"))
    assert (plain.request.sampler, asked.request.sampler) == (None, "DDIM")


async def test_admins_edit_a_checkpoint_s_sampler_in_its_entry(library, store):
    entry = await library.edit("Pony Mix", sampler="DPM++ SDE Karras")
    assert entry.sampler == "DPM++ SDE Karras"
    assert (await store.get("model:pony_mix.safetensors"))["sampler"] == "DPM++ SDE Karras"
    assert (await library.edit("Pony Mix", sampler=NO_SAMPLER)).sampler is None
    for name, sampler, words in (("Pony Mix", "Heun", unknown_sampler("Heun")),
                                 ("Detail", "Euler a", "Only checkpoints have a sampler.")):
        with pytest.raises(ToolboxError) as caught:
            await library.edit(name, sampler=sampler)
        assert (caught.value.code, caught.value.message) == (ErrorCode.INVALID_INPUT, words)
    assert (await store.get("model:pony_mix.safetensors"))["sampler"] is None


# ---------------------------------------------------------------- Image info


@pytest.mark.parametrize("written, applied, note", [
    ("DPM++ 2M SDE Karras", "DPM++ 2M SDE Karras", None),
    ("euler a", "Euler a", None),
    ("Heun", None, "Sampler Heun: not one this bot has, the checkpoint's sampler is used."),
])
async def test_image_info_applies_the_image_s_sampler_when_this_bot_has_it(library, written, applied, note):
    remake = await plan_generate(GenerationSettings(source="A1111/Forge", prompt="a fox", sampler=written), library)
    assert remake.params["sampler"] == applied
    assert [n for n in remake.notes if n.startswith("Sampler")] == ([note] if note else [])
