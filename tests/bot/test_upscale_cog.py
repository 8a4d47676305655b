"""/upscale, the "Upscale 2x" menu and the result buttons, with fake interactions on the real LocalBackend."""

from __future__ import annotations

import asyncio
import io
import time
from unittest.mock import MagicMock
from urllib.parse import urlsplit

import discord
import pytest
from PIL import Image

from bot.library_options import lora_autocomplete
from cogs.upscale import split_attachments
from modal_services.state.keys import upscale_params_key as params_key
from modal_services.library.entries import ACTIVE_CHECKPOINT_KEY, LibraryEntry, entry_key
from modal_services.engines.sdxl.previews import PreviewSink, preview_key
from tests.bot.buttons import press as press_button
from modal_services.jobs.requests import CaptionRequest, UpscaleRequest
from tests.fakes.discord_fakes import ephemeral_error, fake_attachment, fake_interaction, fake_message, invoke
from tests.images import png_bytes


class FakeUpscaleEngine:
    """Returns a PNG of the requested size after a few progress steps; remembers each request's fields."""

    def __init__(self, delay: float = 0.05):
        self.loaded = False
        self.delay = delay
        self.payloads: list[dict] = []

    def load(self):
        self.loaded = True

    def upscale(self, request, progress, preview=None):
        self.payloads.append(request.model_dump(exclude={"safety", "image"}))
        width, height = Image.open(io.BytesIO(request.image)).size
        scale = request.scale
        for step in range(4):
            progress(step / 4, f"tile {step + 1}/4 · step 1/1")
            time.sleep(self.delay)
        buffer = io.BytesIO()
        Image.new("RGB", (round(width * scale), round(height * scale)), (200, 10, 10)).save(buffer, "PNG")
        return buffer.getvalue()


@pytest.fixture
def engine(stand_in_engines):
    engine = FakeUpscaleEngine()
    stand_in_engines.use(UpscaleRequest, engine)
    return engine


@pytest.fixture
async def toolbox_bot(make_toolbox_bot):
    bot = await make_toolbox_bot("cogs.caption", "cogs.upscale")
    bot.upscales.previews.interval = 0.05
    return bot


async def add_lora(bot, name, file, weight=0.8, triggers=("shiny",)):
    entry = LibraryEntry(name=name, file=file, type="lora", weight=weight, trigger_words=list(triggers))
    await bot.backend.store.put(entry_key(file), entry.to_dict())


def upscale_command(bot):
    return bot.tree.get_command("upscale")


def final_edit(interaction) -> dict:
    return interaction.calls.edit_original_response.await_args.kwargs


async def keep_writing_previews(store, count: int = 200) -> None:
    """What the worker's preview sink does: a fresh preview every 20 ms for the first job."""
    while not (keys := await store.keys("job:")):
        await asyncio.sleep(0.01)
    job_id = keys[0].split(":", 1)[1]
    for n in range(count):
        await store.put(preview_key(job_id), {"jpeg": "/9j/cHJldmlldw==", "n": n})
        await asyncio.sleep(0.02)


async def upscale_while_previews_come(bot, edit) -> None:
    """One /upscale 2x while the worker keeps writing previews, every edit of its reply going to `edit`."""
    writer = asyncio.create_task(keep_writing_previews(bot.backend.store))
    interaction = fake_interaction()
    interaction.edit_original_response.side_effect = edit
    await invoke(bot, upscale_command(bot), interaction, fake_attachment(png_bytes(60, 40)),
                 2.0, None, None, None, None, None, None, None, None, None, 1)
    writer.cancel()


def attachment_from(file: discord.File, content_type: str) -> MagicMock:
    file.fp.seek(0)
    return fake_attachment(file.fp.read(), file.filename, content_type)


async def test_command_options_and_menu(toolbox_bot):
    command = upscale_command(toolbox_bot)
    assert [p.name for p in command.parameters] == [
        "image", "scale", "prompt", "negative", "lora1", "lora1_weight", "lora2", "lora2_weight",
        "lora3", "lora3_weight", "creativity", "seed", "tile_captions", "sampler",
    ]
    scale = command.parameters[1]
    assert (scale.min_value, scale.max_value) == (1.5, 4.0)
    assert all(command.parameters[i].autocomplete for i in (4, 6, 8))
    assert toolbox_bot.upscales.menu.name == "Upscale 2x"


