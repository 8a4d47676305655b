"""What the SDXL worker contract's own clients send: null for "not given", and prompts with forbidden
characters (control characters), over /generate-image and /jobs.

Jobs run on the local backend with stand-in engines.
"""

from __future__ import annotations

import base64

import pytest

from modal_services.jobs.requests import CaptionRequest, UpscaleRequest
from tests.api.test_api import assert_error, generate_engine, served, wait_for_status  # noqa: F401 (fixtures)
from tests.fakes.engines import SlowCaptionEngine, StandInImageEngine
from tests.images import png_bytes


async def test_null_optional_fields_are_not_given(served, generate_engine):
    client, _ = await served()
    # As the contract's example client sends them: its optional arguments left at None.
    body = {"prompt": "a lighthouse", "negative_prompt": None, "lora_url": None, "lora_scale": None, "seed": None,
            "timeout": None, "steps": 28, "cfg": None, "width": None, "height": None, "count": None, "loras": None,
            "reference_image_base64": None}
    response = await client.post("/generate-image", json=body)
    assert response.status_code == 200, response.text
    [fields] = generate_engine.generated
    assert (fields["negative_prompt"], fields["timeout"], fields["cfg"], fields["width"]) == ("", 60, 5.5, 1024)
    assert response.json()["metadata"]["seed_used"] == fields["seed"]  # drawn, as when left out


async def test_null_fields_mean_not_given_on_every_job_kind(served, stand_in_engines):
    stand_in_engines.use(CaptionRequest, SlowCaptionEngine(delay=0))
    stand_in_engines.use(UpscaleRequest, StandInImageEngine())
    client, _ = await served()
    image = base64.b64encode(png_bytes(48, 32)).decode()
    for body in ({"kind": "caption", "images_base64": [image], "style": None, "question": None},
                 {"kind": "upscale", "image_base64": image, "scale": None, "prompt": None, "negative": None,
                  "loras": None, "creativity": None, "seed": None}):
        accepted = await client.post("/jobs", json=body)
        assert accepted.status_code == 202, accepted.text
        await wait_for_status(client, accepted.json()["job_id"], "done")


async def test_a_null_required_field_is_named_as_missing(served, generate_engine):
    client, backend = await served()
    body = assert_error(await client.post("/generate-image", json={"prompt": None}), 400, "INVALID_PROMPT")
    assert body["error"] == "prompt: A generate job needs a prompt."
    assert await backend.store.keys("job:") == []


@pytest.mark.parametrize("path, body, code, words", [
    ("/generate-image", {"prompt": "a cat\u0000"}, "INVALID_PROMPT", "prompt: The prompt contains a control character (U+0000"),
    ("/generate-image", {"prompt": "a cat", "negative_prompt": "\u001b[31mred"}, "INVALID_PROMPT",
     "negative_prompt: The negative prompt contains a control character (U+001B, at position 0)"),
    ("/generate-image", {"prompt": "a cat\u0085"}, "INVALID_PROMPT", "prompt: The prompt contains a control character (U+0085, at position 5)"),
    # An upscale's words are INVALID_INPUT, as its request class tells them on every front end.
    ("/jobs", {"kind": "upscale", "image_base64": "iVBORw0KGgo=", "prompt": "sharp\u007f"}, "INVALID_INPUT",
     "prompt: The prompt contains a control character (U+007F"),
    ("/jobs", {"kind": "caption", "images_base64": ["iVBORw0KGgo="], "question": "who\u0007?"}, "INVALID_INPUT",
     "question: The question contains a control character (U+0007"),
])
async def test_control_characters_are_refused_before_any_job(served, generate_engine, path, body, code, words):
    client, backend = await served()
    error = assert_error(await client.post(path, json=body), 400, code)
    assert error["error"].startswith(words) and "only text, line breaks and tabs" in error["error"]
    assert await backend.store.keys("job:") == [] and generate_engine.generated == []


async def test_line_breaks_and_tabs_in_a_prompt_are_text(served, generate_engine):
    client, _ = await served()
    response = await client.post("/generate-image", json={"prompt": "a cat,\n\ton a mat\r\n", "negative_prompt": "x\ty"})
    assert response.status_code == 200, response.text
    [fields] = generate_engine.generated
    assert (fields["prompt"], fields["negative_prompt"]) == ("a cat,\n\ton a mat", "x\ty")
