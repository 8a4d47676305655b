"""`toolbox generate --remix`: locally on the LocalBackend, and with --api through a real HTTP API on 127.0.0.1,
against the fake CivitAI's images endpoint."""

from __future__ import annotations

import pytest

import bot.api.client
import bot.core.following
from bot.api import api_for_settings
from bot.cli import main
from bot.settings import Settings
from modal_services.jobs.requests import GenerateRequest
from modal_services.library import civitai as civitai_module
from tests.fakes.civitai_server import FakeCivitai
from tests.fakes.engines import StandInImageEngine
from tests.library.test_civitai_images import GENERATOR_META
from tests.servers import running_uvicorn

IMAGE = 9173928
TOKEN = "remix-cli-token-81b2"


@pytest.fixture
def civitai(monkeypatch):
    server = FakeCivitai().start()
    monkeypatch.setenv("CIVITAI_API_BASE", server.base)
    monkeypatch.setattr(civitai_module, "backoff_delay", lambda failures: 0.0)
    server.add_image(IMAGE, GENERATOR_META)
    yield server
    server.stop()


@pytest.fixture
def engine(backends_from_settings, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLBOX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(bot.core.following, "POLL_INTERVAL", 0.02)
    return backends_from_settings.use(GenerateRequest, StandInImageEngine(shrink=16))


def test_remix_locally_uses_the_published_settings(civitai, engine, tmp_path, capsys):
    out = tmp_path / "remix.png"
    code = main(["generate", "--remix", f"https://civitai.com/images/{IMAGE}", "--count", "2", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    [request] = engine.generated
    assert request["prompt"] == GENERATOR_META["prompt"] and request["count"] == 2
    assert (request["width"], request["height"], request["steps"], request["cfg"], request["seed"]) == \
        (832, 1216, 28, 5.5, 2817340411)
    assert f"Remix of CivitAI image {IMAGE} (https://civitai.com/images/{IMAGE})" in captured.err
    assert "Not in the library, left out: CivitAI model version 2247497." in captured.err
    assert (tmp_path / "remix_2.png").is_file() and "seed 2817340412" in captured.out


@pytest.mark.parametrize("argv, code, words", [
    (["--remix", "https://civitai.com/models/5"], 2, "INVALID_INPUT: `https://civitai.com/models/5` is not a CivitAI image"),
    (["--remix", "404404"], 1, "CIVITAI_NOT_FOUND: CivitAI shows no image 404404"),
    ([], 2, "INVALID_PROMPT: Give a prompt, or a CivitAI image to remix (--remix)."),
])
def test_bad_remixes_start_nothing(civitai, engine, capsys, argv, code, words):
    assert main(["generate", *argv]) == code
    assert words in capsys.readouterr().err
    assert engine.generated == []


def test_remix_through_the_api(civitai, engine, tmp_path, capsys, monkeypatch, fast_progress):
    monkeypatch.setenv("TOOLBOX_API_TOKEN", TOKEN)
    monkeypatch.setattr(bot.api.client, "POLL_SECONDS", 0.02)
    with running_uvicorn(api_for_settings(Settings.load(), TOKEN), max_seconds=60) as url:
        code = main(["generate", "a lighthouse", "--remix", str(IMAGE), "--api", url, "--seed", "5",
                     "-o", str(tmp_path / "remix.png")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    [request] = engine.generated
    assert (request["prompt"], request["seed"], request["width"], request["steps"]) == ("a lighthouse", 5, 832, 28)
    assert (tmp_path / "remix.png").is_file() and f"Remix of CivitAI image {IMAGE}" in captured.out
