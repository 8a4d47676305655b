"""CivitAI references, the API client against a fake CivitAI on loopback, and the importer's rules."""

from __future__ import annotations

import pytest

from modal_services.library.civitai import CivitaiClient, CivitaiRef, parse_reference
from modal_services.library.civitai_plans import clean_words, is_sdxl_family, plan_import
from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from tests.fakes.civitai_server import FakeCivitai

DATA = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)) * 4


@pytest.fixture
def civitai():
    server = FakeCivitai().start()
    yield server
    server.stop()


def client(server: FakeCivitai, token: str | None = None, sleeps: list | None = None, retries: int = 3) -> CivitaiClient:
    record = sleeps if sleeps is not None else []
    return CivitaiClient(server.base, token, retries=retries, sleep=record.append)


# ------------------------------------------------------------------ references


@pytest.mark.parametrize(
    "text, expected",
    [
        ("https://civitai.com/models/929497", CivitaiRef(929497, None)),
        ("https://civitai.com/models/929497/aesthetic-quality-modifiers", CivitaiRef(929497, None)),
        ("https://civitai.com/models/929497?modelVersionId=2247497", CivitaiRef(929497, 2247497)),
        ("https://civitai.com/models/929497/slug-here?modelVersionId=2247497&foo=1", CivitaiRef(929497, 2247497)),
        ("https://civitai.com/api/download/models/2247497", CivitaiRef(None, 2247497)),
        ("https://civitai.com/api/download/models/2247497?type=Model&format=SafeTensor", CivitaiRef(None, 2247497)),
        ("urn:air:sdxl:lora:civitai:328553@368189", CivitaiRef(328553, 368189)),
        ("urn:air:sdxl:checkpoint:civitai:827184@2514310", CivitaiRef(827184, 2514310)),
        ("urn:air:sdxl:lora:civitai:328553", CivitaiRef(328553, None)),
        ("929497", CivitaiRef(929497, None)),
        ("v:2247497", CivitaiRef(None, 2247497)),
        ("V: 2247497", CivitaiRef(None, 2247497)),
        ("https://civitai.green/models/929497", CivitaiRef(929497, None)),
        ("https://civitai.red/models/929497?modelVersionId=5", CivitaiRef(929497, 5)),
        ("https://www.civitai.com/models/929497", CivitaiRef(929497, None)),
        ("civitai.com/models/929497", CivitaiRef(929497, None)),
        ("  <https://civitai.com/models/929497/x>  ", CivitaiRef(929497, None)),
        ("\n\t929497 \n", CivitaiRef(929497, None)),
        ("https://civitai.com/api/v1/model-versions/77", CivitaiRef(None, 77)),
    ],
)
def test_every_pasted_form_parses(text, expected):
    assert parse_reference(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "   ", "<>", "https://example.com/models/1", "https://civitai.com/user/someone",
     "https://civitai.com/images/123", "v:abc", "0", "v:0", "hello world", "https://civitai.com.evil.net/models/1",
     "99999999999999999999999"],
)
def test_bad_references_are_invalid_input(text):
    with pytest.raises(ToolboxError) as caught:
        parse_reference(text)
    assert caught.value.code is ErrorCode.INVALID_INPUT


def test_bad_reference_message_quotes_the_input_safely():
    with pytest.raises(ToolboxError) as caught:
        parse_reference("https://example.com/`oops`")
    assert "example.com" in caught.value.message and "`oops`" not in caught.value.message


# ------------------------------------------------------------------ the client


def test_version_and_model_json_and_bearer_token(civitai):
    civitai.add_model(1, 11, DATA)
    api = client(civitai, token="tok-123")
    version = api.version(11)
    assert version["model"]["type"] == "LORA" and version["baseModel"] == "SDXL 1.0"
    assert api.model(1)["modelVersions"][0]["id"] == 11
    for request in civitai.requests:
        assert request.headers["authorization"] == "Bearer tok-123"
        assert "tok-123" not in request.query and "token" not in request.query
    assert "tok-123" not in repr(api)


