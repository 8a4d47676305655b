"""/openapi.json says what the server enforces: 400 for a bad body (never FastAPI's 422), 422 only for a
result whose every image was withheld, and each model's own limits, read from the request classes."""

from __future__ import annotations

import pytest

from bot.core.generate_models import GENERATE_MODELS
from modal_services.jobs.validation import field_bounds
from tests.api.test_api import api, assert_error, generate_engine, served  # noqa: F401 (fixtures)


@pytest.fixture
async def schema(api):  # noqa: F811
    return (await api.get("/openapi.json")).json()


async def test_no_route_documents_fastapis_validation_422(schema, api):  # noqa: F811
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            answer = operation["responses"].get("422")
            if (path, method) == ("/generate-image", "post"):
                assert "CONTENT_WITHHELD" in answer["description"]
                assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
            else:
                assert answer is None, (path, method)
            if path != "/health":
                assert "400" in operation["responses"] and "ErrorResponse" in str(operation["responses"]["400"])
    assert not {"HTTPValidationError", "ValidationError"} & set(schema["components"]["schemas"])
    # And what the schema says is what the server does: a body it refuses is a 400.
    assert_error(await api.post("/generate-image", json={"prompt": "a cat", "width": 100}), 400, "INVALID_INPUT")


async def test_sizes_and_cfg_state_each_models_own_limits(schema, served, generate_engine):  # noqa: F811
    fields = schema["components"]["schemas"]["GenerateImageRequest"]["properties"]
    for model in GENERATE_MODELS.values():
        for field, request_field in (("width", "width"), ("height", "height"), ("cfg", model.cfg_field)):
            low, high = field_bounds(model.request, request_field)
            default = model.request.model_fields[request_field].default
            assert f"{model.name} (`{model.key}`): {low:g}-{high:g}" in fields[field]["description"]
            assert f"{default:g} when omitted" in fields[field]["description"]
    # The published range takes every model's values; the model's own is checked when the request is built.
    assert (fields["width"]["minimum"], fields["width"]["maximum"], fields["width"]["multipleOf"]) == (512, 2048, 64)
    assert "SDXL (`sdxl`): 512-1536 in steps of 64, 1024" in fields["width"]["description"]
    assert "Flux (`flux`): 1-10, 3.5 when omitted" in fields["cfg"]["description"]
    assert "at most 2.1 MP (width × height)" in fields["height"]["description"]
    client, _ = await served()
    refused = assert_error(await client.post("/generate-image", json={"prompt": "a cat", "width": 2048,
                                                                      "height": 1024}), 400, "INVALID_INPUT")
    assert refused["error"] == "The width must be between 512 and 1536 (got 2048)."
