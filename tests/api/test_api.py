"""The HTTP API through httpx's ASGI transport: the worker contract field by field, auth, caps, limits, errors, /jobs.

Jobs run on the local backend with stand-in engines (tests/fakes/engines.py);
the real-server and CLI cases are in test_api_server.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading

import httpx
import pytest
from PIL import Image

import bot.api.dependencies
import bot.api.routes.images
from bot.api import create_app
from bot.api.schema import MAX_BODY_BYTES, MAX_IMAGE_BYTES
from bot.backend import LocalBackend
from bot.settings import Settings
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.requests import CaptionRequest, GenerateRequest, UpscaleRequest
from modal_services.library.entries import Library, LibraryEntry
from tests.fakes.engines import SlowCaptionEngine, StandInImageEngine
from tests.fixtures.tiny_instantid import enable_instantid
from tests.images import encode, png_bytes

TOKEN = "api-test-token-5f1c9b"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def generate_engine(stand_in_engines):
    engine = StandInImageEngine()
    stand_in_engines.use(GenerateRequest, engine)
    return engine


@pytest.fixture
async def served(fast_progress, stand_in_engines):
    """served(**create_app options) -> (client with the right token, backend); all closed after the test."""
    opened = []

    async def serve(**options):
        settings = Settings.load()
        backend = LocalBackend(settings, engines=stand_in_engines)
        library = Library.for_backend(backend.store, True, settings.loras_dir, settings.models_dir)
        options.setdefault("concurrency", settings.api_concurrency)
        app = create_app(backend, library, options.pop("token", TOKEN), **options)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api", headers=AUTH)
        opened.append((client, lifespan))
        return client, backend

    yield serve
    for client, lifespan in opened:
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


@pytest.fixture
async def api(served):
    client, _ = await served()
    return client


def decode_png(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data, validate=True)))


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) <= {"error", "error_code", "details", "retry_after"}
    assert body["error_code"] == code and body["error"]
    return body


# -- POST /generate-image: the contract -------------------------------------------

async def test_generate_image_answers_the_contract_field_by_field(api, generate_engine):
    response = await api.post("/generate-image", json={
        "prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "width": 832, "height": 1216,
        "steps": 30, "cfg": 6.5, "seed": 42,
    })
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"image_base64", "image_size", "generation_time_seconds", "model_info", "metadata",
                         "nsfw_score", "safety"}
    # Judged by the tiny classifier that passes everything.
    assert 0 <= body["nsfw_score"] < 0.01
    assert body["safety"]["checked"] and body["safety"]["withheld"] == []
    image = decode_png(body["image_base64"])
    assert image.format == "PNG" and image.size == (832, 1216)
    assert body["image_size"] == [832, 1216]
    assert isinstance(body["generation_time_seconds"], float) and body["generation_time_seconds"] >= 0
    assert body["model_info"] == {"base_model": "Illustrious-XL-v2.0", "lora_applied": False, "lora_scale": None,
                                  "loras": []}
    # The base checkpoint's sampler: the request named none.
    assert body["metadata"] == {"seed_used": 42, "actual_steps": 30, "actual_cfg": 6.5, "seeds_used": [42],
                                "sampler": "Euler a"}
    [fields] = generate_engine.generated
    assert {key: fields[key] for key in ("prompt", "negative_prompt", "width", "height", "steps", "cfg", "seed")} == {
        "prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "width": 832, "height": 1216,
        "steps": 30, "cfg": 6.5, "seed": 42}


async def test_defaults_are_the_contracts(api, generate_engine):
    body = (await api.post("/generate-image", json={"prompt": "a cat"})).json()
    assert body["image_size"] == [1024, 1024]
    assert (body["metadata"]["actual_steps"], body["metadata"]["actual_cfg"]) == (28, 5.5)
    [fields] = generate_engine.generated
    assert fields["timeout"] == 60 and fields["count"] == 1
    assert body["metadata"]["seed_used"] == fields["seed"]  # drawn when omitted, and reported


async def test_count_4_returns_every_image_with_its_seed(api, generate_engine):
    body = (await api.post("/generate-image", json={"prompt": "a cat", "width": 512, "height": 512, "seed": 9,
                                                    "count": 4})).json()
    assert len(body["images_base64"]) == 4 and body["image_base64"] == body["images_base64"][0]
    assert body["metadata"]["seeds_used"] == [9, 10, 11, 12] and body["metadata"]["seed_used"] == 9
    colours = {decode_png(image).getpixel((0, 0)) for image in body["images_base64"]}
    assert len(colours) == 4


async def test_a_per_request_lora_url_is_forwarded_and_reported(api, generate_engine):
    url = "https://r2.example/loras/style.safetensors?X-Amz-Signature=abc"
    body = (await api.post("/generate-image", json={"prompt": "a cat", "lora_url": url, "lora_scale": 0.9,
                                                    "lora_sha256": "ab" * 32})).json()
    [fields] = generate_engine.generated
    assert (fields["lora_url"], fields["lora_scale"], fields["lora_sha256"]) == (url, 0.9, "ab" * 32)
    assert body["model_info"]["lora_applied"] is True and body["model_info"]["lora_scale"] == 0.9


async def test_a_reference_image_and_its_strengths_reach_the_worker_and_come_back(served, generate_engine):
    api, backend = await served()
    reference, pose = png_bytes(3000, 1500, seed=1), png_bytes(64, 64, seed=2)
    refused = await api.post("/generate-image", json={"prompt": "a portrait",
                                                      "reference_image_base64": base64.b64encode(pose).decode()})
    assert ("is not enabled: ask the operator to run `toolbox setup --enable instantid`"
            in assert_error(refused, 503, "MODELS_MISSING")["error"])
    assert generate_engine.generated == []
    await enable_instantid(backend.store)
    body = (await api.post("/generate-image", json={
        "prompt": "a portrait", "reference_image_base64": base64.b64encode(reference).decode(),
        "pose_image_base64": base64.b64encode(pose).decode(), "identity_strength": 1.2, "controlnet_strength": 0.4,
    })).json()
    [fields] = generate_engine.generated
    assert Image.open(io.BytesIO(fields["face_image"])).size == (1536, 768)  # shrunk: faces need no more
    assert Image.open(io.BytesIO(fields["pose_image"])).size == (64, 64)
    assert (fields["identity_strength"], fields["controlnet_strength"]) == (1.2, 0.4)
    assert body["face"] == {"faces_found": 1, "pose_faces_found": 1, "identity_strength": 1.2, "controlnet_strength": 0.4}
    # The job API takes the same fields.
    job = (await api.post("/jobs", json={"kind": "generate", "prompt": "again",
                                         "reference_image_base64": base64.b64encode(reference).decode()})).json()
    while (view := (await api.get(f"/jobs/{job['job_id']}")).json())["status"] != "done":
        await asyncio.sleep(0.02)
    assert view["result"]["face"]["faces_found"] == 1 and generate_engine.generated[-1]["pose_image"] is None


@pytest.mark.parametrize("fields, words", [
    ({"reference_image_base64": base64.b64encode(b"not a picture").decode()}, "reference_image_base64"),
    ({"pose_image_base64": base64.b64encode(png_bytes(8, 8)).decode()}, "only with a face"),
    ({"reference_image_base64": base64.b64encode(png_bytes(8, 8)).decode(), "identity_strength": 2}, "identity_strength"),
    ({"reference_image_base64": "%%% not base64"}, "reference_image_base64"),
])
async def test_bad_reference_images_are_400_and_start_nothing(served, generate_engine, fields, words):
    api, backend = await served()
    await enable_instantid(backend.store)
    response = await api.post("/generate-image", json={"prompt": "a portrait", **fields})
    body = assert_error(response, 400, "INVALID_INPUT")
    assert words in body["error"]
    assert generate_engine.generated == []


async def test_library_loras_are_resolved_by_name(served, generate_engine):
    client, backend = await served()
    settings = Settings.load()
    library = Library.for_backend(backend.store, True, settings.loras_dir, settings.models_dir)
    library.folder("lora").mkdir(parents=True)
    (library.folder("lora") / "ink_style.safetensors").write_bytes(b"weights")
    await library.add(LibraryEntry(name="Ink Style", file="ink_style.safetensors", type="lora", weight=0.7,
                                   trigger_words=["ink"]))
    body = (await client.post("/generate-image", json={"prompt": "a cat", "loras": [{"name": "Ink Style"}]})).json()
    [fields] = generate_engine.generated
    assert fields["loras"] == [{"name": "Ink Style", "file": "ink_style.safetensors", "weight": 0.7,
                                "trigger_words": ["ink"]}]
    assert body["model_info"] == {"base_model": "Illustrious-XL-v2.0", "lora_applied": True, "lora_scale": 0.7,
                                  "loras": [{"name": "Ink Style", "weight": 0.7}]}
    response = await client.post("/generate-image", json={"prompt": "a cat", "loras": [{"name": "no such lora"}]})
    assert_error(response, 400, "INVALID_INPUT")
    assert len(generate_engine.generated) == 1


@pytest.mark.parametrize("fields, code, words", [
    ({"prompt": ""}, "INVALID_PROMPT", "prompt"),
    ({"prompt": "x" * 1001}, "INVALID_PROMPT", "prompt"),
    ({}, "INVALID_PROMPT", "prompt"),
    ({"prompt": "a", "width": 1000}, "INVALID_INPUT", "multiple of 64"),
    ({"prompt": "a", "height": 2048}, "INVALID_INPUT", "height"),
    ({"prompt": "a", "steps": 10}, "INVALID_INPUT", "steps"),
    ({"prompt": "a", "cfg": 25}, "INVALID_INPUT", "cfg"),
    ({"prompt": "a", "count": 5}, "INVALID_INPUT", "count"),
    ({"prompt": "a", "seed": -1}, "INVALID_INPUT", "seed"),
    ({"prompt": "a", "timeout": 301}, "INVALID_INPUT", "timeout"),
    ({"prompt": "a", "lora_scale": 1.5}, "INVALID_INPUT", "lora_scale"),
    ({"prompt": "a", "lora_url": "http://plain.example/x.safetensors"}, "INVALID_INPUT", "https"),
    ({"prompt": "a", "lora_url": "file:///etc/passwd"}, "INVALID_INPUT", "lora_url"),
    ({"prompt": "a", "lora_sha256": "zz"}, "INVALID_INPUT", "lora_sha256"),
    ({"prompt": "a", "loras": [{"name": "a"}] * 4}, "INVALID_INPUT", "loras"),
    ({"prompt": "a", "stepz": 30}, "INVALID_INPUT", "stepz"),
])
async def test_invalid_requests_are_400_and_start_nothing(served, generate_engine, fields, code, words):
    client, backend = await served()
    body = assert_error(await client.post("/generate-image", json=fields), 400, code)
    assert words in body["error"] + body.get("details", "")
    assert generate_engine.generated == [] and await backend.store.keys("job:") == []


async def test_a_body_that_is_not_json_is_400(api, generate_engine):
    response = await api.post("/generate-image", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_error(response, 400, "INVALID_INPUT")


# -- auth -------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN},
                                     {"Authorization": f"Basic {TOKEN}"}])
async def test_a_missing_or_wrong_token_is_401_and_starts_nothing(served, generate_engine, headers):
    client, backend = await served()
    client.headers.pop("Authorization")
    for method, path, body in (("POST", "/generate-image", {"prompt": "a cat"}), ("POST", "/jobs", {"kind": "caption"}),
                               ("GET", "/jobs/abc", None), ("DELETE", "/jobs/abc", None)):
        response = await client.request(method, path, json=body, headers=headers)
        assert_error(response, 401, "PERMISSION_DENIED")
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert TOKEN not in response.text
    assert generate_engine.generated == [] and await backend.store.keys("job:") == []


async def test_the_token_is_compared_in_constant_time(api, generate_engine, monkeypatch):
    compared = []
    real = bot.api.dependencies.hmac.compare_digest
    monkeypatch.setattr(bot.api.dependencies.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    assert (await api.post("/generate-image", json={"prompt": "a cat"})).status_code == 200
    assert compared == [(TOKEN.encode(), TOKEN.encode())]


async def test_no_auth_serves_without_a_token(served, generate_engine):
    client, _ = await served(token=None)
    client.headers.pop("Authorization")
    assert (await client.post("/generate-image", json={"prompt": "a cat"})).status_code == 200


# -- the concurrency cap ----------------------------------------------------------

@pytest.fixture
def gated_engine(stand_in_engines):
    gate = threading.Event()
    engine = StandInImageEngine(gate=gate)
    stand_in_engines.use(GenerateRequest, engine)
    yield engine
    gate.set()


async def wait_for_status(client, job_id: str, status: str, seconds: float = 10.0, progressed: bool = False) -> dict:
    """The job's view once it has `status` (and, with `progressed`, has reported some progress)."""
    for _ in range(int(seconds / 0.02)):
        view = (await client.get(f"/jobs/{job_id}")).json()
        if view["status"] == status and (view["progress"] > 0 or not progressed):
            return view
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {status}: {view}")