def test_404_is_not_found(civitai):
    with pytest.raises(ToolboxError) as caught:
        client(civitai).version(404404)
    assert caught.value.code is ErrorCode.CIVITAI_NOT_FOUND
    assert "404404" in caught.value.message


@pytest.mark.parametrize("status", [401, 403])
def test_401_403_ask_for_a_token_in_setup(civitai, status):
    civitai.add_model(1, 11, DATA)
    civitai.fault("/model-versions/11", status=status)
    with pytest.raises(ToolboxError) as caught:
        client(civitai).version(11)
    assert caught.value.code is ErrorCode.CIVITAI_AUTH_REQUIRED
    assert remedies.set_token("civitai") in caught.value.message


def test_rejected_token_message_never_contains_the_token(civitai):
    civitai.add_model(1, 11, DATA)
    civitai.fault("/model-versions/11", status=401)
    with pytest.raises(ToolboxError) as caught:
        client(civitai, token="super-secret-value").version(11)
    assert "super-secret-value" not in str(caught.value)
    assert "rejected" not in caught.value.message or "refused the token" in caught.value.message


def test_429_retry_after_is_honoured_then_succeeds(civitai):
    civitai.add_model(1, 11, DATA)
    civitai.fault("/model-versions/11", status=429, retry_after="7")
    civitai.fault("/model-versions/11", status=503, retry_after="2")
    sleeps: list[float] = []
    assert client(civitai, sleeps=sleeps).version(11)["id"] == 11
    assert sleeps == [7.0, 2.0]


def test_500s_retry_with_backoff_then_unavailable(civitai):
    civitai.add_model(1, 11, DATA)
    for _ in range(4):
        civitai.fault("/model-versions/11", status=500)
    sleeps: list[float] = []
    with pytest.raises(ToolboxError) as caught:
        client(civitai, sleeps=sleeps, retries=3).version(11)
    assert caught.value.code is ErrorCode.CIVITAI_UNAVAILABLE
    assert len(sleeps) == 3 and sleeps[0] < sleeps[2]  # growing backoff
    assert len(civitai.hits("/model-versions/11")) == 4


def test_a_very_long_retry_after_gives_up_at_once(civitai):
    civitai.fault("/model-versions/11", status=429, retry_after="3600")
    sleeps: list[float] = []
    with pytest.raises(ToolboxError) as caught:
        client(civitai, sleeps=sleeps).version(11)
    assert caught.value.code is ErrorCode.CIVITAI_UNAVAILABLE and sleeps == []
    assert "3600" in caught.value.message


def test_connection_refused_is_unavailable():
    api = CivitaiClient("http://127.0.0.1:9", retries=1, sleep=lambda s: None)
    with pytest.raises(ToolboxError) as caught:
        api.model(1)
    assert caught.value.code is ErrorCode.CIVITAI_UNAVAILABLE


def test_by_hash_finds_the_version_or_none(civitai):
    import hashlib

    civitai.add_model(1, 11, DATA)
    api = client(civitai)
    assert api.version_by_hash(hashlib.sha256(DATA).hexdigest())["id"] == 11
    assert api.version_by_hash("0" * 64) is None
    with pytest.raises(ToolboxError):
        api.version_by_hash("not-a-hash")


def test_download_redirect_is_resolved_and_the_token_stays_with_civitai(civitai):
    civitai.add_model(1, 11, DATA, gated=True)
    api = client(civitai, token=civitai.token)
    resolved = api.resolve_download("https://civitai.com/api/download/models/11?type=Model&format=SafeTensor", "x")
    assert resolved.url.startswith(civitai.base + "/storage/") and resolved.credentials is None
    (download,) = civitai.hits("/api/download/models/11")
    assert download.query == "type=Model&format=SafeTensor"  # rebased onto CIVITAI_API_BASE, query kept


