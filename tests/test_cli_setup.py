"""`toolbox setup` and `toolbox status` against the fake hub, through the local backend."""

from __future__ import annotations

import json

import pytest

from bot.cli import main
from modal_services import downloads
from tests.fakes.hf_server import FakeHub, serve_registry


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    with FakeHub() as server:
        serve_registry(server)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(downloads, "TICK_SECONDS", 0.05)
        monkeypatch.setattr(downloads, "_sleep", lambda seconds: None)
        yield server


def status(capsys) -> dict:
    assert main(["status", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_setup_only_some_then_status(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CIVITAI_TOKEN", "env-civitai-token-wxyz")
    assert main(["setup", "--only", "sdxl-base", "ip-adapter"]) == 0
    assert "Downloaded: ip-adapter, sdxl-base." in capsys.readouterr().out
    data = tmp_path / "data" / "models"
    assert (data / "ip-adapter" / "ip-adapter-plus_sdxl_vit-h.safetensors").is_file()
    assert (data / "sdxl-base" / "tokenizer_2" / "merges.txt").is_file()

    document = status(capsys)
    states = {model["key"]: model["state"] for model in document["models"]}
    assert states["sdxl-base"] == "present" and states["ip-adapter"] == "present"
    assert states["illustrious-xl"] == "missing" and document["active_download"] is None
    assert document["tokens"]["civitai"] == {"set": True, "masked": "••••wxyz", "source": "env", "user": None}
    assert "env-civitai-token-wxyz" not in json.dumps(document)

    # Present means the files too: a deleted file shows as missing again, and setup fetches it.
    (data / "ip-adapter" / "ip-adapter-plus_sdxl_vit-h.safetensors").unlink()
    states = {model["key"]: model for model in status(capsys)["models"]}
    assert states["ip-adapter"]["state"] == "missing" and "missing" in states["ip-adapter"]["detail"]
    assert main(["setup", "--only", "ip-adapter"]) == 0
    assert main(["setup", "--only", "ip-adapter"]) == 0
    assert "All requested base models are present." in capsys.readouterr().out


def test_status_text(hub, capsys, tmp_path):
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "illustrious-xl" in out and "missing" in out and "Hugging Face: not set" in out
    assert out.splitlines()[0] == f"data dir: {tmp_path / 'data'}"
    assert status(capsys)["data_dir"] == str(tmp_path / "data")


def test_unknown_key_is_usage_error(hub, capsys):
    assert main(["setup", "--only", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_INPUT: Unknown model 'nonsense'")


def test_failed_download_exits_1_with_code(hub, capsys):
    hub.fault("sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors", "corrupt")
    assert main(["setup", "--only", "ip-adapter"]) == 1
    err = capsys.readouterr().err
    assert "error: CHECKSUM_MISMATCH: 1 of 1 models failed (ip-adapter)" in err


def test_status_counts_unfinished_jobs(hub, capsys):
    import asyncio

    from bot.settings import Settings
    from modal_services.jobs import JobStatus, create_job, update_job
    from modal_services.state import SqliteStore

    async def seed():
        store = SqliteStore(Settings.load().state_path)
        running = await create_job(store, "caption")
        await update_job(store, running.id, status=JobStatus.RUNNING)
        await create_job(store, "caption")
        finished = await create_job(store, "upscale")
        await update_job(store, finished.id, status=JobStatus.DONE)
        await store.close()

    asyncio.run(seed())
    assert status(capsys)["jobs"] == {"caption": {"queued": 1, "running": 1}}
    assert main(["status"]) == 0
    assert "jobs caption: 1 running, 1 queued" in capsys.readouterr().out