async def test_lora_autocomplete_reads_the_library(toolbox_bot):
    await add_lora(toolbox_bot, "Detail Tweaker", "detail.safetensors")
    await add_lora(toolbox_bot, "Shiny Style", "shiny.safetensors")
    await toolbox_bot.backend.store.put(entry_key("model.safetensors"), LibraryEntry(
        name="Other Model", file="model.safetensors", type="checkpoint").to_dict())
    typing = fake_interaction()
    typing.client = toolbox_bot
    choices = await lora_autocomplete(typing, "")
    assert [c.value for c in choices] == ["detail.safetensors", "shiny.safetensors"]
    assert [c.value for c in await lora_autocomplete(typing, "style")] == ["shiny.safetensors"]


async def test_upscale_defers_shows_progress_and_previews_then_the_result_with_buttons(toolbox_bot, engine, fast_progress):
    await add_lora(toolbox_bot, "Detail Tweaker", "detail.safetensors", weight=0.7, triggers=("shiny",))
    store = toolbox_bot.backend.store

    async def write_a_preview():
        # What the worker's PreviewSink does while the job runs.
        while not (keys := await store.keys("job:")):
            await asyncio.sleep(0.01)
        sink = PreviewSink(store, keys[0].split(":", 1)[1])
        sink(b"\xff\xd8preview-jpeg")

    engine.delay = 0.15
    writer = asyncio.create_task(write_a_preview())
    interaction = fake_interaction()
    await invoke(toolbox_bot, upscale_command(toolbox_bot), interaction, fake_attachment(png_bytes(60, 40)),
                 3.0, "a castle", None, "Detail Tweaker", None, None, None, None, None, 0.5, 1234)
    await writer

    names = [call[0] for call in interaction.calls.mock_calls]
    assert names[0] == "defer"
    edits = [call.kwargs for call in interaction.calls.edit_original_response.await_args_list]
    assert any("▰" in edit.get("content", "") for edit in edits)
    previews = [edit["attachments"][0].filename for edit in edits[:-1] if "attachments" in edit]
    assert previews and set(previews) == {"preview.jpg"}
    assert ephemeral_error(interaction) is None

    payload = engine.payloads[0]
    assert payload["scale"] == 3.0 and payload["creativity"] == 0.5 and payload["seed"] == 1234
    assert payload["prompt"] == "a castle" and payload["checkpoint"] is None
    assert payload["loras"] == [{"name": "Detail Tweaker", "file": "detail.safetensors", "weight": 0.7,
                                 "trigger_words": ["shiny"]}]

    final = final_edit(interaction)
    result, source = final["attachments"]
    assert result.filename == "upscaled.png" and source.filename == "source.png"
    result.fp.seek(0)
    assert Image.open(result.fp).size == (180, 120)
    assert "seed 1234" in final["content"] and "180×120" in final["content"] and "Detail Tweaker (0.7)" in final["content"]
    custom_ids = [item.custom_id for item in final["view"].children]
    job_id = (await store.keys("job:"))[0].split(":", 1)[1]
    assert custom_ids == [f"toolbox:upscale:{action}:{job_id}" for action in ("again", "vary", "caption")]
    assert (await store.get(params_key(job_id)))["params"]["loras"] == [{"name": "detail.safetensors", "weight": 0.7}]


async def test_a_big_result_is_fitted_to_the_upload_limit(toolbox_bot, engine, fast_progress, monkeypatch):
    def noisy_result(request, progress, preview=None):
        import numpy as np

        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    monkeypatch.setattr(engine, "upscale", noisy_result)
    interaction = fake_interaction()
    interaction.filesize_limit = 60_000
    await invoke(toolbox_bot, upscale_command(toolbox_bot), interaction, fake_attachment(png_bytes(50, 50)),
                 None, None, None, None, None, None, None, None, None, None, None)
    final = final_edit(interaction)
    result = final["attachments"][0]
    result.fp.seek(0)
    assert result.filename.endswith((".webp", ".jpg")) and len(result.fp.read()) <= 60_000
    assert "upload limit" in final["content"]


