"""A deployment nobody uses for a while: every feature answers as before once the live store forgot.

A `modal.Dict` forgets an entry after 7 days without a read or write (`ExpiringStore` keeps that
rule on a clock the test moves). The toolbox is used as people use it (models added and edited,
the active checkpoint chosen, server settings, tokens, an optional model enabled, base models
installed, results with buttons), then left alone for 8 or 40 days, or its Dict is emptied at once
(a fresh Dict over existing volumes), and everything is asked again: through the product's own
modules on `DurableStore(ExpiringStore(), local_homes(data dir))`, through the CLI and the HTTP API,
and through the Discord cogs. Locally the live store is `state.sqlite3`: deleting it (with its -wal
and -shm) is the same loss, and the records' files alone must bring everything back.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json

import pytest

from bot.backend import LocalBackend
from bot.core.library import library_for
from bot.guild_settings import GuildSettings, load_guild_settings, save_guild_settings
from bot.settings import Settings
from bot.setup_download import checked_states
from cogs.generate import encode_photos
from cogs.settings import describe as describe_settings
from cogs.setup import render_panel
from modal_services.base_models.downloads import DownloadEngine
from modal_services.base_models.optional_models import enabled_models, enabled_record, set_enabled, setup_entries
from modal_services.base_models.registry import BASE_MODELS, INSTANTID_MODELS, optional_entries
from modal_services.base_models.states import missing_models
from modal_services.base_models.tokens import SERVICES, get_token, set_token, token_state
from modal_services.jobs.requests import GenerateRequest
from modal_services.layout import Layout
from modal_services.state.durable import DurableStore, local_homes, volume_homes
from modal_services.state.keys import (
    caption_prompt_key,
    generate_faces_key,
    generate_params_key,
    manifest_key,
    upscale_params_key,
)
from modal_services.state.reconcile import ReconcileReport
from tests.fakes.discord_fakes import ephemeral_error, fake_interaction, invoke
from tests.fakes.engines import StandInImageEngine
from tests.fakes.expiring_store import ExpiringStore
from tests.fakes.modal_fakes import fake_volumes
from tests.bot.buttons import press
from tests.images import png_bytes
from tests.library.test_library import put_model
from tests.state.conftest import (
    FRONT_END_SPELLS,
    GOOD_CIVITAI,
    GOOD_HF,
    IDLE_SPELLS,
    api_client,
    cli,
    finished_job,
)

GUILD, OTHER_GUILD, ADMIN = 2002, 4004, 42  # GUILD: where the fake interactions come from
ACCEPTED_BY = f"alice ({ADMIN})"
# Base models laid out as installed (the NSFW classifier's folder is the stand-in engines'; Flux stays off).
INSTALLED = [key for key, entry in BASE_MODELS.items()
             if key != "nsfw-classifier" and (entry.optional is None or key in INSTANTID_MODELS)]
JOB = "0123456789abcdef"
KEPT_GENERATE = {"prompt": "a lighthouse", "width": 1024, "height": 1024, "count": 2, "steps": 30, "seed": 7,
                 "negative": "blurry", "aspect": "1:1", "model": "sdxl", "cfg": 5.5, "identity_strength": None,
                 "loras": [{"name": "ink_style.safetensors", "weight": 0.65}]}
KEPT_UPSCALE = {"scale": 2.0, "prompt": "sharp", "negative": None, "creativity": 0.3, "seed": 5,
                "tile_captions": False, "loras": []}
KEPT_PHOTOS = encode_photos({"face": png_bytes(32, 32, seed=3), "pose": None})
RESULT_PARAMS = {generate_params_key(JOB): KEPT_GENERATE, upscale_params_key(JOB): KEPT_UPSCALE,
                 generate_faces_key(JOB): KEPT_PHOTOS, caption_prompt_key(JOB): "a lighthouse on a cliff, dusk"}


# ------------------------------------------------------------------ using the toolbox


async def install_base_model(store, settings: Settings, key: str) -> None:
    """A base model's files in its folder and the manifest a finished download writes for them."""
    entry = BASE_MODELS[key]
    folder = DownloadEngine(Layout(settings.models_dir, settings.loras_dir, store)).folder(entry)
    folder.mkdir(parents=True, exist_ok=True)
    data = f"weights of {key}".encode()
    (folder / "weights.safetensors").write_bytes(data)
    files = {"weights.safetensors": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "git_sha1": None}}
    await store.put(manifest_key(key), {"key": key, "complete": True, "files": files, "size_bytes": len(data),
                                        "source": "org/repo", "revision": "abc", "completed_at": 1.0})