async def test_the_fifth_job_in_flight_is_429_with_retry_after(api, gated_engine):
    accepted = [await api.post("/jobs", json={"kind": "generate", "prompt": f"cat {i}"}) for i in range(4)]
    assert [response.status_code for response in accepted] == [202] * 4
    refused = await api.post("/jobs", json={"kind": "generate", "prompt": "one more"})
    body = assert_error(refused, 429, "RATE_LIMITED")
    assert refused.headers["Retry-After"] == str(body["retry_after"]) and body["retry_after"] > 0
    # The synchronous call counts against the same cap.
    assert_error(await api.post("/generate-image", json={"prompt": "sync"}), 429, "RATE_LIMITED")
    gated_engine.gate.set()
    for response in accepted:
        await wait_for_status(api, response.json()["job_id"], "done")
    assert (await api.post("/jobs", json={"kind": "generate", "prompt": "after"})).status_code == 202


async def test_the_cap_is_a_setting(monkeypatch, gated_engine, backends_from_settings):
    from bot.api import api_for_settings

    monkeypatch.setenv("TOOLBOX_API_CONCURRENCY", "2")
    app = api_for_settings(Settings.load(), TOKEN)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api", headers=AUTH) as client:
            codes = [(await client.post("/jobs", json={"kind": "generate", "prompt": "a"})).status_code for _ in range(3)]
    assert codes == [202, 202, 429]
    monkeypatch.setenv("TOOLBOX_API_CONCURRENCY", "0")
    with pytest.raises(ToolboxError, match="TOOLBOX_API_CONCURRENCY"):
        Settings.load()


