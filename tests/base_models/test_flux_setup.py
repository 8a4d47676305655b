"""FLUX.1-dev in setup: optional (never in "Download missing" until enabled), gated on the hub, and the 401 /
403 answers of the fake hub turned into what the admin does about them."""

from __future__ import annotations

import pytest

from modal_services.base_models import downloads

from modal_services.net.transfer import retrying
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.layout import FLUX_DIR
from modal_services.base_models.optional_models import set_enabled, setup_entries
from modal_services.base_models.registry import BASE_MODELS, models_for
from tests.fakes.hf_server import serve_registry
from tests.base_models.test_optional_models import HF_TOKEN, download, store  # noqa: F401 (store: a fixture)

FLUX = BASE_MODELS["flux1-dev"]


@pytest.fixture
def hub(fake_hub, monkeypatch):
    serve_registry(fake_hub, {FLUX.key: FLUX})
    monkeypatch.setattr(downloads, "TICK_SECONDS", 0.05)
    monkeypatch.setattr(retrying, "wait_before_retry", lambda seconds, interrupt=None: None)
    return fake_hub


def test_the_entry_is_optional_gated_non_commercial_and_the_diffusers_layout_only():
    assert FLUX.optional is not None and FLUX.optional.gated
    assert "Non-Commercial" in FLUX.optional.summary and FLUX.optional.url.endswith("black-forest-labs/FLUX.1-dev")
    assert FLUX.folder == FLUX_DIR and 30e9 < FLUX.approx_bytes < 40e9
    assert {"transformer/*", "text_encoder_2/*", "vae/*", "model_index.json"} <= set(FLUX.source.include)
    assert {"flux1-dev.safetensors", "ae.safetensors"} <= set(FLUX.source.exclude)
    # Flux jobs need FLUX.1-dev and the NSFW classifier and tagger that judge their images; SDXL jobs never need Flux.
    assert models_for("flux_generate") == ["nsfw-classifier", "wd-tagger", "flux1-dev"] and "flux1-dev" not in models_for("generate")


async def test_download_missing_leaves_flux_out_until_an_admin_enables_it(store):
    assert FLUX.key not in [entry.key for entry in await setup_entries(store)]
    await set_enabled(store, FLUX.key, True, by="Ada (1)")
    assert FLUX.key in [entry.key for entry in await setup_entries(store)]


@pytest.mark.parametrize("token, status, words", [
    (None, 401, "no Hugging Face token is set"),
    (HF_TOKEN, 403, "refused the token that is set"),
])
async def test_a_gated_refusal_says_to_accept_the_flux_licence(hub, tmp_path, store, token, status, words):
    if token:
        await store.put("secret:hf", {"token": token, "user": "tester"})
    await set_enabled(store, FLUX.key, True, by="Ada (1)")
    hub.fault("/api/models/black-forest-labs/FLUX.1-dev", "status", times=5, status=status,
              headers={"X-Error-Code": "GatedRepo"})
    with pytest.raises(ToolboxError) as caught:
        await download(tmp_path, store, [FLUX.key])
    message = caught.value.message
    assert caught.value.code is ErrorCode.DOWNLOAD_FAILED and words in message
    assert "FLUX.1-dev is gated on Hugging Face" in message and "<https://huggingface.co/black-forest-labs/FLUX.1-dev>" in message
    assert HF_TOKEN not in message
    assert not (tmp_path / "models" / FLUX_DIR / "model_index.json").exists()


async def test_setup_lists_flux_with_its_licence_and_an_enable_button(hub, monkeypatch):
    from unittest.mock import MagicMock

    from discord.ext import commands

    from bot.backend import LocalBackend
    from bot.settings import Settings
    from cogs.setup import Setup, ToggleOptionalButton

    fake = MagicMock(spec=commands.Bot)
    fake.settings = Settings.load()
    fake.backend = LocalBackend(fake.settings)
    try:
        panel = await Setup(fake).panel()
    finally:
        await fake.backend.close()
    text = panel["content"]
    assert "FLUX.1-dev" in text and "Non-Commercial" in text and "<https://huggingface.co/black-forest-labs/FLUX.1-dev>" in text
    labels = [item.label for item in panel["view"].children if isinstance(item, ToggleOptionalButton)]
    assert "Enable FLUX.1-dev" in labels
