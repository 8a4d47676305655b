"""What admins do through the front ends, then the deployment left alone (8 or 40 days, an emptied Dict, a
deleted state.sqlite3: see `forget` in conftest.py): models imported from CivitAI, the active checkpoint
chosen with `toolbox models use` or `/models checkpoint`, InstantID enabled with `toolbox setup --enable`.
The library, a second import of the same version, `toolbox status`, `/status` and the jobs answer as set,
from the files alone. And a library copied to another machine (the data dir's loras/ and models/ only) is
the library there.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil

import pytest

from bot.backend import LocalBackend
from bot.cli import main
from bot.core.library import library_for
from bot.settings import Settings
from modal_services.base_models import downloads
from modal_services.base_models.registry import INSTANTID_MODELS
from modal_services.jobs.requests import GenerateRequest, ModelImportRequest
from tests.fakes.discord_fakes import ephemeral_error, fake_interaction, invoke
from tests.fakes.engines import StandInImageEngine
from tests.fixtures import tiny_loras
from tests.images import png_bytes
from tests.library.test_library import put_model
from tests.state.conftest import FRONT_END_SPELLS, api_client, cli, finished_job
from tests.state.test_idle_deployment import install_base_model

pytest.importorskip("torch")

LORA = tiny_loras.to_bytes(tiny_loras.sdxl_kohya())
CHECKPOINT = tiny_loras.to_bytes(tiny_loras.sdxl_checkpoint())
LORA_FILE, CHECKPOINT_FILE = "detail_tweaker_xl.safetensors", "noobai.safetensors"


# ------------------------------------------------------------------ models, jobs and commands


@pytest.fixture
def civitai(fake_civitai):
    """The fake CivitAI serving a LoRA (model 1, version 11) and a checkpoint (model 2, version 21)."""
    fake_civitai.add_model(1, 11, LORA, trained_words=["detailed", "sharp focus"], file_name=LORA_FILE)
    fake_civitai.add_model(2, 21, CHECKPOINT, type="Checkpoint", name="NoobAI XL", file_name=CHECKPOINT_FILE,
                           base_model="NoobAI", trained_words=[])
    return fake_civitai


def import_both(capsys) -> dict[str, dict]:
    """Both imported with `toolbox models import`, the LoRA's weight then edited; the library by file."""
    cli(capsys, "models", "import", "https://civitai.com/models/1", "--yes", "--json")
    cli(capsys, "models", "import", "v:21", "--yes", "--json")
    cli(capsys, "models", "edit", "Detail Tweaker XL", "--weight", "0.7")
    return {entry["file"]: entry for entry in cli(capsys, "models", "list", "--json")}


def check_as_imported(library: dict[str, dict]) -> None:
    lora, checkpoint = library[LORA_FILE], library[CHECKPOINT_FILE]
    assert (lora["type"], lora["trigger_words"], lora["weight"], lora["base_model"]) == (
        "lora", ["detailed", "sharp focus"], 0.7, "SDXL 1.0")
    assert (lora["civitai_model_id"], lora["civitai_version_id"], lora["sha256"]) == (
        1, 11, hashlib.sha256(LORA).hexdigest())
    assert (checkpoint["type"], checkpoint["name"], checkpoint["base_model"]) == ("checkpoint", "NoobAI XL", "NoobAI")
    assert (checkpoint["civitai_model_id"], checkpoint["civitai_version_id"], checkpoint["sha256"]) == (
        2, 21, hashlib.sha256(CHECKPOINT).hexdigest())
    assert not lora["missing"] and not checkpoint["missing"]


async def api_job(settings: Settings, engines, job: dict) -> dict:
    """`job` through the HTTP API, to its finished view."""
    async with api_client(settings, engines) as client:
        return await finished_job(client, job)


async def install_on_a_backend(settings: Settings, key: str) -> None:
    """Base model `key` as a finished download leaves it: its files and its manifest."""
    backend = LocalBackend(settings)
    try:
        await install_base_model(backend.store, settings, key)
    finally:
        await backend.close()


def checkpoint_command(toolbox_bot):
    return toolbox_bot.tree.get_command("models").get_command("checkpoint")


# ------------------------------------------------------------------ CivitAI imports