async def test_simultaneous_requests_cannot_overbook_the_cap(api, gated_engine):
    responses = await asyncio.gather(*(api.post("/jobs", json={"kind": "generate", "prompt": f"cat {i}"})
                                       for i in range(12)))
    assert sorted(response.status_code for response in responses) == [202] * 4 + [429] * 8


async def test_a_failed_or_cancelled_job_gives_its_slot_back(served, stand_in_engines):
    client, _ = await served(concurrency=1)
    engine = StandInImageEngine(fail_with=ToolboxError(ErrorCode.GENERATION_FAILED, "The sampler diverged."))
    stand_in_engines.use(GenerateRequest, engine)
    assert_error(await client.post("/generate-image", json={"prompt": "a"}), 500, "GENERATION_FAILED")
    engine.fail_with, engine.gate = None, threading.Event()
    try:
        job_id = (await client.post("/jobs", json={"kind": "generate", "prompt": "b"})).json()["job_id"]
        assert_error(await client.post("/jobs", json={"kind": "generate", "prompt": "c"}), 429, "RATE_LIMITED")
        cancelled = await client.delete(f"/jobs/{job_id}")
        assert cancelled.status_code == 200
        await wait_for_status(client, job_id, "cancelled")
        for _ in range(100):  # the slot comes back when the worker has stopped
            if (await client.post("/jobs", json={"kind": "generate", "prompt": "d"})).status_code == 202:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the slot never came back")
    finally:
        engine.gate.set()


