"""Flux LoRAs: checked against the Flux transformer's layout at import (no weights loaded), their family
recorded in the library, and families never mixed (an SDXL LoRA refused for Flux, a Flux LoRA for SDXL)."""

from __future__ import annotations

import asyncio

import pytest

from bot.core.build import build_generate_request, build_upscale_request
from bot.core.choices import GenerateChoices, LoraChoice, UpscaleChoices
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.layout import Layout
from modal_services.library.entries import Library, LibraryEntry, entry_key
from modal_services.library.lora_formats.files import lora_family
from modal_services.library.lora_formats.flux import check_flux_lora
from modal_services.library.lora_formats.layouts import FluxLayout
from modal_services.library.lora_formats.sdxl import normalize_lora
from modal_services.library.imports import ModelEngine
from modal_services.state.store import SqliteStore
from modal_services.jobs.requests import ModelImportRequest, ModelUploadRequest
from tests.fixtures import tiny_loras
from tests.fixtures.tiny_flux import (
    diffusers_flux_lora,
    kohya_flux_lora,
    tiny_flux_pipeline,
    wrong_shape_flux_lora,
    xlabs_flux_lora,
)
from tests.images import png_bytes
from tests.bot.test_flux_cog import enable_flux
from tests.library.test_civitai_import import Progress, _no_waiting, civitai  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def transformer():
    return tiny_flux_pipeline().transformer


@pytest.fixture(scope="module")
def layout():
    return FluxLayout.of_pipeline(tiny_flux_pipeline())


@pytest.fixture
def engine(tmp_path, layout):
    engine = ModelEngine(Layout(tmp_path / "models", tmp_path / "loras", SqliteStore(tmp_path / "state.sqlite3")),
                         flux_layout=layout)
    engine.load()
    yield engine
    asyncio.run(engine.store.close())


def save(tmp_path, name, state):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(tiny_loras.to_bytes(state))
    return path


# ---------------------------------------------------------------- the checks


@pytest.mark.parametrize("make, fmt", [(diffusers_flux_lora, "diffusers"), (kohya_flux_lora, "kohya"),
                                       (xlabs_flux_lora, "xlabs")])
def test_each_flux_layout_is_checked_through_diffusers_converters(tmp_path, transformer, layout, make, fmt):
    path = save(tmp_path, fmt, make(transformer))
    assert lora_family(path) == "flux"
    report = check_flux_lora(path, layout)
    assert report.format == fmt and not report.converted and report.rank == 4
    assert report.components["transformer"] == report.layers > 0


def test_a_flux_lora_of_other_shapes_is_incompatible(tmp_path, transformer, layout):
    with pytest.raises(ToolboxError) as caught:
        check_flux_lora(save(tmp_path, "wide", wrong_shape_flux_lora(transformer)), layout)
    assert caught.value.code is ErrorCode.INCOMPATIBLE_MODEL and "do not fit" in caught.value.message


def test_the_tiny_loras_do_not_fit_flux1_dev_itself(tmp_path, transformer):
    """The default layout is FLUX.1-dev's, built on the meta device from its config."""
    with pytest.raises(ToolboxError) as caught:
        check_flux_lora(save(tmp_path, "tiny", diffusers_flux_lora(transformer)))
    assert caught.value.code is ErrorCode.INCOMPATIBLE_MODEL and "3072" in caught.value.message


def test_an_sdxl_lora_is_not_a_flux_lora_and_a_flux_lora_not_an_sdxl_one(tmp_path, transformer, layout):
    sdxl = save(tmp_path, "sdxl", tiny_loras.sdxl_kohya())
    assert lora_family(sdxl) == "sdxl"
    with pytest.raises(ToolboxError) as caught:
        check_flux_lora(sdxl, layout)
    assert caught.value.code is ErrorCode.INCOMPATIBLE_MODEL and "not a Flux LoRA" in caught.value.message
    with pytest.raises(ToolboxError) as caught:
        normalize_lora(save(tmp_path, "flux", kohya_flux_lora(transformer)), tmp_path / "out.safetensors")
    assert caught.value.code is ErrorCode.INCOMPATIBLE_MODEL and "not an SDXL LoRA" in caught.value.message


