"""Tokens: checked against their service before they are kept, never shown unmasked."""

from __future__ import annotations

import logging
import socket

import pytest

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.state.store import SqliteStore
from modal_services.base_models.tokens import clear_token, get_token, mask, set_token, token_state
from tests.fakes.hf_server import FakeHub

GOOD_HF = "hf_AbCdEfGhIjKlMnOp1234"
GOOD_CIVITAI = "0123456789abcdef0123456789abcd99"


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    with FakeHub() as server:
        server.valid_tokens = {GOOD_HF, GOOD_CIVITAI}
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield server


@pytest.fixture
async def store(tmp_path):
    state = SqliteStore(tmp_path / "s.sqlite3")
    yield state
    await state.close()


def dead_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_mask():
    assert mask("abcdefghijkla1b2") == "••••a1b2"
    assert mask("short") == "••••"  # too short to show any of it
    assert mask(None) == "not set"


async def test_good_tokens_are_checked_then_stored(hub, store, caplog):
    caplog.set_level(logging.DEBUG)
    hf = await set_token(store, "hf", f"  {GOOD_HF}\n")
    civitai = await set_token(store, "civitai", f"Bearer {GOOD_CIVITAI}", civitai_api_base=hub.url)
    assert (hf.masked, hf.user, civitai.masked, civitai.user) == ("••••1234", "tester", "••••cd99", "tester")
    assert await get_token(store, "hf") == GOOD_HF and await get_token(store, "civitai") == GOOD_CIVITAI
    auth = [r["headers"].get("Authorization") for r in hub.requests]
    assert f"Bearer {GOOD_HF}" in auth and f"Bearer {GOOD_CIVITAI}" in auth
    assert [r["path"] for r in hub.requests] == ["/api/whoami-v2", "/api/v1/me"]
    assert GOOD_HF not in caplog.text and GOOD_CIVITAI not in caplog.text


@pytest.mark.parametrize("service", ["hf", "civitai"])
async def test_wrong_or_revoked_token_is_not_stored(hub, store, caplog, service):
    caplog.set_level(logging.DEBUG)
    await store.put(f"secret:{service}", {"token": "previous-token-kept-0000"})
    bad = "revoked-token-that-must-not-leak-42"
    with pytest.raises(ToolboxError) as caught:
        await set_token(store, service, bad, civitai_api_base=hub.url)
    assert caught.value.code is ErrorCode.INVALID_INPUT and "HTTP 401" in caught.value.message
    assert "nothing was stored" in caught.value.message
    assert await get_token(store, service) == "previous-token-kept-0000"
    for text in (str(caught.value), caught.value.message, repr(caught.value), caplog.text):
        assert bad not in text
    # No chained exception carrying the request (and its Authorization header) along.
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or caught.value.__suppress_context__


@pytest.mark.parametrize("service", ["hf", "civitai"])
async def test_unreachable_service_stores_nothing(store, monkeypatch, service):
    base = dead_port()
    monkeypatch.setenv("HF_ENDPOINT", base)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ToolboxError) as caught:
        await set_token(store, service, GOOD_HF, civitai_api_base=base)
    assert caught.value.code in (ErrorCode.DOWNLOAD_FAILED, ErrorCode.CIVITAI_UNAVAILABLE)
    assert "could not be reached" in caught.value.message and GOOD_HF not in str(caught.value)
    assert await store.get(f"secret:{service}") is None


@pytest.mark.parametrize("value", ["", "   ", "two words", "x" * 600, "tökén"])
async def test_malformed_tokens_are_refused_without_a_request(hub, store, value):
    with pytest.raises(ToolboxError) as caught:
        await set_token(store, "civitai", value, civitai_api_base=hub.url)
    assert caught.value.code is ErrorCode.INVALID_INPUT and hub.requests == []


async def test_environment_is_the_fallback(store, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_environment_zz99")
    state = await token_state(store, "hf")
    assert (state.source, state.masked) == ("env", "••••zz99")
    assert state.describe() == "Hugging Face: ••••zz99 (from the environment)"
    on_modal = await token_state(store, "hf", {"HF_TOKEN": "hf_from_environment_zz99", "MODAL_IS_REMOTE": "1"})
    assert on_modal.describe() == "Hugging Face: ••••zz99 (from the Modal secret)"
    await store.put("secret:hf", {"token": "hf_from_setup_token_ab12", "user": "me"})
    assert await get_token(store, "hf") == "hf_from_setup_token_ab12"
    assert (await token_state(store, "hf")).describe() == "Hugging Face: ••••ab12 (me) (set with /setup)"
    await clear_token(store, "hf")
    assert await get_token(store, "hf") == "hf_from_environment_zz99"
    assert (await token_state(store, "civitai")).describe() == "CivitAI: not set"