# -- body limits --------------------------------------------------------------------

async def test_a_body_over_the_limit_is_413_before_it_is_read(served, generate_engine):
    client, backend = await served()
    oversized = b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}'
    body = assert_error(await client.post("/generate-image", content=oversized,
                                          headers={"Content-Type": "application/json"}), 413, "INVALID_INPUT")
    assert "MB" in body["error"]

    async def chunks():  # no Content-Length: the limit counts what arrives
        yield b'{"kind": "caption", "images_base64": ["'
        for _ in range(MAX_BODY_BYTES // 2**20 + 1):
            yield b"A" * 2**20
        yield b'"]}'

    streamed = await client.post("/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(streamed, 413, "INVALID_INPUT")
    assert generate_engine.generated == [] and await backend.store.keys("job:") == []


async def test_an_image_over_20_mb_is_refused_even_inside_the_body_limit(api, stand_in_engines):
    engine = SlowCaptionEngine(steps=1, delay=0)
    stand_in_engines.use(CaptionRequest, engine)
    too_big = base64.b64encode(b"\0" * (MAX_IMAGE_BYTES + 1)).decode()
    assert len(too_big) < MAX_BODY_BYTES
    body = assert_error(await api.post("/jobs", json={"kind": "caption", "images_base64": [too_big]}), 400,
                        "INVALID_INPUT")
    assert "20 MB" in body["error"] and engine.batches == []


async def test_images_that_are_not_images_are_400(api, stand_in_engines):
    engine = SlowCaptionEngine(steps=1, delay=0)
    stand_in_engines.use(CaptionRequest, engine)
    not_base64 = await api.post("/jobs", json={"kind": "caption", "images_base64": ["***"]})
    assert_error(not_base64, 400, "INVALID_INPUT")
    not_an_image = base64.b64encode(b"GIF89a but not really").decode()
    assert_error(await api.post("/jobs", json={"kind": "caption", "images_base64": [not_an_image]}), 400,
                 "INVALID_INPUT")
    assert engine.batches == []


# -- error statuses -----------------------------------------------------------------

@pytest.mark.parametrize("error, status, code", [
    (ToolboxError(ErrorCode.TIMEOUT, "Stopped after 60 s at step 20/28."), 504, "TIMEOUT"),
    (ToolboxError(ErrorCode.CUDA_OOM, "Out of GPU memory."), 500, "CUDA_OOM"),
    (ToolboxError(ErrorCode.LORA_DOWNLOAD_FAILED, "HTTP 403 from the LoRA URL."), 500, "LORA_DOWNLOAD_FAILED"),
    (RuntimeError("secret internals /home/x/.cache"), 500, "INTERNAL"),
])
async def test_worker_failures_map_to_statuses(api, stand_in_engines, error, status, code):
    stand_in_engines.use(GenerateRequest, StandInImageEngine(fail_with=error))
    body = assert_error(await api.post("/generate-image", json={"prompt": "a cat"}), status, code)
    assert "internals" not in body["error"] and "Traceback" not in str(body)


async def test_missing_models_are_503(api, stand_in_engines):
    stand_in_engines.use(GenerateRequest, StandInImageEngine(load_error=ToolboxError(ErrorCode.MODELS_MISSING, "Not installed: Illustrious.")))
    assert_error(await api.post("/generate-image", json={"prompt": "a cat"}), 503, "MODELS_MISSING")


async def test_a_job_past_its_wait_is_504_and_cancelled(served, gated_engine, monkeypatch):
    monkeypatch.setattr(bot.api.routes.images, "TIMEOUT_GRACE_SECONDS", 0)
    client, backend = await served()
    body = assert_error(await client.post("/generate-image", json={"prompt": "a cat", "timeout": 0.3}), 504, "TIMEOUT")
    assert "cancelled" in body["error"]
    [key] = await backend.store.keys("job:")
    await wait_for_status(client, key.removeprefix("job:"), "cancelled")


async def test_a_timeout_longer_than_the_hosts_http_limit_goes_to_jobs(served, generate_engine):
    client, _ = await served(sync_limit_seconds=140)
    body = assert_error(await client.post("/generate-image", json={"prompt": "a", "timeout": 200}), 400, "INVALID_INPUT")
    assert "/jobs" in body["error"] and generate_engine.generated == []
    assert (await client.post("/jobs", json={"kind": "generate", "prompt": "a", "timeout": 200})).status_code == 202


async def test_unknown_paths_and_kinds(api):
    assert_error(await api.get("/nope"), 404, "NOT_FOUND")
    assert_error(await api.post("/jobs", json={"kind": "train"}), 400, "INVALID_INPUT")
    assert_error(await api.get("/jobs/0123456789abcdef"), 404, "NOT_FOUND")


# -- /jobs for every kind -----------------------------------------------------------

async def test_jobs_runs_a_caption_and_keeps_its_result(api, stand_in_engines):
    engine = SlowCaptionEngine(steps=3, delay=0.01)
    stand_in_engines.use(CaptionRequest, engine)
    images = [base64.b64encode(png_bytes(40, 30)).decode(), base64.b64encode(png_bytes(64, 48, seed=1)).decode()]
    accepted = await api.post("/jobs", json={"kind": "caption", "images_base64": images, "style": "tags"})
    assert accepted.status_code == 202 and set(accepted.json()) == {"job_id"}, accepted.text
    view = await wait_for_status(api, accepted.json()["job_id"], "done")
    assert view["kind"] == "caption" and view["progress"] == 1.0 and view["stage"] == "done"
    assert view["result"] == {"captions": ["tags 40x30", "tags 64x48"]}
    assert (await api.get(f"/jobs/{view['job_id']}")).json()["result"] == view["result"]  # asked again: still there
    assert engine.batches == [2]


async def test_a_tags_caption_is_the_booru_taggers(api, install_tagger):
    from PIL import Image

    install_tagger("safe")  # and no caption model: the tags style reads only the tagger
    image = base64.b64encode(encode(Image.new("RGB", (64, 64), (0, 0, 255)))).decode()
    accepted = await api.post("/jobs", json={"kind": "caption", "images_base64": [image], "style": "tags"})
    view = await wait_for_status(api, accepted.json()["job_id"], "done")
    # The tiny "safe" tagger's character, general tags at 0.35 or more likeliest first, and rating.
    assert view["result"] == {"captions": ["hatsune miku, 1girl, solo, long hair, ^_^, smile, general"]}

async def test_jobs_runs_an_upscale(api, stand_in_engines):
    engine = StandInImageEngine()
    stand_in_engines.use(UpscaleRequest, engine)
    source = base64.b64encode(png_bytes(48, 32)).decode()
    accepted = await api.post("/jobs", json={"kind": "upscale", "image_base64": source, "scale": 2, "seed": 5,
                                             "prompt": "sharp"})
    view = await wait_for_status(api, accepted.json()["job_id"], "done")
    assert view["result"]["image_size"] == [96, 64] and decode_png(view["result"]["image_base64"]).size == (96, 64)
    [call] = engine.upscaled
    assert (call["scale"], call["seed"], call["prompt"], call["loras"]) == (2, 5, "sharp", [])


async def test_an_upscale_over_the_output_limit_is_refused_before_a_job(served, stand_in_engines):
    client, backend = await served()
    stand_in_engines.use(UpscaleRequest, StandInImageEngine())
    source = base64.b64encode(png_bytes(3000, 2000)).decode()
    assert_error(await client.post("/jobs", json={"kind": "upscale", "image_base64": source, "scale": 4}), 400,
                 "INVALID_INPUT")
    assert await backend.store.keys("job:") == []


async def test_a_generate_job_reports_progress_then_the_contract_body(api, gated_engine):
    job_id = (await api.post("/jobs", json={"kind": "generate", "prompt": "a cat", "seed": 3, "width": 512,
                                            "height": 768})).json()["job_id"]
    running = await wait_for_status(api, job_id, "running", progressed=True)
    assert 0 < running["progress"] < 1 and "result" not in running
    gated_engine.gate.set()
    done = await wait_for_status(api, job_id, "done")
    assert done["result"]["image_size"] == [512, 768] and done["result"]["metadata"]["seed_used"] == 3
    assert set(done["result"]) == {"image_base64", "image_size", "generation_time_seconds", "model_info", "metadata",
                                   "nsfw_score", "safety"}


async def test_a_failed_job_shows_its_error(api, stand_in_engines):
    stand_in_engines.use(GenerateRequest, StandInImageEngine(fail_with=ToolboxError(ErrorCode.LORA_LOAD_FAILED, "That LoRA is for SD 1.5.")))
    job_id = (await api.post("/jobs", json={"kind": "generate", "prompt": "a cat"})).json()["job_id"]
    view = await wait_for_status(api, job_id, "error")
    assert view["error"] == {"error": "That LoRA is for SD 1.5.", "error_code": "LORA_LOAD_FAILED"}


async def test_jobs_of_others_are_not_visible(served, stand_in_engines):
    client, backend = await served()
    stand_in_engines.use(CaptionRequest, SlowCaptionEngine(steps=1, delay=0))
    discord_job = await backend.submit(CaptionRequest.parse({"images": [png_bytes()], "style": "short"}),
                                       owner={"user_id": 1001})
    assert_error(await client.get(f"/jobs/{discord_job.id}"), 404, "NOT_FOUND")
    assert_error(await client.delete(f"/jobs/{discord_job.id}"), 404, "NOT_FOUND")
    await backend.result(discord_job.id)


# -- /health ------------------------------------------------------------------------

async def test_health_lists_models_services_and_versions_without_secrets(served, monkeypatch, generate_engine):
    monkeypatch.setenv("CIVITAI_TOKEN", "civitai-secret-value")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    client, _ = await served()
    client.headers.pop("Authorization")
    response = await client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["api_version"] == "1"
    # The name TOOLBOX_BACKEND and `toolbox status --json` use, not a class name.
    assert body["backend"] == Settings.load().backend == "local"
    assert {"ai-toolbox", "fastapi", "pydantic"} <= set(body["versions"])
    assert body["models"]["illustrious-xl"] == {"name": body["models"]["illustrious-xl"]["name"], "installed": False,
                                               "state": "missing"}
    assert body["services"] == {}
    for secret in ("civitai-secret-value", "hf_secret_value", TOKEN):
        assert secret not in response.text


async def test_the_published_schema_has_the_request_models(api):
    schema = (await api.get("/openapi.json")).json()
    generate = schema["components"]["schemas"]["GenerateImageRequest"]["properties"]
    assert generate["width"]["multipleOf"] == 64 and generate["steps"]["maximum"] == 50
    assert {"/generate-image", "/jobs", "/jobs/{job_id}", "/health"} <= set(schema["paths"])
