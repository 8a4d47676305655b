"""The API's `remix` field: a CivitAI image's published settings (the fake CivitAI, real shapes) fill what the
body leaves out, the differences come back in `notes`, and a bad remix is refused before any job exists."""

from __future__ import annotations

import pytest

from modal_services.library import civitai as civitai_module
from tests.api.test_api import assert_error, generate_engine, served, wait_for_status  # noqa: F401 (fixtures)
from tests.fakes.civitai_server import FakeCivitai
from tests.library.test_civitai_images import GENERATOR_META

IMAGE = 9173928


@pytest.fixture
def civitai(monkeypatch):
    server = FakeCivitai().start()
    monkeypatch.setattr(civitai_module, "backoff_delay", lambda failures: 0.0)
    yield server
    server.stop()


@pytest.fixture
async def api(served, civitai):
    client, backend = await served(civitai_api_base=civitai.base)
    return client, backend


async def test_generate_image_remixes_the_published_settings(api, civitai, generate_engine):
    client, _ = api
    civitai.add_image(IMAGE, GENERATOR_META)
    response = await client.post("/generate-image", json={"remix": f"https://civitai.com/images/{IMAGE}"})
    assert response.status_code == 200, response.text
    [request] = generate_engine.generated
    assert request["prompt"] == GENERATOR_META["prompt"] and request["negative_prompt"] == "lowres, bad hands"
    assert (request["width"], request["height"], request["steps"], request["cfg"], request["seed"]) == \
        (832, 1216, 28, 5.5, 2817340411)
    notes = response.json()["notes"]
    assert notes[0] == f"Remix of CivitAI image {IMAGE}"
    assert "Not in the library, left out: CivitAI model version 2247497." in notes


async def test_a_job_body_gives_what_it_wants_changed(api, civitai, generate_engine):
    client, _ = api
    civitai.add_image(IMAGE, GENERATOR_META)
    accepted = await client.post("/jobs", json={"kind": "generate", "remix": str(IMAGE), "prompt": "a lighthouse",
                                                "seed": 7, "width": 1024, "height": 768})
    assert accepted.status_code == 202, accepted.text
    done = await wait_for_status(client, accepted.json()["job_id"], "done")
    [request] = generate_engine.generated
    assert (request["prompt"], request["seed"], request["width"], request["height"]) == ("a lighthouse", 7, 1024, 768)
    assert (request["steps"], request["cfg"]) == (28, 5.5)
    assert done["result"]["notes"][0] == f"Remix of CivitAI image {IMAGE}"


@pytest.mark.parametrize("arrange, body, status, code, words", [
    (lambda fake: None, {"remix": "https://civitai.com/models/5"}, 400, "INVALID_INPUT", "is not a CivitAI image"),
    (lambda fake: None, {"remix": str(IMAGE)}, 400, "CIVITAI_NOT_FOUND", f"shows no image {IMAGE}"),
    (lambda fake: fake.add_image(IMAGE, None), {"remix": str(IMAGE)}, 400, "INVALID_INPUT", "publishes no prompt"),
    (lambda fake: [fake.fault("/api/v1/images", status=502) for _ in range(5)], {"remix": str(IMAGE)}, 503,
     "CIVITAI_UNAVAILABLE", "not answering"),
    (lambda fake: fake.image_redirects.update({IMAGE: "http://10.1.2.3/"}), {"remix": str(IMAGE)}, 400,
     "INVALID_INPUT", "Refused to fetch"),
    (lambda fake: None, {}, 400, "INVALID_PROMPT", "A generate job needs a prompt."),
    (lambda fake: None, {"remix": "x" * 301}, 400, "INVALID_INPUT", "limited to 300 characters"),
])
async def test_a_bad_remix_is_refused_before_any_job(api, civitai, generate_engine, arrange, body, status, code, words):
    client, backend = api
    arrange(civitai)
    assert words in assert_error(await client.post("/generate-image", json=body), status, code)["error"]
    assert generate_engine.generated == [] and await backend.store.keys("job:") == []
