"""Upscale over the API takes the set /upscale takes: the request's LoRA maximum (the one every job kind and
front end has) and tile captions. Discord's side is in tests/core/test_front_ends_agree.py."""

from __future__ import annotations

import base64

from modal_services.engines.sdxl.tiling import plan_tiles
from modal_services.jobs.requests import MAX_LORAS_PER_JOB, CaptionRequest, UpscaleRequest
from modal_services.jobs.validation import field_bounds
from tests.api.test_api import assert_error, served, wait_for_status  # noqa: F401 (fixtures)
from tests.bot.test_upscale_cog import TagEngine
from tests.fakes.engines import StandInImageEngine
from tests.images import png_bytes

SOURCE = base64.b64encode(png_bytes(600, 400)).decode()


async def test_an_upscale_takes_as_many_loras_as_any_job_and_no_more(served, stand_in_engines):
    engine = stand_in_engines.use(UpscaleRequest, StandInImageEngine())
    client, backend = await served()
    assert field_bounds(UpscaleRequest, "loras")[1] == MAX_LORAS_PER_JOB == 3
    loras = [{"name": f"lora {number}"} for number in range(MAX_LORAS_PER_JOB + 1)]
    body = assert_error(await client.post("/jobs", json={"kind": "upscale", "image_base64": SOURCE, "loras": loras}),
                        400, "INVALID_INPUT")
    assert body["error"] == "loras: At most 3 LoRAs per job."
    assert await backend.store.keys("job:") == [] and engine.upscaled == []


async def test_tile_captions_become_each_tiles_prompt_over_the_api(served, stand_in_engines):
    engine = stand_in_engines.use(UpscaleRequest, StandInImageEngine())
    stand_in_engines.use(CaptionRequest, TagEngine())
    client, _ = await served()
    accepted = await client.post("/jobs", json={"kind": "upscale", "image_base64": SOURCE, "scale": 4,
                                                "prompt": "a town", "tile_captions": True})
    assert accepted.status_code == 202, accepted.text
    await wait_for_status(client, accepted.json()["job_id"], "done")
    [call] = engine.upscaled
    assert call["prompt"] == "a town" and len(call["region_prompts"]) == len(plan_tiles(2400, 1600)) == 6
    for region in call["region_prompts"]:
        left, _, right, _ = region["box"]
        assert region["prompt"] == f"tile {right - left}"


async def test_without_tile_captions_no_caption_job_runs(served, stand_in_engines):
    engine = stand_in_engines.use(UpscaleRequest, StandInImageEngine())
    client, backend = await served()
    accepted = await client.post("/jobs", json={"kind": "upscale", "image_base64": SOURCE, "scale": 2})
    await wait_for_status(client, accepted.json()["job_id"], "done")
    assert engine.upscaled[0]["region_prompts"] == []
    assert [record["kind"] for record in (await backend.store.items("job:")).values()] == ["upscale"]