async def import_on_a_backend(settings: Settings, ref: str) -> dict:
    """An import job as the /models import button and `toolbox setup --only <starter>` submit it."""
    backend = LocalBackend(settings)
    try:
        job = await backend.submit(ModelImportRequest.parse({"ref": ref, "api_base": settings.civitai_api_base}))
        return await backend.result(job.id)
    finally:
        await backend.close()


@pytest.mark.parametrize("forget", FRONT_END_SPELLS, indirect=True)
def test_imported_models_are_in_the_library_after_the_loss(forget, civitai, capsys):
    settings = Settings.load()
    before = import_both(capsys)
    check_as_imported(before)

    forget()
    after = {entry["file"]: entry for entry in cli(capsys, "models", "list", "--json")}
    assert after == before
    # Imported again, by the CLI and by an import job: found in the library, not downloaded again.
    for ref, file in (("https://civitai.com/models/1", LORA_FILE), ("v:21", CHECKPOINT_FILE)):
        assert main(["models", "import", ref, "--yes", "--json"]) == 0
        out, err = capsys.readouterr()
        assert "already installed" in err and json.loads(out) == before[file]
        result = asyncio.run(import_on_a_backend(settings, ref))
        assert result["already_installed"] is True and result["entry"]["sha256"] == before[file]["sha256"]
    assert len(civitai.hits("/storage/")) == 2
    # The sidecars beside the files carry what A1111 reads from them.
    lora_sidecar = json.loads((settings.loras_dir / "loras" / "detail_tweaker_xl.json").read_text())
    assert (lora_sidecar["activation text"], lora_sidecar["preferred weight"]) == ("detailed, sharp focus", 0.7)
    assert lora_sidecar["sd version"] == "SDXL" and lora_sidecar["toolbox"]["civitai_version_id"] == 11
    checkpoint_sidecar = json.loads((settings.loras_dir / "checkpoints" / "noobai.json").read_text())
    assert checkpoint_sidecar["toolbox"]["sha256"] == before[CHECKPOINT_FILE]["sha256"]


# ------------------------------------------------------------------ the active checkpoint, chosen in a front end


@pytest.mark.parametrize("forget", FRONT_END_SPELLS, indirect=True)
def test_a_checkpoint_chosen_with_the_cli_is_the_one_jobs_get_after_the_loss(forget, civitai, backends_from_settings,
                                                                            capsys):
    engine = backends_from_settings.use(GenerateRequest, StandInImageEngine(shrink=8))
    settings = Settings.load()
    cli(capsys, "models", "import", "v:21", "--yes")
    assert "active checkpoint: NoobAI XL" in cli(capsys, "models", "use", "NoobAI XL")

    forget()
    assert cli(capsys, "status", "--json")["active_checkpoint"] == CHECKPOINT_FILE
    assert f"active checkpoint: {CHECKPOINT_FILE}" in cli(capsys, "status")
    listed = cli(capsys, "models", "list")
    assert "* checkpoint NoobAI XL" in listed
    job = asyncio.run(api_job(settings, backends_from_settings, {"kind": "generate", "prompt": "a fox", "seed": 3}))
    assert engine.generated[-1]["checkpoint"] == job["result"]["model_info"]["base_model"] == CHECKPOINT_FILE


@pytest.mark.parametrize("forget", FRONT_END_SPELLS, indirect=True)
async def test_a_checkpoint_chosen_in_discord_is_the_one_jobs_get_after_the_loss(forget, make_toolbox_bot,
                                                                                stand_in_engines, fast_progress):
    engine = stand_in_engines.use(GenerateRequest, StandInImageEngine(shrink=8))
    cogs = ("cogs.models", "cogs.generate", "cogs.jobs")
    toolbox_bot = await make_toolbox_bot(*cogs)
    await put_model(library_for(toolbox_bot.settings, toolbox_bot.backend.store), CHECKPOINT_FILE, "checkpoint",
                    name="NoobAI XL", base_model="NoobAI")
    switch = fake_interaction(admin=True, operator=True)
    await invoke(toolbox_bot, checkpoint_command(toolbox_bot), switch, "NoobAI XL")
    assert "Active checkpoint: **NoobAI XL**" in switch.calls.send_message.await_args.args[0]
    await toolbox_bot.backend.close()

    forget()
    restarted = await make_toolbox_bot(*cogs)
    status = fake_interaction()
    await invoke(restarted, restarted.tree.get_command("status"), status)
    assert "**Active checkpoint**: NoobAI XL" in status.calls.edit_original_response.await_args.kwargs["content"]
    shown = fake_interaction()
    await invoke(restarted, checkpoint_command(restarted), shown)
    assert shown.calls.send_message.await_args.args[0] == "Active checkpoint: **NoobAI XL**"
    generate = fake_interaction()
    await invoke(restarted, restarted.tree.get_command("generate"), generate, "a red fox")
    assert ephemeral_error(generate) is None and engine.generated[-1]["checkpoint"] == CHECKPOINT_FILE