def test_a_file_diffusers_cannot_read_is_refused_with_the_reason(tmp_path, transformer, layout):
    import torch

    state = kohya_flux_lora(transformer)
    state["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = torch.zeros(5, 4)  # not three equal parts
    with pytest.raises(ToolboxError) as caught:
        check_flux_lora(save(tmp_path, "broken", state), layout)
    assert caught.value.code is ErrorCode.LORA_LOAD_FAILED and "diffusers cannot read" in caught.value.message
    junk = save(tmp_path, "junk", {"double_blocks.0.something.weight": torch.zeros(2, 2)})
    with pytest.raises(ToolboxError) as caught:
        check_flux_lora(junk, layout)
    assert caught.value.code in (ErrorCode.LORA_LOAD_FAILED, ErrorCode.INCOMPATIBLE_MODEL)


# ---------------------------------------------------------------- imports record the family


def test_a_civitai_flux_lora_is_imported_with_its_family(engine, civitai, transformer):
    data = tiny_loras.to_bytes(kohya_flux_lora(transformer))
    civitai.add_model(1, 11, data, name="Flux Detail", base_model="Flux.1 D", file_name="flux_detail.safetensors")
    entry = engine.import_model(ModelImportRequest(ref="1", api_base=civitai.base), Progress())["entry"]
    assert (entry["family"], entry["format"], entry["base_model"]) == ("flux", "kohya", "Flux.1 D")


def test_an_sdxl_file_published_as_flux_is_refused_and_nothing_written(engine, civitai, tmp_path):
    civitai.add_model(1, 11, tiny_loras.to_bytes(tiny_loras.sdxl_kohya()), base_model="Flux.1 S")
    with pytest.raises(ToolboxError) as caught:
        engine.import_model(ModelImportRequest(ref="1", api_base=civitai.base), Progress())
    assert caught.value.code is ErrorCode.INCOMPATIBLE_MODEL
    assert not asyncio.run(engine.library.entries())
    assert not [p for p in (tmp_path / "loras").rglob("*") if p.is_file()]


def test_an_upload_civitai_does_not_know_gets_the_family_its_layers_say(engine, civitai, transformer):
    civitai.files["mine.safetensors"] = tiny_loras.to_bytes(xlabs_flux_lora(transformer))
    entry = engine.upload_model(ModelUploadRequest(url=f"{civitai.base}/files/mine.safetensors", filename="mine.safetensors",
                                                   type="lora", api_base=civitai.base), Progress())["entry"]
    assert entry["family"] == "flux" and entry["format"] == "xlabs"
    civitai.files["sdxl.safetensors"] = tiny_loras.to_bytes(tiny_loras.sdxl_kohya())
    entry = engine.upload_model(ModelUploadRequest(url=f"{civitai.base}/files/sdxl.safetensors", filename="sdxl.safetensors",
                                                   type="lora", api_base=civitai.base), Progress())["entry"]
    assert entry["family"] == "sdxl"


def test_entries_from_before_families_read_as_sdxl():
    old = {"name": "Old", "file": "old.safetensors", "type": "lora"}
    assert LibraryEntry.from_dict(old).family == "sdxl"


# ---------------------------------------------------------------- families are never mixed


@pytest.fixture
async def library(tmp_path):
    store = SqliteStore(tmp_path / "state.sqlite3")
    library = Library(store, tmp_path / "loras", tmp_path / "models", files_visible=False)
    for name, family in (("Flux Detail", "flux"), ("Flux Light", "flux"), ("SDXL Detail", "sdxl")):
        file = name.lower().replace(" ", "_") + ".safetensors"
        await store.put(entry_key(file), LibraryEntry(name=name, file=file, type="lora", family=family).to_dict())
    await enable_flux(store)
    yield library
    await store.close()


async def test_autocomplete_offers_only_the_chosen_familys_loras(library):
    assert [label for label, _ in await library.choices("detail", kind="lora", family="flux")] == ["Flux Detail · lora"]
    assert [label for label, _ in await library.choices("", kind="lora", family="sdxl")] == ["SDXL Detail · lora"]
    assert len(await library.choices("", kind="lora")) == 3


async def test_an_sdxl_lora_is_refused_for_flux_and_a_flux_lora_for_sdxl(library):
    def choices(model: str, lora: LoraChoice) -> GenerateChoices:
        return GenerateChoices(prompt="a cat", seed=1, model=model, loras=(lora,))

    built = await build_generate_request(library, choices("flux", LoraChoice("Flux Detail", 0.7)))
    assert built.request.loras[0].file == "flux_detail.safetensors" and built.checkpoint["name"] == "FLUX.1-dev"
    with pytest.raises(ToolboxError) as caught:
        await build_generate_request(library, choices("flux", LoraChoice("SDXL Detail")))
    assert caught.value.code is ErrorCode.INCOMPATIBLE_MODEL and "made for SDXL" in caught.value.message
    with pytest.raises(ToolboxError) as caught:
        await build_generate_request(library, choices("sdxl", LoraChoice("Flux Detail")))
    assert caught.value.code is ErrorCode.INCOMPATIBLE_MODEL and "made for Flux" in caught.value.message
    with pytest.raises(ToolboxError) as caught:
        await build_upscale_request(library, UpscaleChoices(image=png_bytes(64, 64), loras=(LoraChoice("Flux Light"),)))
    assert caught.value.code is ErrorCode.INCOMPATIBLE_MODEL


async def test_flux_requests_take_cfg_as_guidance_and_refuse_a_negative_prompt(library):
    request = (await build_generate_request(library, GenerateChoices(prompt="a cat", model="flux", cfg=2.5))).request
    assert request.guidance == 2.5 and request.kind == "flux_generate"
    request = (await build_generate_request(library, GenerateChoices(prompt="a cat", model="flux"))).request
    assert request.guidance == 3.5 and request.steps == 28
    with pytest.raises(ToolboxError) as caught:
        await build_generate_request(library, GenerateChoices(prompt="a cat", model="flux", negative="blurry"))
    assert caught.value.code is ErrorCode.INVALID_INPUT and "no negative prompt" in caught.value.message
