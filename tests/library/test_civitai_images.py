"""A CivitAI image's link, its published generation data through the client (against the fake CivitAI, in the
images endpoint's real shapes), and that data read into settings; hostile answers refused in clear words."""

from __future__ import annotations

import json

import pytest

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.image_info.civitai_images import read_civitai_image
from modal_services.library import civitai as civitai_module
from modal_services.library.civitai import CivitaiClient, parse_image_reference
from tests.fakes.civitai_server import FakeCivitai, query_of

# What CivitAI publishes for an image generated on its own site: the generator's resources, by version id.
GENERATOR_META = {
    "prompt": "masterpiece, best quality, 1girl, (silver hair:1.2), night sky", "negativePrompt": "lowres, bad hands",
    "steps": 28, "sampler": "Euler a", "cfgScale": 5.5, "seed": 2817340411, "Size": "832x1216", "clipSkip": 2,
    "civitaiResources": [{"type": "checkpoint", "modelVersionId": 1183765, "modelVersionName": "v14.0"},
                         {"type": "lora", "weight": 0.8, "modelVersionId": 2247497, "modelVersionName": "v1.0"}],
}
# What it publishes for an uploaded A1111 file: its infotext parsed, the resources by name and AutoV2 hash.
UPLOADED_META = {
    "prompt": "1girl, <lora:add_detail:0.6>, city lights", "negativePrompt": "worst quality", "steps": "30",
    "sampler": "DPM++ 2M", "Schedule type": "Karras", "cfgScale": 7, "seed": 123, "Size": "1024x1024",
    "Model": "waiIllustriousSDXL_v140", "Model hash": "BDB59BAC77",
    "resources": [{"hash": "bdb59bac77", "name": "waiIllustriousSDXL_v140", "type": "model"},
                  {"hash": "7c6bad76eb", "name": "add_detail", "type": "lora", "weight": 0.6}],
    "Denoising strength": "0.4", "Hires upscale": "1.5", "Version": "v1.10.1",
}


@pytest.fixture
def civitai():
    server = FakeCivitai().start()
    yield server
    server.stop()


def client(server: FakeCivitai, retries: int = 2, token: str | None = None) -> CivitaiClient:
    return CivitaiClient(server.base, token, retries=retries, sleep=lambda seconds: None)


# ------------------------------------------------------------------ links


@pytest.mark.parametrize("text, image_id", [
    ("https://civitai.com/images/9173928", 9173928),
    ("https://civitai.com/images/9173928?postId=1981754&modelVersionId=5", 9173928),
    ("https://civitai.com/images/9173928/", 9173928),
    ("https://www.civitai.com/images/9173928#comments", 9173928),
    ("https://civitai.green/images/9173928", 9173928),
    ("https://civitai.red/images/9173928", 9173928),
    ("civitai.com/images/9173928", 9173928),
    ("  <https://civitai.com/images/9173928>  ", 9173928),
    ("9173928", 9173928),
])
def test_every_pasted_image_form_parses(text, image_id):
    assert parse_image_reference(text) == image_id


@pytest.mark.parametrize("text, words", [
    ("https://civitai.com/models/929497", "is not a CivitAI image"),
    ("https://civitai.com/posts/1981754", "is not a CivitAI image"),
    ("https://civitai.com/images/", "is not a CivitAI image"),
    ("https://civitai.com/images/abc", "is not a CivitAI image"),
    ("https://evil.example/images/9173928", "is not a CivitAI image"),
    ("https://civitai.com.evil.example/images/9173928", "is not a CivitAI image"),
    ("http://[::1/images/5", "is not a CivitAI image"),
    ("javascript:alert(1)", "is not a CivitAI image"),
    ("", "is not a CivitAI image"),
    ("0", "does not hold a valid CivitAI id"),
    ("9" * 30, "does not hold a valid CivitAI id"),
])
def test_anything_else_is_refused_quoting_it(text, words):
    with pytest.raises(ToolboxError) as caught:
        parse_image_reference(text)
    assert caught.value.code is ErrorCode.INVALID_INPUT and words in caught.value.message


# ------------------------------------------------------------------ the client


def test_the_image_is_fetched_with_its_meta(civitai):
    civitai.add_image(9173928, GENERATOR_META, version_ids=[1183765, 2247497])
    item = client(civitai).image(9173928)
    assert item["id"] == 9173928 and item["meta"]["seed"] == 2817340411
    [hit] = civitai.hits("/api/v1/images")
    assert query_of(hit) == {"imageId": ["9173928"], "withMeta": ["true"]}


def test_the_token_goes_to_civitai(civitai):
    civitai.add_image(5, GENERATOR_META)
    client(civitai, token="civitai-secret-token").image(5)
    assert civitai.hits("/api/v1/images")[0].headers["authorization"] == "Bearer civitai-secret-token"


def test_an_image_civitai_does_not_list_is_not_found(civitai):
    with pytest.raises(ToolboxError) as caught:
        client(civitai).image(404404)
    assert caught.value.code is ErrorCode.CIVITAI_NOT_FOUND and "no image 404404" in caught.value.message


def test_an_answer_listing_another_image_does_not_stand_in_for_it(civitai):
    civitai.raw_images[7] = json.dumps({"items": [{"id": 8, "meta": GENERATOR_META}]}).encode()
    with pytest.raises(ToolboxError) as caught:
        client(civitai).image(7)
    assert caught.value.code is ErrorCode.CIVITAI_NOT_FOUND