# ------------------------------------------------------------------ a library copied to another machine


def test_a_library_copied_to_another_machine_is_the_library_there(civitai, capsys, tmp_path, monkeypatch):
    """Only the model files travel, with their sidecars and manifests (loras/ and models/ of the data dir):
    no state.sqlite3, no records/."""
    settings = Settings.load()
    before = import_both(capsys)
    asyncio.run(install_on_a_backend(settings, "sdxl-vae"))
    elsewhere = tmp_path / "another machine"
    for folder in ("loras", "models"):
        shutil.copytree(settings.data_dir / folder, elsewhere / folder)
    monkeypatch.setenv("TOOLBOX_DATA_DIR", str(elsewhere))

    scan = cli(capsys, "models", "scan", "--json")
    assert (scan["untracked"], scan["missing"], scan["adopted"], scan["failed"]) == ([], [], [], [])
    listed = {entry["file"]: entry for entry in cli(capsys, "models", "list", "--json")}
    check_as_imported(listed)
    assert listed.keys() == before.keys()
    for file, entry in listed.items():
        folder = "loras" if entry["type"] == "lora" else "checkpoints"
        assert entry.pop("path") == str(elsewhere / "loras" / folder / file)
        assert entry == {key: value for key, value in before[file].items() if key != "path"}
    states = {model["key"]: model["state"] for model in cli(capsys, "status", "--json")["models"]}
    assert states["sdxl-vae"] == "present" and states["sdxl-base"] == "missing"


# ------------------------------------------------------------------ an optional model, enabled with the CLI


@pytest.mark.parametrize("forget", FRONT_END_SPELLS, indirect=True)
def test_an_optional_model_enabled_with_the_cli_stays_enabled_after_the_loss(forget, hub, backends_from_settings,
                                                                            capsys, monkeypatch):
    """`toolbox setup --enable` InstantID, with a base model downloaded from the hub in the same run. InstantID's
    own files are laid out as a finished download leaves them: the registry pins their hashes, which no fake
    hub can serve."""
    monkeypatch.setattr(downloads, "TICK_SECONDS", 0.05)
    engine = backends_from_settings.use(GenerateRequest, StandInImageEngine(shrink=8))
    settings = Settings.load()
    for key in INSTANTID_MODELS:
        asyncio.run(install_on_a_backend(settings, key))
    enabled = cli(capsys, "setup", "--enable", *INSTANTID_MODELS, "--only", "sdxl-vae")
    assert "Enabled InstantID" in enabled and "Downloaded: sdxl-vae." in enabled
    downloaded = len(hub.body_requests("/resolve/"))

    forget()
    status = cli(capsys, "status", "--json")
    states = {model["key"]: model["state"] for model in status["models"]}
    for key in INSTANTID_MODELS:
        assert status["optional_models"][key]["enabled"]["by"] == "`toolbox setup` on the command line"
    assert all(states[key] == "present" for key in (*INSTANTID_MODELS, "sdxl-vae"))
    # What the hub gave is not fetched again.
    assert "All requested base models are present." in cli(capsys, "setup", "--only", "sdxl-vae")
    assert len(hub.body_requests("/resolve/")) == downloaded > 0
    # A face job needs InstantID enabled and downloaded: it runs.
    face = base64.b64encode(png_bytes(64, 64, seed=4)).decode()
    job = asyncio.run(api_job(settings, backends_from_settings, {"kind": "generate", "prompt": "a portrait",
                                                                 "seed": 5, "reference_image_base64": face}))
    assert job["result"]["face"]["faces_found"] >= 1 and engine.generated[-1]["face_image"] is not None
