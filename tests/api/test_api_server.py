"""The HTTP API over real HTTP: uvicorn on 127.0.0.1, `toolbox serve`, and `toolbox generate --api` against it."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

import bot.api.client
from bot.api import api_for_settings
from bot.cli import main
from bot.settings import Settings
from modal_services.jobs.requests import GenerateRequest
from tests.fakes.engines import StandInImageEngine
from tests.servers import LOOPBACK, running_uvicorn

TOKEN = "server-test-token-81d2"


@pytest.fixture
def generate_engine(backends_from_settings):
    engine = StandInImageEngine()
    backends_from_settings.use(GenerateRequest, engine)
    return engine


@pytest.fixture
def api_url(fast_progress, generate_engine, monkeypatch):
    """The API with a stand-in generate engine, served by uvicorn; TOOLBOX_API_TOKEN set for the CLI."""
    monkeypatch.setenv("TOOLBOX_API_TOKEN", TOKEN)
    monkeypatch.setattr(bot.api.client, "POLL_SECONDS", 0.02)
    with running_uvicorn(api_for_settings(Settings.load(), TOKEN), max_seconds=60) as url:
        yield url


def test_the_contract_over_real_http(api_url):
    with httpx.Client(base_url=api_url, timeout=30) as client:
        refused = client.post("/generate-image", json={"prompt": "a cat"})
        assert refused.status_code == 401 and refused.json()["error_code"] == "PERMISSION_DENIED"
        response = client.post("/generate-image", json={"prompt": "a cat", "width": 640, "height": 512, "seed": 5},
                               headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200 and response.headers["content-type"] == "application/json"
        body = response.json()
        assert body["image_size"] == [640, 512] and body["metadata"]["seed_used"] == 5
        assert Image.open(io.BytesIO(base64.b64decode(body["image_base64"]))).size == (640, 512)
        assert client.get("/health").json()["status"] == "ok"


def test_toolbox_generate_api_writes_the_images_and_prints_the_seeds(api_url, tmp_path, capsys):
    output = tmp_path / "cat.png"
    code = main(["generate", "a cat", "--api", api_url, "--seed", "7", "--count", "2", "--width", "512",
                 "--height", "768", "-o", str(output)])
    out = capsys.readouterr().out
    assert code == 0
    for index, seed in ((1, 7), (2, 8)):
        path = tmp_path / f"cat_{index}.png"
        assert Image.open(path).size == (512, 768)
        assert f"{path} (512×768, seed {seed}, Illustrious-XL-v2.0)" in out


def test_toolbox_generate_api_sends_the_face_and_pose_photos(api_url, generate_engine, tmp_path, capsys):
    import asyncio

    from modal_services.state.store import SqliteStore
    from tests.fixtures.tiny_instantid import enable_instantid

    async def enable():
        store = SqliteStore(Settings.load().state_path)
        await enable_instantid(store)
        await store.close()

    asyncio.run(enable())
    face, pose = tmp_path / "me.jpg", tmp_path / "pose.png"
    Image.new("RGB", (2400, 1600), (200, 150, 120)).save(face, format="JPEG")
    Image.new("RGB", (300, 400), (20, 30, 40)).save(pose)
    code = main(["generate", "a portrait", "--api", api_url, "--face", str(face), "--pose", str(pose),
                 "--identity-strength", "1.2", "--seed", "4", "--width", "512", "--height", "512",
                 "-o", str(tmp_path / "out.png")])
    assert code == 0, capsys.readouterr().err
    [fields] = generate_engine.generated
    assert Image.open(io.BytesIO(fields["face_image"])).size == (1536, 1024)
    assert Image.open(io.BytesIO(fields["pose_image"])).size == (300, 400)
    assert fields["identity_strength"] == 1.2 and (tmp_path / "out.png").is_file()


def test_toolbox_generate_api_default_name_carries_the_seed(api_url, tmp_path, capsys):
    assert main(["generate", "a cat", "--api", api_url, "--seed", "11", "--width", "512", "--height", "512"]) == 0
    assert (tmp_path / "generated_11.png").is_file() and "seed 11" in capsys.readouterr().out


def test_toolbox_generate_api_errors_are_one_line(api_url, tmp_path, capsys, monkeypatch):
    assert main(["generate", "a cat", "--api", api_url, "--steps", "5"]) == 2  # refused here, before the call
    assert capsys.readouterr().err.startswith("error: INVALID_INPUT: Steps must be between 20 and 50")
    monkeypatch.setenv("TOOLBOX_API_TOKEN", "wrong")
    assert main(["generate", "a cat", "--api", api_url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: PERMISSION_DENIED: Wrong token.") and "wrong" not in err.replace("Wrong", "")
    assert main(["generate", "a cat", "--api", api_url, "-o", str(tmp_path / "no" / "such" / "x.png")]) == 2
    assert "there is no folder" in capsys.readouterr().err
    assert list(tmp_path.glob("*.png")) == []


def test_toolbox_generate_api_unreachable_is_backend_unavailable(capsys):
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens there
    assert main(["generate", "a cat", "--api", f"http://{LOOPBACK}:{port}"]) == 1
    assert capsys.readouterr().err.startswith("error: BACKEND_UNAVAILABLE: Could not reach the API")


@pytest.mark.parametrize("argv, words", [
    (["serve"], "TOOLBOX_API_TOKEN"),
    (["serve", "--host", "0.0.0.0"], "TOOLBOX_API_TOKEN"),
    (["serve", "--host", "0.0.0.0", "--no-auth"], "--no-auth is only allowed with --host 127.0.0.1"),
])
def test_serve_refuses_to_start_unprotected(argv, words, capsys, monkeypatch):
    import bot.api.server

    monkeypatch.setattr(bot.api.server, "run_api", lambda *args, **kwargs: pytest.fail("the server started"))
    assert main(argv) == 2
    assert words in capsys.readouterr().err


def test_serve_hands_the_api_to_uvicorn_with_the_limits(monkeypatch):
    import bot.api.server

    started = []
    monkeypatch.setattr(bot.api.server, "run_api",
                        lambda app, sock, limits: started.append((app, sock.getsockname(), limits)))
    monkeypatch.setenv("TOOLBOX_API_TOKEN", TOKEN)
    monkeypatch.setenv("TOOLBOX_API_CONNECTIONS_PER_CLIENT", "7")
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
    assert main(["serve", "--host", "0.0.0.0", "--port", str(port)]) == 0
    [(app, address, limits)] = started
    assert address == ("0.0.0.0", port) and app.title == "AI Toolbox"
    assert (limits.connections_per_client, limits.header_timeout, limits.min_body_rate) == (7, 30, 8 * 1024)


def test_toolbox_serve_no_auth_runs_on_loopback(tmp_path):
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "TOOLBOX_DATA_DIR": str(tmp_path / "data")}
    env.pop("TOOLBOX_API_TOKEN", None)
    server = subprocess.Popen([str(Path(sys.executable).parent / "toolbox"), "serve", "--no-auth", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"http://{LOOPBACK}:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read().decode()
                time.sleep(0.1)
        assert health.status_code == 200 and health.json()["backend"] == "local"
        assert httpx.post(f"http://{LOOPBACK}:{port}/jobs", json={"kind": "caption"}, timeout=5).status_code == 400
    finally:
        server.terminate()
        server.wait(timeout=10)
