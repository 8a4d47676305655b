"""The text-to-image models the front ends offer, their names, and what each one's requests may use."""

from __future__ import annotations

import pytest

from bot.core.generate_models import FAMILY_NAMES, FLUX, GENERATE_MODELS, SDXL, generate_model
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.limits import ASPECT_BUCKETS, FLUX_ASPECT_BUCKETS
from modal_services.jobs.requests import FluxGenerateRequest, GenerateRequest


@pytest.mark.parametrize("name, model", [
    (None, SDXL), ("sdxl", SDXL), (" SDXL ", SDXL), ("flux", FLUX), ("flux-dev", FLUX), ("FLUX1-dev", FLUX),
])
def test_every_name_a_front_end_uses_finds_its_model(name, model):
    assert generate_model(name) is model


def test_an_unknown_model_is_invalid_input():
    with pytest.raises(ToolboxError) as caught:
        generate_model("sd3")
    assert caught.value.code is ErrorCode.INVALID_INPUT and "'sd3'" in caught.value.message


def test_each_model_row_says_what_its_requests_take():
    assert list(GENERATE_MODELS) == ["sdxl", "flux"]
    assert {key: model.title for key, model in GENERATE_MODELS.items()} == {
        "sdxl": "SDXL (the server's checkpoint)", "flux": "FLUX.1-dev"}
    assert (SDXL.request, SDXL.aspects, SDXL.cfg_field, SDXL.checkpoint) == (GenerateRequest, ASPECT_BUCKETS, "cfg", None)
    assert (FLUX.request, FLUX.aspects, FLUX.cfg_field) == (FluxGenerateRequest, FLUX_ASPECT_BUCKETS, "guidance")
    assert FLUX.checkpoint == {"key": "flux1-dev", "name": "FLUX.1-dev", "file": None}
    assert (SDXL.optional_models, FLUX.optional_models) == ((), ("flux1-dev",))
    # Read from the request classes: a new family's request says what it takes.
    assert (SDXL.takes_faces, SDXL.takes_lora_url, FLUX.takes_faces, FLUX.takes_lora_url) == (True, True, False, False)
    assert FAMILY_NAMES == {"sdxl": "SDXL", "flux": "Flux"}