async def use_the_toolbox(store, settings: Settings, hub_url: str) -> None:
    """What a deployment's admins do in its first days."""
    library = library_for(settings, store)
    await put_model(library, "ink_style.safetensors", name="Ink Style", trigger_words=["ink"])
    await put_model(library, "soft_light.safetensors", name="Soft Light", trigger_words=["glow"], weight=0.8)
    await put_model(library, "noob.safetensors", "checkpoint", name="NoobAI XL", base_model="NoobAI")
    await library.edit("Ink Style", display_name="Ink Brush", trigger_words="ink, brush stroke", weight=0.65)
    await library.set_active_checkpoint("NoobAI XL")
    await save_guild_settings(store, GUILD, GuildSettings().changed(
        default_steps=36, default_negative="blurry", user_cap=3, guild_cap=12, refused_words=["gore"],
        safety_policy="off", safety_off_by=ADMIN, safety_off_at=1_700_000_000.0))
    await save_guild_settings(store, OTHER_GUILD, GuildSettings().changed(
        safety_policy="spoiler", allowed_channel_ids=[5005], default_model="flux"))
    await set_token(store, "hf", GOOD_HF)
    await set_token(store, "civitai", GOOD_CIVITAI, civitai_api_base=hub_url)
    for key in INSTANTID_MODELS:
        await set_enabled(store, key, True, by=ACCEPTED_BY)
    for key in INSTALLED:
        await install_base_model(store, settings, key)
    for key, value in RESULT_PARAMS.items():
        await store.put(key, value)


# ------------------------------------------------------------------ what the toolbox answers


async def answers(store, settings: Settings) -> dict:
    """What every feature answers, through the modules the front ends call."""
    library = library_for(settings, store)
    downloads = DownloadEngine(Layout(settings.models_dir, settings.loras_dir, store))
    states = await checked_states(settings, store, await setup_entries(store))
    tokens = [await token_state(store, service) for service in SERVICES]
    optional = [(entry, await enabled_record(store, entry.key)) for entry in optional_entries()]
    return {
        "library": [entry.to_dict() for entry in await library.entries()],
        "found": [(await library.find(name)).file for name in ("ink brush", "soft_light", "NoobAI XL")],
        "autocomplete": await library.choices("brush"),
        "lora choices": await library.choices("", kind="lora"),
        "checkpoint choices": await library.checkpoint_choices(""),
        "active checkpoint": await library.active_checkpoint(),
        "settings": {guild: (await load_guild_settings(store, guild)).to_dict() for guild in (GUILD, OTHER_GUILD)},
        "tokens": [await get_token(store, service, environ={}) for service in SERVICES],
        "optional models": {entry.key: record for entry, record in optional},
        "enabled": sorted(await enabled_models(store)),
        "model states": [state.to_dict() for state in states],
        "missing": await missing_models(store, INSTALLED),
        "present": [await downloads.present(BASE_MODELS[key]) for key in INSTALLED],
        "result params": {key: await store.get(key) for key in RESULT_PARAMS},
        "shown": {  # what people read: /settings show, the /setup panel
            "settings": describe_settings(await load_guild_settings(store, GUILD)),
            "setup": render_panel(states, tokens, optional=optional),
        },
    }


def check_as_set(found: dict) -> None:
    """The answers say what was set, not just the same thing twice."""
    library = {entry["file"]: (entry["name"], entry["trigger_words"], entry["weight"], entry["missing"])
               for entry in found["library"]}
    assert library == {"ink_style.safetensors": ("Ink Brush", ["ink", "brush stroke"], 0.65, False),
                       "soft_light.safetensors": ("Soft Light", ["glow"], 0.8, False),
                       "noob.safetensors": ("NoobAI XL", [], None, False)}
    assert found["found"] == ["ink_style.safetensors", "soft_light.safetensors", "noob.safetensors"]
    assert found["autocomplete"] == [("Ink Brush · lora", "ink_style.safetensors")]
    assert [file for _, file in found["lora choices"]] == ["ink_style.safetensors", "soft_light.safetensors"]
    assert ("NoobAI XL · checkpoint", "noob.safetensors") in found["checkpoint choices"]
    assert (found["active checkpoint"]["file"], found["active checkpoint"]["default"]) == ("noob.safetensors", False)
    settings = found["settings"][GUILD]
    assert (settings["default_steps"], settings["user_cap"], settings["guild_cap"]) == (36, 3, 12)
    assert (settings["safety_policy"], settings["safety_off_by"], settings["refused_words"]) == ("off", ADMIN, ["gore"])
    assert (found["settings"][OTHER_GUILD]["safety_policy"], found["settings"][OTHER_GUILD]["default_model"]) == (
        "spoiler", "flux")
    assert found["tokens"] == [{"civitai": GOOD_CIVITAI, "hf": GOOD_HF}[service] for service in SERVICES]
    assert found["enabled"] == sorted(INSTANTID_MODELS)
    for key in INSTANTID_MODELS:
        assert found["optional models"][key]["by"] == ACCEPTED_BY and found["optional models"][key]["at"] > 0
    states = {state["key"]: state["state"] for state in found["model states"]}
    assert all(states[key] == "present" for key in INSTALLED) and found["missing"] == []
    assert all(found["present"])
    assert found["result params"] == RESULT_PARAMS
    shown = "\n".join(found["shown"].values())
    assert "36 steps" in shown and "Safety: **off**" in shown and "3 per member, 12 for the server" in shown
    assert "••••1234" in shown and "••••cd99" in shown and "enabled by " + ACCEPTED_BY in shown
    assert GOOD_HF not in shown and GOOD_CIVITAI not in shown


