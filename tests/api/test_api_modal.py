"""The HTTP API as a web endpoint of the Modal app, offline: its wiring, and its app on ModalBackend over the fakes."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest

from tests.images import png_bytes

TOKEN = "modal-api-token-3b7e"


def test_the_api_is_a_cpu_web_endpoint_with_its_secret(app_module):
    options = app_module.recorded_options["api"]
    assert "gpu" not in options and options["image"] is app_module.bot_image
    assert options["secrets"] == [app_module.api_secret]
    # One container keeps each token's cap in one place; it serves many requests at once.
    assert options["max_containers"] == 1
    assert app_module.api._is_web_endpoint()
    assert app_module.API_SYNC_LIMIT_SECONDS < 150 <= options["timeout"]


@pytest.fixture
async def endpoint(app_module, modal_deployment, monkeypatch, fast_progress):
    """The endpoint's FastAPI app as its container builds it, on the faked deployment."""
    monkeypatch.setenv("TOOLBOX_API_TOKEN", TOKEN)
    app = app_module.api._raw_f_()
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://modal",
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            yield client


async def test_a_caption_job_spawns_the_gpu_class_and_its_result_comes_back(endpoint, modal_deployment):
    image = base64.b64encode(png_bytes()).decode()
    accepted = await endpoint.post("/jobs", json={"kind": "caption", "images_base64": [image], "style": "tags"})
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    for _ in range(500):
        view = (await endpoint.get(f"/jobs/{job_id}")).json()
        if view["status"] == "done":
            break
        await asyncio.sleep(0.01)
    assert view["result"] == {"captions": ["tags caption 0"]}
    [(_, method, (spawned_id, payload))] = modal_deployment.spawned
    assert method == "CaptionService.caption" and spawned_id == job_id and payload["style"] == "tags"


async def test_the_sync_call_is_bounded_below_modals_http_limit(endpoint):
    response = await endpoint.post("/generate-image", json={"prompt": "a cat", "timeout": 200})
    assert response.status_code == 400 and "/jobs" in response.json()["error"]


def test_an_empty_token_stops_the_endpoint_from_starting(app_module, modal_deployment, monkeypatch):
    from modal_services.errors import ToolboxError

    monkeypatch.setenv("TOOLBOX_API_TOKEN", " ")
    with pytest.raises(ToolboxError, match="TOOLBOX_API_TOKEN"):
        app_module.api._raw_f_()
