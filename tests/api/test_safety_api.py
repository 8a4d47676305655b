"""Content safety over HTTP: `safety_check`, `nsfw_score`, withheld images, refused prompts.

Jobs run on the local backend with stand-in engines, judged by the tiny ViT
classifier (one that flags every image, or one that passes every image).
"""

from __future__ import annotations

import base64

import pytest

from bot.api.responses import generate_response
from bot.settings import Settings
from modal_services.safety.judge import Decision, JudgedImage, SafetyReport
from modal_services.state.keys import preview_key
from modal_services.layout import NSFW_CLASSIFIER_DIR
from modal_services.jobs.requests import GenerateRequest, UpscaleRequest
from tests.fakes.engines import StandInImageEngine
from tests.images import png_bytes
from tests.api.test_api import assert_error, decode_png, served, wait_for_status  # noqa: F401 (fixtures)


@pytest.fixture
def generate_engine(stand_in_engines):
    engine = StandInImageEngine()
    stand_in_engines.use(GenerateRequest, engine)
    return engine


async def test_a_request_whose_every_image_is_withheld_is_422_content_withheld(served, generate_engine,
                                                                               install_nsfw_classifier):
    # A contract client decodes `image_base64`: a 200 with null there would crash it.
    install_nsfw_classifier("flags")
    client, backend = await served()
    body = assert_error(await client.post("/generate-image", json={"prompt": "a beach", "count": 2, "seed": 9}),
                        422, "CONTENT_WITHHELD")
    assert "2 of 2 images withheld" in body["error"] and "safety_check: false" in body["error"]
    # The seeds and scores are still reported: the caller can make them again with the check off.
    assert body["details"].startswith("seeds_used: 9, 10; nsfw_scores: 0.9") and "threshold: 0.7" in body["details"]
    job = next(iter((await backend.store.items("job:")).values()))
    assert [image["decision"] for image in job["safety"]["images"]] == ["withhold", "withhold"]


async def test_a_job_whose_every_image_is_withheld_reads_as_content_withheld(served, generate_engine,
                                                                             install_nsfw_classifier):
    install_nsfw_classifier("flags")
    client, _ = await served()
    accepted = await client.post("/jobs", json={"kind": "generate", "prompt": "a beach", "seed": 3})
    view = await wait_for_status(client, accepted.json()["job_id"], "done")
    assert "result" not in view
    assert view["error"]["error_code"] == "CONTENT_WITHHELD" and "seeds_used: 3" in view["error"]["details"]


def _judged(*decisions: str) -> dict:
    images = [JudgedImage(Decision(decision), 0.9 if decision == "withhold" else 0.1) for decision in decisions]
    return SafetyReport("block", False, 0.7, images).to_dict()


def test_with_some_images_withheld_image_base64_is_a_kept_one_with_its_seed_and_score():
    kept = png_bytes(8, 8)
    result = {"images": [None, kept, None], "safety": _judged("withhold", "post", "withhold"), "width": 8,
              "height": 8, "generation_time_seconds": 1.0, "checkpoint": "c", "loras": [], "seeds": [5, 6, 7],
              "steps": 28, "cfg": 5.5}
    body = generate_response(result, None)
    assert base64.b64decode(body["image_base64"]) == kept
    assert body["images_base64"] == [None, body["image_base64"], None]
    assert (body["metadata"]["seed_used"], body["nsfw_score"]) == (6, 0.1)
    assert body["metadata"]["seeds_used"] == [5, 6, 7] and body["safety"]["withheld"] == [0, 2]


async def test_safety_check_false_returns_the_images_unchecked(served, generate_engine, install_nsfw_classifier):
    install_nsfw_classifier("flags")
    client, _ = await served()
    body = (await client.post("/generate-image", json={"prompt": "a beach", "safety_check": False})).json()
    assert decode_png(body["image_base64"]).size == (1024, 1024)
    assert body["nsfw_score"] is None
    assert body["safety"] == {"checked": False, "nsfw_scores": [None], "withheld": [], "threshold": 0.7,
                              "note": "Not checked: the request said safety_check: false."}


async def test_passed_images_carry_their_scores(served, generate_engine):
    client, _ = await served()
    body = (await client.post("/generate-image", json={"prompt": "a beach", "count": 2})).json()
    assert len(body["images_base64"]) == 2 and all(body["images_base64"])
    assert all(0 <= score < 0.01 for score in body["safety"]["nsfw_scores"])
    assert body["safety"]["note"] == "Checked: nothing was flagged."


async def test_a_missing_classifier_fails_the_job_instead_of_posting_unchecked(served, stand_in_engines):
    engine = StandInImageEngine()
    stand_in_engines.use(GenerateRequest, engine)
    client, _ = await served()
    # The classifier stand_in_engines.use installed is taken away again.
    (Settings.load().models_dir / NSFW_CLASSIFIER_DIR).unlink()
    body = assert_error(await client.post("/generate-image", json={"prompt": "a beach"}), 503, "MODELS_MISSING")
    assert "ask the operator to run `toolbox setup --only nsfw-classifier`" in body["error"] and "/setup" not in body["error"]
    assert engine.generated == []  # refused before the engine ran
    # With the check off, nothing needs the classifier.
    assert (await client.post("/generate-image", json={"prompt": "a beach", "safety_check": False})).status_code == 200


@pytest.mark.parametrize("prompt, negative", [
    ("nude child", ""),
    ("N U D E, c h i l d", ""),
    ("l0li, s3xy", ""),
    ("1girl, nude", "adult, mature"),
])
async def test_refused_prompts_are_400_before_any_job(served, generate_engine, prompt, negative):
    client, backend = await served()
    for body in ({"prompt": prompt, "negative_prompt": negative},
                 {"kind": "generate", "prompt": prompt, "negative_prompt": negative, "safety_check": False}):
        path = "/jobs" if "kind" in body else "/generate-image"
        error = assert_error(await client.post(path, json=body), 400, "INVALID_PROMPT")
        assert "minors" in error["error"] and prompt.split(",")[0] not in error["error"]
    assert await backend.store.keys("job:") == [] and generate_engine.generated == []


async def test_an_upscale_job_is_judged_too(served, stand_in_engines, install_nsfw_classifier):
    stand_in_engines.use(UpscaleRequest, StandInImageEngine())
    install_nsfw_classifier("flags")
    client, backend = await served()
    source = base64.b64encode(png_bytes(48, 32)).decode()
    accepted = await client.post("/jobs", json={"kind": "upscale", "image_base64": source, "scale": 2})
    job_id = accepted.json()["job_id"]
    view = await wait_for_status(client, job_id, "done")
    assert "result" not in view
    assert view["error"]["error_code"] == "CONTENT_WITHHELD" and "1 of 1 withheld" in view["error"]["error"]
    assert "nsfw_scores: 0.9" in view["error"]["details"]
    assert not await backend.store.contains(preview_key(job_id))

    # The image sent may show a real person: flagged, it is withheld even with safety_check: false.
    accepted = await client.post("/jobs", json={"kind": "upscale", "image_base64": source, "scale": 2,
                                                "safety_check": False})
    error = (await wait_for_status(client, accepted.json()["job_id"], "done"))["error"]
    assert error["error_code"] == "CONTENT_WITHHELD" and "real person" in error["error"]