# ------------------------------------------------------------------ the records, through the product's modules


@pytest.fixture(params=["data dir", "Modal volumes"])
def homes(request, monkeypatch):
    """The records' homes: the local backend's folders, or the Modal volumes as a process that mounts
    none reaches them (the bot of a Modal deployment)."""
    if request.param == "Modal volumes":
        fake_volumes(monkeypatch)
        return volume_homes()
    return local_homes(Settings.load().data_dir)


@pytest.mark.parametrize("idle", IDLE_SPELLS.values(), ids=IDLE_SPELLS.keys())
async def test_every_record_answers_as_set_after_the_dict_forgot(idle, homes, hub):
    settings = Settings.load()
    live = ExpiringStore()
    store = DurableStore(live, homes)
    await use_the_toolbox(store, settings, hub.url)
    before = await answers(store, settings)
    check_as_set(before)

    idle(live)
    assert live.remembered() == []  # the Dict kept nothing: what follows comes from the files
    assert await answers(store, settings) == before
    # Read once, cached again; a second spell of the same finds the same.
    idle(live)
    assert await answers(store, settings) == before


async def test_what_the_dict_alone_held_is_forgotten():
    """The expiring store is no pushover: a live key (a job's record) is gone after the idle spell."""
    settings = Settings.load()
    live = ExpiringStore()
    store = DurableStore(live, local_homes(settings.data_dir))
    await store.put("job:abc", {"status": "done"})
    await save_guild_settings(store, GUILD, GuildSettings().changed(user_cap=4))
    live.advance(days=8)
    assert await store.get("job:abc") is None
    assert (await load_guild_settings(store, GUILD)).user_cap == 4


# ------------------------------------------------------------------ the front ends


async def set_up_on_a_backend(settings: Settings, engines, hub_url: str) -> None:
    backend = LocalBackend(settings, engines=engines)
    try:
        await use_the_toolbox(backend.store, settings, hub_url)
    finally:
        await backend.close()


async def api_answers(settings: Settings, engines) -> dict:
    """A generate job asking for a library LoRA by name and a face (InstantID, an optional model), through
    POST /jobs and GET /jobs/{id}; and /health's base models."""
    async with api_client(settings, engines) as client:
        view = await finished_job(client, {
            "kind": "generate", "prompt": "a portrait", "seed": 11, "loras": [{"name": "Ink Brush"}],
            "reference_image_base64": base64.b64encode(png_bytes(64, 64, seed=4)).decode()})
        health = (await client.get("/health")).json()
    return {"model_info": view["result"]["model_info"], "face": view["result"]["face"],
            "installed": sorted(key for key, model in health["models"].items() if model["installed"])}


def front_end_answers(settings: Settings, engines, engine: StandInImageEngine, capsys) -> dict:
    models = cli(capsys, "models", "list", "--json")
    status = cli(capsys, "status", "--json")
    shown = cli(capsys, "status") + json.dumps(status)
    assert "••••1234" in shown and GOOD_HF not in shown and GOOD_CIVITAI not in shown
    api = asyncio.run(api_answers(settings, engines))
    generated = engine.generated[-1]
    worker = {name: generated[name] for name in ("checkpoint", "loras", "seed", "face_image")}
    # The last records check is live state: it is told apart from what was set.
    return {"models": models, "status": status, "records check": status.pop("records_check"), "api": api,
            "worker": worker}