@pytest.mark.parametrize("body, code, words", [
    (b"<html>login</html>", ErrorCode.CIVITAI_UNAVAILABLE, "not JSON"),
    (b"[1, 2, 3]", ErrorCode.CIVITAI_UNAVAILABLE, "not JSON"),
    (json.dumps({"items": "nope"}).encode(), ErrorCode.CIVITAI_UNAVAILABLE, "lists no images"),
    (json.dumps({"error": "x"}).encode(), ErrorCode.CIVITAI_UNAVAILABLE, "lists no images"),
])
def test_nonsense_answers_are_refused(civitai, body, code, words):
    civitai.raw_images[6] = body
    with pytest.raises(ToolboxError) as caught:
        client(civitai).image(6)
    assert caught.value.code is code and words in caught.value.message


def test_a_huge_answer_is_refused_unread(civitai, monkeypatch):
    monkeypatch.setattr(civitai_module, "MAX_JSON_BYTES", 64 * 1024)
    civitai.add_image(6, {**GENERATOR_META, "prompt": "a" * 200_000})
    with pytest.raises(ToolboxError) as caught:
        client(civitai).image(6)
    assert caught.value.code is ErrorCode.CIVITAI_UNAVAILABLE and "too large" in caught.value.message


@pytest.mark.parametrize("location", ["http://169.254.169.254/latest/meta-data/", "https://192.168.1.5/x",
                                      "http://10.0.0.7/api/v1/images"])
def test_a_redirect_to_a_private_address_is_refused(civitai, location):
    civitai.image_redirects[6] = location
    with pytest.raises(ToolboxError) as caught:
        client(civitai).image(6)
    assert caught.value.code is ErrorCode.INVALID_INPUT and "Refused to fetch" in caught.value.message


def test_civitai_down_is_said_after_the_retries(civitai):
    for _ in range(3):
        civitai.fault("/api/v1/images", status=503)
    with pytest.raises(ToolboxError) as caught:
        client(civitai, retries=2).image(6)
    assert caught.value.code is ErrorCode.CIVITAI_UNAVAILABLE and "not answering" in caught.value.message
    assert len(civitai.hits("/api/v1/images")) == 3


@pytest.mark.parametrize("status, code", [(404, ErrorCode.CIVITAI_NOT_FOUND), (401, ErrorCode.CIVITAI_AUTH_REQUIRED)])
def test_refusals_keep_their_codes(civitai, status, code):
    civitai.fault("/api/v1/images", status=status)
    with pytest.raises(ToolboxError) as caught:
        client(civitai).image(6)
    assert caught.value.code is code


# ------------------------------------------------------------------ the meta, read


def test_a_generator_image_reads_with_its_version_ids():
    settings = read_civitai_image({"id": 9173928, "baseModel": "Illustrious", "meta": GENERATOR_META})
    assert settings.source == "CivitAI image 9173928"
    assert settings.prompt == "masterpiece, best quality, 1girl, (silver hair:1.2), night sky"
    assert settings.negative_prompt == "lowres, bad hands"
    assert (settings.steps, settings.sampler, settings.cfg, settings.seed) == (28, "Euler a", 5.5, 2817340411)
    assert (settings.width, settings.height) == (832, 1216)
    assert settings.model_version_id == 1183765 and settings.model is None
    [lora] = settings.loras
    assert (lora.name, lora.weight, lora.version_id) == ("CivitAI model version 2247497", 0.8, 2247497)
    assert settings.other == {"Base model": "Illustrious", "clipSkip": "2"}


def test_an_uploaded_image_reads_with_its_names_and_hashes():
    settings = read_civitai_image({"id": 5, "meta": UPLOADED_META})
    assert settings.prompt == "1girl, city lights"  # the LoRA tag is the resource's, not words to draw
    assert (settings.steps, settings.sampler, settings.cfg, settings.seed) == (30, "DPM++ 2M Karras", 7.0, 123)
    assert (settings.model, settings.model_hash) == ("waiIllustriousSDXL_v140", "bdb59bac77")
    [lora] = settings.loras
    assert (lora.name, lora.weight, lora.hash, lora.version_id) == ("add_detail", 0.6, "7c6bad76eb", None)
    assert settings.other == {"Denoising strength": "0.4", "Hires upscale": "1.5"}


def test_meta_nested_one_level_down_is_read():
    assert read_civitai_image({"id": 5, "meta": {"id": 1, "meta": GENERATOR_META}}).seed == 2817340411


def test_the_prompts_tags_are_the_loras_when_no_resource_is_listed():
    settings = read_civitai_image({"id": 5, "meta": {"prompt": "a cat <lora:fluffy:0.7>"}})
    assert [(lora.name, lora.weight) for lora in settings.loras] == [("fluffy", 0.7)]


@pytest.mark.parametrize("meta", [
    None, "text", [GENERATOR_META], 7,
    {"prompt": ["a"], "negativePrompt": {"x": 1}, "steps": [28], "seed": True, "cfgScale": "NaN", "Size": 832,
     "Model": 5, "civitaiResources": "all", "resources": [None, 1, "x", {"type": ["lora"]}]},
    {"prompt": "a", "seed": "9" * 500, "steps": 1e308, "civitaiResources": [{"type": "lora", "modelVersionId": -4,
                                                                           "weight": "heavy"}]},
])
def test_wrong_types_read_as_absent(meta):
    settings = read_civitai_image({"id": 5, "meta": meta})
    assert settings.seed is None and settings.cfg is None and settings.model is None
    assert all(lora.version_id is None and lora.weight is None for lora in settings.loras)


def test_huge_meta_is_kept_within_bounds():
    resources = [{"type": "lora", "modelVersionId": n, "weight": 0.5} for n in range(1, 10_000)]
    settings = read_civitai_image({"id": 5, "meta": {"prompt": "x" * 1_000_000, "civitaiResources": resources,
                                                      "negativePrompt": "y" * 1_000_000}})
    assert len(settings.prompt) == 20_000 and len(settings.negative_prompt) == 20_000
    assert len(settings.loras) == 20
