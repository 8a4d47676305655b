"""/setup with fake interactions, the real LocalBackend, and the fake hub on loopback."""

from __future__ import annotations

import asyncio
import logging
import time
from unittest.mock import MagicMock

import discord
import pytest
from discord.ext import commands

from bot.backend import LocalBackend
from bot.settings import Settings
from cogs import setup as setup_cog
from cogs.setup import Setup, SetupPanel, TokensForm, render_progress
from modal_services.base_models import downloads
from modal_services.base_models.states import ModelState, model_states
from modal_services.jobs.records import Job, JobStatus, create_job, update_job
from modal_services.state.keys import SETUP_DOWNLOAD_LOCK, lock_key, manifest_key
from modal_services.base_models.registry import BASE_MODELS
from tests.fakes.discord_fakes import fake_interaction

CIVITAI_TOKEN = "civitai-token-0123456789a1b2"
HF_TOKEN = "hf_goodtoken_9876543210c3d4"


@pytest.fixture
def hub(fake_hub, monkeypatch):
    fake_hub.valid_tokens = {CIVITAI_TOKEN, HF_TOKEN}
    monkeypatch.setenv("CIVITAI_API_BASE", fake_hub.url)
    return fake_hub


@pytest.fixture
async def bot(hub, monkeypatch):
    monkeypatch.setattr(setup_cog, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(downloads, "TICK_SECONDS", 0.05)
    settings = Settings.load()
    fake = MagicMock(spec=commands.Bot)
    fake.settings = settings
    fake.backend = LocalBackend(settings)
    yield fake
    await fake.backend.close()


def last_content(interaction) -> str:
    return interaction.edit_original_response.await_args.kwargs["content"]


def all_contents(interaction) -> list[str]:
    return [call.kwargs.get("content") for call in interaction.edit_original_response.await_args_list]


async def test_command_is_admin_only_by_default(bot):
    real = commands.Bot(command_prefix="!", intents=discord.Intents.default())
    await real.add_cog(Setup(real))
    command = real.tree.get_command("setup")
    assert command.default_permissions.administrator and command.guild_only


async def test_non_admin_is_refused(bot):
    cog = Setup(bot)
    interaction = fake_interaction(admin=False)
    await Setup.setup.callback(cog, interaction)
    text = interaction.response.send_message.await_args.args[0]
    assert "Only the bot's operators" in text and interaction.response.send_message.await_args.kwargs["ephemeral"]
    interaction.response.defer.assert_not_awaited()


async def test_panel_lists_models_sizes_and_masked_tokens(bot, monkeypatch):
    monkeypatch.setenv("CIVITAI_TOKEN", CIVITAI_TOKEN)
    cog = Setup(bot)
    interaction = fake_interaction(admin=True, operator=True)
    await Setup.setup.callback(cog, interaction)
    interaction.response.defer.assert_awaited_once_with(ephemeral=True, thinking=True)
    text = last_content(interaction)
    for entry in BASE_MODELS.values():
        assert entry.name in text
    assert "0/9 present" in text and "6.9 GB" in text and "missing" in text
    assert "CivitAI: ••••a1b2 (from the environment)" in text and "Hugging Face: not set" in text
    assert CIVITAI_TOKEN not in text
    assert isinstance(interaction.edit_original_response.await_args.kwargs["view"], SetupPanel)


async def test_download_button_runs_one_job_with_live_progress(bot, hub):
    cog = Setup(bot)
    panel = SetupPanel(cog)
    interaction = fake_interaction(admin=True, operator=True)
    await asyncio.wait_for(panel.download.callback(interaction), timeout=30)
    interaction.response.defer.assert_awaited_once()
    contents = all_contents(interaction)
    assert any("Overall" in text for text in contents[:-1])  # the live view before the final panel
    final = contents[-1]
    assert "All base models are ready" in final and "9/9 present" in final
    for key, entry in BASE_MODELS.items():
        manifest = await bot.backend.store.get(manifest_key(key))
        # Optional models (FLUX.1-dev, InstantID) stay out until an admin enables them.
        assert manifest["complete"] if entry.optional is None else manifest is None
    assert (bot.settings.models_dir / "illustrious-xl" / "Illustrious-XL-v2.0.safetensors").is_file()

    # Pressing it again starts nothing: everything is there.
    again = fake_interaction(admin=True, operator=True)
    await panel.download.callback(again)
    assert "already downloaded" in last_content(again)
    assert len(await bot.backend.store.keys("job:")) == 1

    # A file deleted from the disk is missing again, whatever the manifest says, and is fetched again.
    weights = bot.settings.models_dir / "illustrious-xl" / "Illustrious-XL-v2.0.safetensors"
    weights.unlink()
    assert "8/9 present" in (await cog.panel())["content"]
    third = fake_interaction(admin=True, operator=True)
    await asyncio.wait_for(panel.download.callback(third), timeout=30)
    assert "All base models are ready" in last_content(third) and weights.is_file()


async def test_two_admins_at_once_start_one_download(bot, hub):
    cog = Setup(bot)
    first, second = fake_interaction(admin=True, operator=True, user_id=1), fake_interaction(admin=True, operator=True, user_id=2)
    await asyncio.wait_for(asyncio.gather(
        SetupPanel(cog).download.callback(first), SetupPanel(cog).download.callback(second)), timeout=30)
    assert len(await bot.backend.store.keys("job:")) == 1
    assert len(hub.body_requests("Illustrious-XL-v2.0.safetensors")) == 1
    assert "All base models are ready" in last_content(first) and "All base models are ready" in last_content(second)


async def test_setup_attaches_to_a_running_download(bot):
    store = bot.backend.store
    job = await create_job(store, "download")
    await update_job(store, job.id, status=JobStatus.RUNNING, stage="downloading", progress=0.5)
    await store.put(lock_key(SETUP_DOWNLOAD_LOCK), {"owner": "x", "job_id": job.id, "heartbeat": time.time()})
    await store.put(downloads.download_key("sdxl-vae"), {
        "status": "downloading", "bytes_done": 100_000_000, "bytes_total": 335_000_000, "rate": 25_000_000,
        "eta": 9.4, "updated_at": time.time()})
    cog = Setup(bot)
    interaction = fake_interaction(admin=True, operator=True)

    async def finish_later():
        await asyncio.sleep(0.3)
        await update_job(store, job.id, status=JobStatus.DONE, stage="done", progress=1.0)

    finisher = asyncio.ensure_future(finish_later())
    await asyncio.wait_for(Setup.setup.callback(cog, interaction), timeout=10)
    await finisher
    contents = all_contents(interaction)
    live = contents[0]
    assert "Downloading base models" in live and "SDXL VAE fp16-fix" in live
    assert "100.0 MB / 335.0 MB" in live and "25.0 MB/s" in live and "ETA 9 s" in live
    assert "All base models are ready" in contents[-1]
    assert await store.keys("job:") == [f"job:{job.id}"]  # attached, nothing new started


@pytest.mark.parametrize("button", ["set_tokens", "download", "verify"])
async def test_non_admin_buttons_are_refused(bot, button):
    panel = SetupPanel(Setup(bot))
    interaction = fake_interaction(admin=False)
    await getattr(panel, button).callback(interaction)
    assert "Only the bot's operators can" in interaction.response.send_message.await_args.args[0]
    interaction.response.send_modal.assert_not_awaited()
    interaction.response.defer.assert_not_awaited()
    assert await bot.backend.store.keys("job:") == []


async def test_set_tokens_checks_each_and_keeps_only_good_ones(bot, caplog):
    caplog.set_level(logging.DEBUG)
    cog = Setup(bot)
    opener = fake_interaction(admin=True, operator=True)
    await SetupPanel(cog).set_tokens.callback(opener)
    form = opener.response.send_modal.await_args.args[0]
    assert isinstance(form, TokensForm)

    form.civitai._refresh_state(None, {"value": f"  {CIVITAI_TOKEN} "})
    form.hf._refresh_state(None, {"value": "hf_revoked_token_000000"})
    submit = fake_interaction(admin=True, operator=True)
    await form.on_submit(submit)
    reply = submit.followup.send.await_args.args[0]
    assert "CivitAI: ••••a1b2 (tester): checked and saved" in reply
    assert "Hugging Face rejected this token (HTTP 401)" in reply
    store = bot.backend.store
    assert (await store.get("secret:civitai"))["token"] == CIVITAI_TOKEN
    assert await store.get("secret:hf") is None
    assert CIVITAI_TOKEN not in reply and "hf_revoked_token_000000" not in reply
    assert CIVITAI_TOKEN not in caplog.text and "hf_revoked_token_000000" not in caplog.text

    # The panel now shows the saved one, masked.
    panel = fake_interaction(admin=True, operator=True)
    await Setup.setup.callback(cog, panel)
    assert "CivitAI: ••••a1b2 (tester)" in last_content(panel) and CIVITAI_TOKEN not in last_content(panel)


async def test_typing_clear_removes_a_token(bot):
    store = bot.backend.store
    await store.put("secret:hf", {"token": HF_TOKEN, "user": "someone", "set_at": 0})
    form = TokensForm(Setup(bot))
    form.hf._refresh_state(None, {"value": " Clear "})
    submit = fake_interaction(admin=True, operator=True)
    await form.on_submit(submit)
    assert "Hugging Face: removed" in submit.followup.send.await_args.args[0]
    assert await store.get("secret:hf") is None


async def test_token_form_refuses_non_admin(bot):
    form = TokensForm(Setup(bot))
    form.hf._refresh_state(None, {"value": HF_TOKEN})
    interaction = fake_interaction(admin=False)
    await form.on_submit(interaction)
    assert await bot.backend.store.get("secret:hf") is None


@pytest.mark.slow
async def test_verify_button_fixes_the_manifest(bot, hub):
    cog = Setup(bot)
    await asyncio.wait_for(SetupPanel(cog).download.callback(fake_interaction(admin=True, operator=True)), timeout=30)
    damaged = bot.settings.models_dir / "sdxl-vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[0] ^= 1
    damaged.write_bytes(bytes(data))
    interaction = fake_interaction(admin=True, operator=True)
    await asyncio.wait_for(SetupPanel(cog).verify.callback(interaction), timeout=30)
    final = last_content(interaction)
    assert "Verified" in final and "8/9 present" in final and "CHECKSUM_MISMATCH" in final
    assert await bot.backend.store.get(manifest_key("sdxl-vae")) is None


async def test_failed_download_shows_why(bot, hub):
    hub.fault("Illustrious-XL-v2.0.safetensors", "corrupt")
    interaction = fake_interaction(admin=True, operator=True)
    await asyncio.wait_for(SetupPanel(Setup(bot)).download.callback(interaction), timeout=30)
    final = last_content(interaction)
    assert "The download was corrupt" in final and "failed: CHECKSUM_MISMATCH" in final
    states = {s.key: s.state for s in await model_states(bot.backend.store, BASE_MODELS.values())}
    assert states["illustrious-xl"] == "failed" and states["sdxl-vae"] == "present"


def test_progress_render_fits_a_message():
    job = Job(id="j", kind="download", status=JobStatus.RUNNING)
    states = [ModelState(e.key, e.name, "downloading", e.approx_bytes, e.approx_bytes // 3, 5e7, 120.0)
              for e in BASE_MODELS.values()]
    text = render_progress(job, states)
    assert len(text) <= 2000 and text.count("ETA 2 min 00 s") == len(states)