def test_gated_download_without_token_asks_for_one(civitai):
    civitai.add_model(1, 11, DATA, gated=True)
    with pytest.raises(ToolboxError) as caught:
        client(civitai).resolve_download("/api/download/models/11", "Detail Tweaker XL")
    assert caught.value.code is ErrorCode.CIVITAI_AUTH_REQUIRED and remedies.set_token("civitai") in caught.value.message


def test_login_page_instead_of_401_is_auth_required(civitai):
    civitai.add_model(1, 11, DATA)
    civitai.fault("/api/download/models/11", kind="html")
    with pytest.raises(ToolboxError) as caught:
        client(civitai).resolve_download("/api/download/models/11", "x")
    assert caught.value.code is ErrorCode.CIVITAI_AUTH_REQUIRED


# ------------------------------------------------------------------ rules


def test_plan_for_a_bare_model_takes_the_newest_version(civitai):
    civitai.add_model(1, 11, DATA, version_name="v1")
    civitai.add_model(1, 12, DATA + b"2", version_name="v2", trained_words=["shiny, glossy", " shiny ", ""])
    plan = plan_import(client(civitai), CivitaiRef(1, None))
    assert (plan.model_id, plan.version_id, plan.version_name) == (1, 12, "v2")
    assert plan.type == "lora" and plan.civitai_type == "LORA" and plan.base_model == "SDXL 1.0"
    assert plan.trigger_words == ["shiny", "glossy"]
    assert plan.file_name == "detail_tweaker_xl.safetensors" and plan.format == "SafeTensor"
    assert plan.sha256 and len(plan.sha256) == 64 and plan.sha256 == plan.sha256.lower()
    assert plan.tags == ["detail", "style"] and plan.description == "Adds detail & sharpness."
    assert plan.size_bytes == len(DATA) + 1


def test_plan_for_a_version_checks_the_model_it_belongs_to(civitai):
    civitai.add_model(1, 11, DATA)
    assert plan_import(client(civitai), CivitaiRef(None, 11)).model_id == 1
    with pytest.raises(ToolboxError) as caught:
        plan_import(client(civitai), CivitaiRef(2, 11))
    assert caught.value.code is ErrorCode.INVALID_INPUT


@pytest.mark.parametrize("civitai_type, kind", [("LORA", "lora"), ("LoCon", "lora"), ("DoRA", "lora"), ("Checkpoint", "checkpoint")])
def test_accepted_types(civitai, civitai_type, kind):
    civitai.add_model(1, 11, DATA, type=civitai_type)
    assert plan_import(client(civitai), CivitaiRef(None, 11)).type == kind


@pytest.mark.parametrize("civitai_type", ["TextualInversion", "VAE", "Controlnet", "Hypernetwork", "Poses"])
def test_other_types_are_refused_saying_so(civitai, civitai_type):
    civitai.add_model(1, 11, DATA, type=civitai_type)
    with pytest.raises(ToolboxError) as caught:
        plan_import(client(civitai), CivitaiRef(None, 11))
    assert caught.value.code is ErrorCode.INCOMPATIBLE_MODEL and civitai_type in caught.value.message


@pytest.mark.parametrize("base", ["SD 1.5", "Flux.1 Kontext", "Pony V7", "SD 3.5", "Illustrious 2.0 Lumina"])
def test_non_sdxl_base_models_are_incompatible(civitai, base):
    civitai.add_model(1, 11, DATA, base_model=base)
    with pytest.raises(ToolboxError) as caught:
        plan_import(client(civitai), CivitaiRef(None, 11))
    assert caught.value.code is ErrorCode.INCOMPATIBLE_MODEL and base in caught.value.message


@pytest.mark.parametrize("base", ["SDXL 1.0", "SDXL Lightning", "Pony", "Illustrious", "NoobAI", "SDXL Turbo"])
def test_sdxl_family(base):
    assert is_sdxl_family(base)


