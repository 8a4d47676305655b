"""`toolbox generate --model flux`: locally on the LocalBackend, and with --api through a real HTTP API on 127.0.0.1."""

from __future__ import annotations

import asyncio

import pytest
from PIL import Image

import bot.api.client
import bot.core.following
from bot.api import api_for_settings
from bot.cli import main
from bot.settings import Settings
from modal_services.state.store import SqliteStore
from modal_services.jobs.requests import FluxGenerateRequest
from tests.servers import running_uvicorn
from tests.bot.test_flux_cog import enable_flux
from tests.fakes.engines import StandInImageEngine

TOKEN = "flux-cli-token-3e7a"


@pytest.fixture
def flux(backends_from_settings, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLBOX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(bot.core.following, "POLL_INTERVAL", 0.02)
    engine = StandInImageEngine(shrink=16)
    backends_from_settings.use(FluxGenerateRequest, engine)
    store = SqliteStore(Settings.load().state_path)
    asyncio.run(enable_flux(store))
    asyncio.run(store.close())
    return engine


def test_generate_model_flux_locally(flux, tmp_path, capsys):
    out = tmp_path / "fox.png"
    code = main(["generate", "a fox", "--model", "flux", "--aspect", "9:16 2MP", "--seed", "8", "--cfg", "2", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    (request,) = flux.generated
    assert (request["width"], request["height"], request["guidance"], request["seed"]) == (1088, 1920, 2.0, 8)
    assert Image.open(out).size == (1088 // 16, 1920 // 16)
    assert f"{out} (1088×1920, seed 8, FLUX.1-dev)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--model", "flux", "--negative", "blurry"], "Flux has no negative prompt"),
    (["--aspect", "1:1 2MP"], "made by Flux only"),
    (["--model", "flux", "--cfg", "15"], "guidance must be between 1 and 10"),
    (["--model", "flux", "--face", "me.png"], "A face photo works with SDXL only"),
    (["--model", "flux", "--identity-strength", "0.5"], "A face photo works with SDXL only"),
])
def test_flux_refusals_exit_2_and_start_nothing(flux, capsys, argv, words):
    assert main(["generate", "a fox", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_INPUT:") and words in err
    assert flux.generated == []


def test_generate_model_flux_through_the_api(flux, tmp_path, capsys, monkeypatch, fast_progress):
    monkeypatch.setenv("TOOLBOX_API_TOKEN", TOKEN)
    monkeypatch.setattr(bot.api.client, "POLL_SECONDS", 0.02)
    with running_uvicorn(api_for_settings(Settings.load(), TOKEN), max_seconds=60) as url:
        code = main(["generate", "a fox", "--model", "flux-dev", "--api", url, "--seed", "5", "--count", "2",
                     "--width", "512", "--height", "512", "-o", str(tmp_path / "fox.png")])
    assert code == 0, capsys.readouterr().err
    (request,) = flux.generated
    assert request["guidance"] == 3.5 and request["count"] == 2 and request["seed"] == 5
    printed = capsys.readouterr().out
    assert (tmp_path / "fox_2.png").is_file() and "seed 6, flux1-dev" in printed