async def test_limits_and_unknown_loras_are_refused_before_a_job(toolbox_bot, engine, fast_progress, fake_cdn):
    interaction = fake_interaction()
    await invoke(toolbox_bot, upscale_command(toolbox_bot), interaction, fake_attachment(png_bytes(2000, 2000)),
                 4.0, None, None, None, None, None, None, None, None, None, None)
    assert "limit is 16 MP" in ephemeral_error(interaction)
    interaction = fake_interaction()
    await invoke(toolbox_bot, upscale_command(toolbox_bot), interaction, fake_attachment(png_bytes(50, 50)),
                 2.0, None, None, "nope", None, None, None, None, None, None, None)
    assert "No lora named 'nope'" in ephemeral_error(interaction)
    interaction = fake_interaction()
    await invoke(toolbox_bot, upscale_command(toolbox_bot), interaction, fake_attachment(b"text", "a.txt", "text/plain"),
                 2.0, None, None, None, None, None, None, None, None, None, None)
    assert "not an image" in ephemeral_error(interaction)
    # Over the upscaler's input limit by what Discord reports: refused before the defer, nothing downloaded.
    interaction = fake_interaction()
    reported = fake_attachment(png_bytes(50, 50), width=4000, height=3000)
    await invoke(toolbox_bot, upscale_command(toolbox_bot), interaction, reported,
                 2.0, None, None, None, None, None, None, None, None, None, None)
    interaction.calls.defer.assert_not_awaited()
    assert urlsplit(reported.url).path not in fake_cdn.requests
    assert "4000×3000" in ephemeral_error(interaction)
    assert engine.payloads == []


async def test_server_defaults_and_active_checkpoint_reach_the_worker(toolbox_bot, engine, fast_progress):
    await toolbox_bot.backend.store.put(entry_key("anime.safetensors"), LibraryEntry(
        name="Anime XL", file="anime.safetensors", type="checkpoint").to_dict())
    await toolbox_bot.backend.store.put(ACTIVE_CHECKPOINT_KEY, "anime.safetensors")
    interaction = fake_interaction()
    await invoke(toolbox_bot, upscale_command(toolbox_bot), interaction, fake_attachment(png_bytes(40, 40)),
                 None, None, None, None, None, None, None, None, None, None, None)
    payload = engine.payloads[0]
    assert payload["scale"] == 2.0 and payload["creativity"] == 0.35 and 0 <= payload["seed"] <= 2**32 - 1
    assert payload["checkpoint"] == "anime.safetensors"
    assert "Anime XL" in final_edit(interaction)["content"]


async def test_message_menu_upscales_the_first_image_2x(toolbox_bot, engine, fast_progress):
    message = fake_message(fake_attachment(b"notes", "notes.txt", "text/plain"), fake_attachment(png_bytes(30, 20), "a.png"))
    interaction = fake_interaction()
    await invoke(toolbox_bot, toolbox_bot.upscales.menu, interaction, message)
    result = final_edit(interaction)["attachments"][0]
    result.fp.seek(0)
    assert Image.open(result.fp).size == (60, 40)


async def test_buttons_work_from_their_custom_ids_after_a_restart(toolbox_bot, engine, fast_progress):
    interaction = fake_interaction()
    await invoke(toolbox_bot, upscale_command(toolbox_bot), interaction, fake_attachment(png_bytes(40, 30)),
                 2.0, "a fox", None, None, None, None, None, None, None, 0.4, 99)
    final = final_edit(interaction)
    job_id = (await toolbox_bot.backend.store.keys("job:"))[0].split(":", 1)[1]
    result_file, source_file = final["attachments"]
    message = fake_message(attachment_from(result_file, "image/png"), attachment_from(source_file, "image/png"))
    assert split_attachments(message)[1].filename == "source.png"

    async def press(action):
        # What discord.py does with a dynamic item's custom_id on a bot that has just started.
        click = fake_interaction()
        click.message = message
        click.client = toolbox_bot
        await press_button(f"toolbox:upscale:{action}:{job_id}", click)
        return click

    await press("again")
    assert engine.payloads[-1]["scale"] == 2.0 and engine.payloads[-1]["prompt"] == "a fox"
    assert engine.payloads[-1]["seed"] == 99 and engine.payloads[-1]["creativity"] == 0.4
    await press("vary")
    assert engine.payloads[-1]["seed"] != 99 and engine.payloads[-1]["prompt"] == "a fox"

    click = await press("caption")
    # Handed to the caption cog, which checks for its model before any job exists (none is installed here).
    assert click.calls.defer.await_count == 1 and "qwen3-vl-2b" in ephemeral_error(click)
    assert {record["kind"] for record in (await toolbox_bot.backend.store.items("job:")).values()} == {"upscale"}

    empty = fake_message()
    click = fake_interaction()
    click.message, click.client = empty, toolbox_bot
    await press_button(f"toolbox:upscale:vary:{job_id}", click)
    assert "source image" in ephemeral_error(click)