@pytest.mark.parametrize("base", ["Flux.1 D", "Flux.1 S", "flux.1 d"])
def test_flux_loras_are_planned_as_the_flux_family(civitai, base):
    civitai.add_model(1, 11, DATA, base_model=base)
    plan = plan_import(client(civitai), CivitaiRef(None, 11))
    assert plan.family == "flux" and plan.type == "lora" and plan.base_model == base


def test_sdxl_plans_are_the_sdxl_family(civitai):
    civitai.add_model(1, 11, DATA, base_model="Illustrious")
    assert plan_import(client(civitai), CivitaiRef(None, 11)).family == "sdxl"


def test_flux_checkpoints_are_refused_saying_only_loras_are_taken(civitai):
    civitai.add_model(1, 11, DATA, type="Checkpoint", base_model="Flux.1 D")
    with pytest.raises(ToolboxError) as caught:
        plan_import(client(civitai), CivitaiRef(None, 11))
    assert caught.value.code is ErrorCode.INCOMPATIBLE_MODEL and "only Flux LoRAs" in caught.value.message


def test_inpainting_checkpoints_are_refused(civitai):
    civitai.add_model(1, 11, DATA, type="Checkpoint", base_model_type="Inpainting")
    with pytest.raises(ToolboxError) as caught:
        plan_import(client(civitai), CivitaiRef(None, 11))
    assert caught.value.code is ErrorCode.INCOMPATIBLE_MODEL


def test_pickle_only_versions_are_refused(civitai):
    civitai.add_model(1, 11, DATA, file_format="PickleTensor", file_name="model.ckpt")
    with pytest.raises(ToolboxError) as caught:
        plan_import(client(civitai), CivitaiRef(None, 11))
    assert caught.value.code is ErrorCode.INCOMPATIBLE_MODEL and "PickleTensor" in caught.value.message


def test_the_safetensors_file_is_picked_over_a_pickle_one(civitai):
    pickle = {"id": 5, "name": "model.pt", "type": "Model", "primary": True, "sizeKB": 1.0,
              "metadata": {"format": "PickleTensor"}, "hashes": {}, "downloadUrl": "/api/download/models/11?format=PickleTensor"}
    civitai.add_model(1, 11, DATA, extra_files=[pickle])
    civitai.versions[11]["files"][1]["primary"] = False
    plan = plan_import(client(civitai), CivitaiRef(None, 11))
    assert plan.file_name.endswith(".safetensors") and "format=SafeTensor" in plan.download_url


def test_thumbnail_rules(civitai):
    civitai.add_model(1, 11, DATA, image_levels=(8, 1))
    plan = plan_import(client(civitai), CivitaiRef(None, 11))
    assert plan.thumbnail(age_restricted_channel=False).endswith("11-1.jpeg")  # the SFW one
    assert plan.thumbnail(age_restricted_channel=True).endswith("11-0.jpeg")
    civitai.add_model(2, 21, DATA, nsfw=True, image_levels=(1,))
    nsfw_model = plan_import(client(civitai), CivitaiRef(None, 21))
    assert nsfw_model.thumbnail(age_restricted_channel=False) is None
    assert nsfw_model.thumbnail(age_restricted_channel=True)


def test_clean_words():
    assert clean_words(["a, b", "A", "  c  d ", 3, ""]) == ["a", "b", "c d"]


@pytest.mark.parametrize("limit, seconds", [(100, 60.0), (8 << 20, -1.0)])
def test_api_answers_have_a_size_cap_and_a_total_timeout(civitai, monkeypatch, limit, seconds):
    import modal_services.library.civitai as civitai_module

    civitai.add_model(1, 11, DATA)
    monkeypatch.setattr(civitai_module, "MAX_JSON_BYTES", limit)
    monkeypatch.setattr(civitai_module, "JSON_TIMEOUT", seconds)
    with pytest.raises(ToolboxError) as caught:
        client(civitai).version(11)
    assert caught.value.code is ErrorCode.CIVITAI_UNAVAILABLE and "too large or too slow" in caught.value.message