@pytest.mark.parametrize("forget", FRONT_END_SPELLS, indirect=True)
def test_the_cli_and_the_api_answer_as_before(forget, hub, backends_from_settings, capsys):
    engine = backends_from_settings.use(GenerateRequest, StandInImageEngine(shrink=8))
    settings = Settings.load()
    asyncio.run(set_up_on_a_backend(settings, backends_from_settings, hub.url))
    cli(capsys, "models", "edit", "soft_light", "--triggers", "glow, haze", "--weight", "0.7")
    before = front_end_answers(settings, backends_from_settings, engine, capsys)

    listed = {entry["file"]: (entry["name"], entry["trigger_words"], entry["weight"]) for entry in before["models"]}
    assert listed["soft_light.safetensors"] == ("Soft Light", ["glow", "haze"], 0.7)
    assert listed["ink_style.safetensors"] == ("Ink Brush", ["ink", "brush stroke"], 0.65)
    status = before["status"]
    assert status["active_checkpoint"] == "noob.safetensors"
    states = {state["key"]: state["state"] for state in status["models"]}
    assert all(states[key] == "present" for key in INSTALLED)
    assert (status["tokens"]["hf"]["masked"], status["tokens"]["hf"]["user"]) == ("••••1234", "tester")
    assert status["optional_models"]["instantid"]["enabled"]["by"] == ACCEPTED_BY
    assert before["api"]["model_info"]["loras"] == [{"name": "Ink Brush", "weight": 0.65}]
    assert before["api"]["face"]["faces_found"] >= 1 and set(INSTALLED) <= set(before["api"]["installed"])
    assert before["worker"]["checkpoint"] == "noob.safetensors"
    assert [lora["trigger_words"] for lora in before["worker"]["loras"]] == [["ink", "brush stroke"]]

    forget()
    after = front_end_answers(settings, backends_from_settings, engine, capsys)
    checked, checked_before = after.pop("records check"), before.pop("records check")
    assert after == before
    assert len(engine.generated) == 2
    # The first start after the loss checked the records again: every one read back from its file, all in order.
    assert checked["ran_at"] > checked_before["ran_at"] and checked["records"] == checked_before["records"]
    assert checked["warmed"] == sum(checked["records"].values()) > 0
    assert ReconcileReport.from_dict(checked).drift() == []


# ------------------------------------------------------------------ Discord


async def discord_answers(toolbox_bot, job_id: str, engine) -> dict:
    """/settings show, the /setup panel, and Reroll pressed on a result of `job_id`."""
    show = fake_interaction(admin=True)
    await invoke(toolbox_bot, toolbox_bot.tree.get_command("settings").get_command("show"), show)
    panel = (await toolbox_bot.get_cog("Setup").panel())["content"]
    click = fake_interaction()
    click.client = toolbox_bot
    await press(f"toolbox:generate:reroll:{job_id}", click)
    assert ephemeral_error(click) is None
    rerolled = engine.generated[-1]
    return {"settings": show.calls.send_message.await_args.args[0], "setup": panel,
            "reroll": {name: rerolled[name] for name in ("prompt", "steps", "cfg", "negative_prompt", "count",
                                                         "checkpoint", "loras", "width", "height")}}


@pytest.mark.parametrize("forget", FRONT_END_SPELLS, indirect=True)
async def test_discord_settings_setup_and_reroll_answer_as_before(forget, hub, make_toolbox_bot, stand_in_engines,
                                                                  fast_progress):
    engine = stand_in_engines.use(GenerateRequest, StandInImageEngine(shrink=8))
    cogs = ("cogs.settings", "cogs.setup", "cogs.caption", "cogs.upscale", "cogs.generate")
    toolbox_bot = await make_toolbox_bot(*cogs)
    await use_the_toolbox(toolbox_bot.backend.store, toolbox_bot.settings, hub.url)
    generate = fake_interaction()
    await invoke(toolbox_bot, toolbox_bot.tree.get_command("generate"), generate, "a red fox", None, None, 2, None,
                 None, 7, "Ink Brush")
    assert ephemeral_error(generate) is None
    job_id = (await toolbox_bot.backend.store.keys("job:"))[0].removeprefix("job:")
    before = await discord_answers(toolbox_bot, job_id, engine)
    assert "36 steps" in before["settings"] and "Safety: **off**" in before["settings"]
    assert "••••1234" in before["setup"] and GOOD_HF not in before["setup"] and GOOD_CIVITAI not in before["setup"]
    assert before["reroll"]["prompt"] == "a red fox" and before["reroll"]["steps"] == 36
    assert before["reroll"]["checkpoint"] == "noob.safetensors"
    assert [(lora["file"], lora["weight"]) for lora in before["reroll"]["loras"]] == [("ink_style.safetensors", 0.65)]
    await toolbox_bot.backend.close()

    forget()
    restarted = await make_toolbox_bot(*cogs)
    assert await discord_answers(restarted, job_id, engine) == before