class TagEngine:
    """A caption engine that tags each image with its size."""

    loaded = True

    def load(self):
        pass

    def caption(self, request, progress):
        assert request.style == "tags"
        return [f"tile {Image.open(io.BytesIO(data)).size[0]}" for data in request.images]


async def test_tile_captions_become_region_prompts(toolbox_bot, engine, fast_progress, stand_in_engines):
    from modal_services.engines.sdxl.tiling import plan_tiles

    stand_in_engines.use(CaptionRequest, TagEngine())
    interaction = fake_interaction()
    await invoke(toolbox_bot, upscale_command(toolbox_bot), interaction, fake_attachment(png_bytes(600, 400)),
                 4.0, "a town", None, None, None, None, None, None, None, None, 7, True)
    assert ephemeral_error(interaction) is None
    regions = engine.payloads[0]["region_prompts"]
    assert len(regions) == len(plan_tiles(2400, 1600)) == 6
    for region in regions:
        left, top, right, bottom = region["box"]
        assert region["prompt"] == f"tile {right - left}"
    assert engine.payloads[0]["prompt"] == "a town"
    assert "tile captions" in final_edit(interaction)["content"]
    job_id = next(k for k, v in (await toolbox_bot.backend.store.items("job:")).items() if v["kind"] == "upscale")
    assert (await toolbox_bot.backend.store.get(params_key(job_id.split(":", 1)[1])))["params"]["tile_captions"] is True


async def test_the_tile_caption_step_can_be_cancelled(toolbox_bot, engine, fast_progress, stand_in_engines):
    import asyncio

    from tests.fakes.engines import SlowCaptionEngine

    stand_in_engines.use(CaptionRequest, SlowCaptionEngine(steps=300, delay=0.01))
    interaction = fake_interaction()
    interaction.client = toolbox_bot
    running = asyncio.create_task(invoke(
        toolbox_bot, upscale_command(toolbox_bot), interaction, fake_attachment(png_bytes(600, 400)),
        4.0, None, None, None, None, None, None, None, None, None, 7, True))
    button = None
    for _ in range(500):
        await asyncio.sleep(0.01)
        views = [call.kwargs.get("view") for call in interaction.calls.edit_original_response.await_args_list]
        button = next((item for view in views if view for item in view.children), None)
        if button is not None:
            break
    assert button is not None and button.custom_id.startswith("toolbox:cancel:")
    owner_press = fake_interaction()
    owner_press.client = toolbox_bot
    await toolbox_bot.tracker.cancel(owner_press, button.custom_id.rsplit(":", 1)[1])
    await asyncio.wait_for(running, timeout=20)
    assert "Cancelled" in ephemeral_error(interaction)
    assert engine.payloads == []  # the upscale never started


async def test_no_preview_edit_lands_after_the_result(toolbox_bot, engine, fast_progress, monkeypatch):
    import bot.tracker

    landed = []

    async def edit(**fields):
        landed.append([attachment.filename for attachment in fields.get("attachments", [])])

    original_update = bot.tracker.update_job

    async def slow_bookkeeping(store_, job_id, **fields):
        if fields.get("delivered"):
            await asyncio.sleep(0.3)  # the tracker's last write after the result: previews must be over by now
        return await original_update(store_, job_id, **fields)

    monkeypatch.setattr(bot.tracker, "update_job", slow_bookkeeping)
    engine.delay = 0.05
    await upscale_while_previews_come(toolbox_bot, edit)
    assert ["preview.jpg"] in landed  # previews were shown while it ran
    assert landed[-1][0] == "upscaled.png"


async def test_progress_previews_and_result_share_one_edit_budget(toolbox_bot, engine, fast_progress, monkeypatch):
    """Every edit of the reply, whoever asked for it, is at least the edit interval after the one before."""
    monkeypatch.setattr("bot.progress.MIN_EDIT_INTERVAL", 0.25)
    landed: list[tuple[float, dict]] = []

    async def edit(**fields):
        landed.append((time.monotonic(), fields))

    engine.delay = 0.3
    await upscale_while_previews_come(toolbox_bot, edit)
    times = [at for at, _ in landed]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert len(landed) >= 4 and min(gaps) >= 0.24, gaps
    merged = [fields for _, fields in landed if "content" in fields and "attachments" in fields]
    assert any(fields["attachments"][0].filename == "preview.jpg" for fields in merged)  # text + preview, one edit
    assert landed[-1][1]["attachments"][0].filename == "upscaled.png"
