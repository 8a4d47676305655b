"""The HTTP API's `model: "flux-dev"`: on POST /generate-image and /jobs, with Flux's defaults and refusals."""

from __future__ import annotations

import asyncio

import pytest

from bot.core.generate_models import MODEL_ALIASES
from modal_services.library.entries import LibraryEntry, entry_key
from tests.api.test_api import assert_error, decode_png, served  # noqa: F401 (fixtures)
from tests.bot.test_flux_cog import enable_flux, flux  # noqa: F401 (flux: a fixture)


@pytest.fixture
async def api(served):  # noqa: F811 (test_api's, with FLUX.1-dev enabled)
    client, backend = await served()
    await enable_flux(backend.store)
    return client


async def test_flux_dev_answers_the_contract_with_flux_defaults(api, flux):
    response = await api.post("/generate-image", json={"prompt": "a lighthouse", "model": "flux-dev", "seed": 4,
                                                       "width": 1920, "height": 1088})
    assert response.status_code == 200, response.text
    body = response.json()
    assert decode_png(body["image_base64"]).size == (120, 68) and body["image_size"] == [1920, 1088]
    assert body["model_info"]["base_model"] == "flux1-dev"
    assert body["metadata"] == {"seed_used": 4, "actual_steps": 28, "actual_cfg": 3.5, "seeds_used": [4]}
    (fields,) = flux.generated
    assert fields["guidance"] == 3.5 and fields["negative_prompt"] == "" and fields["timeout"] == 60


async def test_flux_dev_through_the_job_api(api, flux):
    response = await api.post("/jobs", json={"kind": "generate", "model": "flux-dev", "prompt": "a cat", "cfg": 2.0,
                                             "count": 2})
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    for _ in range(200):
        view = (await api.get(f"/jobs/{job_id}")).json()
        if view["status"] in ("done", "error"):
            break
        await asyncio.sleep(0.02)
    assert view["status"] == "done" and view["kind"] == "flux_generate", view
    assert len(view["result"]["images_base64"]) == 2 and view["result"]["metadata"]["actual_cfg"] == 2.0


@pytest.mark.parametrize("body, words", [
    ({"negative_prompt": "blurry"}, "Flux has no negative prompt"),
    ({"cfg": 12}, "guidance must be between 1 and 10"),
    ({"width": 2048, "height": 2048}, "megapixels"),
    ({"lora_url": "https://example.com/x.safetensors"}, "A LoRA URL works with SDXL only"),
    ({"loras": [{"name": "SDXL Detail"}]}, "made for SDXL"),
    ({"reference_image_base64": "aGVsbG8="}, "A face photo works with SDXL only"),
    ({"identity_strength": 0.5}, "A face photo works with SDXL only"),
])
async def test_flux_refusals_are_400s_before_a_job(served, flux, body, words):
    client, backend = await served()
    await enable_flux(backend.store)
    await backend.store.put(entry_key("sdxl_detail.safetensors"),
                            LibraryEntry(name="SDXL Detail", file="sdxl_detail.safetensors", type="lora").to_dict())
    response = await client.post("/generate-image", json={"prompt": "a cat", "model": "flux-dev", **body})
    error = response.json()
    assert response.status_code == 400 and words in error["error"], error
    assert flux.generated == [] and await backend.store.keys("job:") == []


async def test_an_unknown_model_and_sdxl_sizes_are_refused(api, flux):
    assert_error(await api.post("/generate-image", json={"prompt": "a cat", "model": "sd3"}), 400, "INVALID_INPUT")
    body = assert_error(await api.post("/generate-image", json={"prompt": "a cat", "width": 2048, "height": 1024}),
                        400, "INVALID_INPUT")
    assert "1536" in body["error"]
    schema = (await api.get("/openapi.json")).json()
    # Every name the front ends share for a model (the contract's "sdxl" and "flux-dev" among them).
    models = schema["components"]["schemas"]["GenerateImageRequest"]["properties"]["model"]["enum"]
    assert models == list(MODEL_ALIASES) and {"sdxl", "flux-dev"} <= set(models)
