"""/generate and its result buttons (U, V, Reroll), with fake interactions on the real LocalBackend."""

from __future__ import annotations

import asyncio
import io
from unittest.mock import MagicMock

import discord
import pytest
from PIL import Image

from bot.guild_settings import GuildSettings, save_guild_settings
from cogs.generate import image_attachment
from modal_services.state.keys import generate_params_key as params_key
from modal_services.library.entries import ACTIVE_CHECKPOINT_KEY, LibraryEntry, entry_key
from modal_services.engines.sdxl.previews import PreviewSink
from tests.bot.buttons import press as press_button
from modal_services.jobs.requests import CaptionRequest, GenerateRequest
from tests.fakes.engines import StandInImageEngine
from tests.fakes.discord_fakes import ephemeral_error, fake_attachment, fake_interaction, fake_message, invoke
from tests.fixtures.tiny_instantid import enable_instantid
from tests.images import png_bytes


def sdxl_stand_in(delay: float = 0.02) -> StandInImageEngine:
    """Both SDXL job kinds, as one engine serves them: small images (an eighth of the size), one colour per
    seed, three faces in any face photo."""
    return StandInImageEngine(shrink=8, delay=delay, faces_found=3)


@pytest.fixture
def engine(stand_in_engines):
    return stand_in_engines.use(GenerateRequest, sdxl_stand_in())


@pytest.fixture
async def toolbox_bot(make_toolbox_bot):
    bot = await make_toolbox_bot("cogs.caption", "cogs.upscale", "cogs.generate")
    bot.generations.previews.interval = 0.02
    return bot


def generate_command(bot):
    return bot.tree.get_command("generate")


def final_edit(interaction) -> dict:
    return interaction.calls.edit_original_response.await_args.kwargs


def attachment_from(file: discord.File) -> MagicMock:
    file.fp.seek(0)
    return fake_attachment(file.fp.read(), file.filename, "image/png")


async def generate(bot, interaction, prompt, **options):
    names = ["negative", "aspect", "count", "steps", "cfg", "seed", "lora1", "lora1_weight", "lora2",
             "lora2_weight", "lora3", "lora3_weight", "face", "identity_strength", "pose", "model"]
    await invoke(bot, generate_command(bot), interaction, prompt, *(options.get(name) for name in names))


async def test_command_options_come_from_the_request_model(toolbox_bot):
    command = generate_command(toolbox_bot)
    options = {p.name: p for p in command.parameters}
    assert list(options) == ["prompt", "negative", "aspect", "count", "steps", "cfg", "seed", "lora1",
                             "lora1_weight", "lora2", "lora2_weight", "lora3", "lora3_weight", "face",
                             "identity_strength", "pose", "model", "remix", "sampler"]
    assert (options["identity_strength"].min_value, options["identity_strength"].max_value) == (0.0, 1.5)
    assert options["face"].type is discord.AppCommandOptionType.attachment and not options["face"].required
    assert (options["steps"].min_value, options["steps"].max_value) == (20, 50)
    assert (options["cfg"].min_value, options["cfg"].max_value) == (1.0, 20.0)
    assert (options["count"].min_value, options["count"].max_value) == (1, 4)
    # A remix brings its own prompt: the command says when neither is given.
    assert options["prompt"].max_value == 1000 and not options["prompt"].required
    assert options["remix"].max_value == 300 and not options["remix"].required
    assert [choice.value for choice in options["aspect"].choices][:3] == ["1:1", "4:5", "5:4"]
    assert all(options[name].autocomplete for name in ("lora1", "lora2", "lora3"))


async def test_generate_shows_progress_previews_then_the_images_with_buttons(toolbox_bot, engine, fast_progress):
    store = toolbox_bot.backend.store
    await store.put(entry_key("detail.safetensors"), LibraryEntry(
        name="Detail", file="detail.safetensors", type="lora", weight=0.6, trigger_words=["shiny"]).to_dict())

    async def write_a_preview():
        while not (keys := await store.keys("job:")):
            await asyncio.sleep(0.01)
        PreviewSink(store, keys[0].split(":", 1)[1])(b"\xff\xd8preview-jpeg")

    engine.delay = 0.2  # a job of 0.4 s: long enough for the preview to show
    writer = asyncio.create_task(write_a_preview())
    interaction = fake_interaction()
    await generate(toolbox_bot, interaction, "1girl, castle", aspect=discord.app_commands.Choice(name="16:9", value="16:9"),
                   count=4, seed=40, lora1="Detail")
    await writer
    assert ephemeral_error(interaction) is None
    assert interaction.calls.mock_calls[0][0] == "defer"
    request = engine.generated[0]
    assert (request["width"], request["height"], request["count"], request["seed"]) == (1344, 768, 4, 40)
    assert request["steps"] == 28 and request["cfg"] == 5.5 and request["timeout"] == 300
    assert request["loras"] == [{"name": "Detail", "file": "detail.safetensors", "weight": 0.6, "trigger_words": ["shiny"]}]
    edits = [call.kwargs for call in interaction.calls.edit_original_response.await_args_list]
    assert any("preview.jpg" in [a.filename for a in edit.get("attachments", [])] for edit in edits[:-1])

    final = final_edit(interaction)
    assert [file.filename for file in final["attachments"]] == ["image1.png", "image2.png", "image3.png", "image4.png"]
    assert "1girl, castle" in final["content"] and "seeds 40, 41, 42, 43" in final["content"]
    assert "Detail (0.6)" in final["content"] and "CFG 5.5" in final["content"]
    job_id = (await store.keys("job:"))[0].split(":", 1)[1]
    custom_ids = [item.custom_id for item in final["view"].children]
    assert custom_ids == [f"toolbox:generate:{action}:{job_id}" for action in
                          ("u1", "u2", "u3", "u4", "v1", "v2", "v3", "v4", "reroll")]
    assert (await store.get(params_key(job_id)))["params"]["loras"] == [{"name": "detail.safetensors", "weight": 0.6}]


async def test_server_defaults_and_the_active_checkpoint_reach_the_worker(toolbox_bot, engine, fast_progress):
    store = toolbox_bot.backend.store
    await save_guild_settings(store, 2002, GuildSettings(default_aspect="2:3", default_steps=35, default_cfg=7.0,
                                                         default_negative="lowres"))
    await store.put(entry_key("anime.safetensors"), LibraryEntry(name="Anime XL", file="anime.safetensors",
                                                                 type="checkpoint").to_dict())
    await store.put(ACTIVE_CHECKPOINT_KEY, "anime.safetensors")
    interaction = fake_interaction()
    await generate(toolbox_bot, interaction, "a fox")
    request = engine.generated[0]
    assert (request["width"], request["height"], request["steps"], request["cfg"]) == (832, 1216, 35, 7.0)
    assert request["negative_prompt"] == "lowres" and request["checkpoint"] == "anime.safetensors"
    assert request["count"] == 1 and 0 <= request["seed"] < 2**32
    assert "Anime XL" in final_edit(interaction)["content"]


async def test_bad_requests_are_refused_before_a_job(toolbox_bot, engine, fast_progress):
    interaction = fake_interaction()
    await generate(toolbox_bot, interaction, "a fox", lora1="nope")
    assert "No lora named 'nope'" in ephemeral_error(interaction)
    interaction = fake_interaction()
    await generate(toolbox_bot, interaction, "   ")
    assert "prompt cannot be empty" in ephemeral_error(interaction)
    assert engine.generated == [] and await toolbox_bot.backend.store.keys("job:") == []


async def test_a_big_gallery_is_fitted_to_the_upload_limit(toolbox_bot, engine, fast_progress, monkeypatch):
    import numpy as np

    def noisy(request, progress, preview=None):
        result = sdxl_stand_in(delay=0).generate(request, progress)
        rng = np.random.default_rng(0)
        noise = [Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)) for _ in result["images"]]
        result["images"] = []
        for picture in noise:
            buffer = io.BytesIO()
            picture.save(buffer, "PNG")
            result["images"].append(buffer.getvalue())
        return result

    monkeypatch.setattr(engine, "generate", noisy)
    interaction = fake_interaction()
    interaction.filesize_limit = 60_000
    await generate(toolbox_bot, interaction, "noise", count=2)
    final = final_edit(interaction)
    for file in final["attachments"]:
        file.fp.seek(0)
        assert file.filename.endswith((".webp", ".jpg")) and len(file.fp.read()) <= 60_000
    assert "upload limit" in final["content"]


async def test_u_v_and_reroll_work_from_their_custom_ids_after_a_restart(toolbox_bot, make_toolbox_bot, engine, fast_progress):
    interaction = fake_interaction()
    await generate(toolbox_bot, interaction, "a red fox", count=2, seed=7, steps=30, cfg=4.0)
    job_id = (await toolbox_bot.backend.store.keys("job:"))[0].split(":", 1)[1]
    files = final_edit(interaction)["attachments"]
    message = fake_message(*(attachment_from(file) for file in files))
    assert image_attachment(message, 2).filename == "image2.png" and image_attachment(message, 3) is None

    # A new bot on the same data dir: nothing in memory, only the store and the message.
    restarted = await make_toolbox_bot("cogs.caption", "cogs.upscale", "cogs.generate")

    async def press(action, on=message):
        click = fake_interaction()
        click.message, click.client = on, restarted
        await press_button(f"toolbox:generate:{action}:{job_id}", click)
        return click

    await press("u2")
    upscale = engine.upscaled[-1]
    assert upscale["scale"] == 2.0 and upscale["prompt"] == "a red fox"
    files[1].fp.seek(0)
    second = Image.open(files[1].fp)
    assert list(Image.open(io.BytesIO(upscale["image"])).getdata()) == list(second.convert("RGB").getdata())
    await press("v1")
    variation = engine.generated[-1]
    assert variation["prompt"] == "a red fox" and variation["steps"] == 30 and variation["cfg"] == 4.0
    assert variation["count"] == 2 and variation["seed"] != 7 and variation["image"].startswith(b"\x89PNG")
    await press("reroll")
    reroll = engine.generated[-1]
    assert reroll["seed"] != 7 and reroll["image"] is None and (reroll["steps"], reroll["cfg"]) == (30, 4.0)

    click = await press("v2", on=fake_message())
    assert "no longer attached" in ephemeral_error(click)
    click = fake_interaction()
    click.message, click.client = message, restarted
    await press_button("toolbox:generate:reroll:0123abcd", click)
    assert "no longer kept" in ephemeral_error(click)


async def test_a_face_photo_reaches_the_worker_and_v_and_reroll_keep_it(toolbox_bot, make_toolbox_bot, engine,
                                                                         fast_progress):
    face_png, pose_png = png_bytes(2000, 1000, seed=1), png_bytes(300, 300, seed=2)
    await enable_instantid(toolbox_bot.backend.store)
    interaction = fake_interaction()
    await generate(toolbox_bot, interaction, "portrait", seed=3, identity_strength=1.1,
                   face=fake_attachment(face_png, "me.png"), pose=fake_attachment(pose_png, "pose.png"))
    assert ephemeral_error(interaction) is None
    request = engine.generated[0]
    face = Image.open(io.BytesIO(request["face_image"]))
    assert face.size == (1536, 768)  # shrunk on the way: face analysis needs no more
    assert Image.open(io.BytesIO(request["pose_image"])).size == (300, 300)
    assert request["identity_strength"] == 1.1 and request["controlnet_strength"] == 0.8
    final = final_edit(interaction)
    assert "Generate with a face" in final["content"] and "face 1.1 · pose 0.8" in final["content"]
    assert "3 faces in the face photo: the largest one was used." in final["content"]

    job_id = (await toolbox_bot.backend.store.keys("job:"))[0].split(":", 1)[1]
    message = fake_message(*(attachment_from(file) for file in final["attachments"]))
    restarted = await make_toolbox_bot("cogs.caption", "cogs.upscale", "cogs.generate")
    for action in ("v1", "reroll"):
        click = fake_interaction()
        click.message, click.client = message, restarted
        await press_button(f"toolbox:generate:{action}:{job_id}", click)
        again = engine.generated[-1]
        assert again["face_image"] == request["face_image"] and again["pose_image"] == request["pose_image"]
        assert again["identity_strength"] == 1.1 and again["seed"] != 3
    assert engine.generated[-2]["image"].startswith(b"\x89PNG")  # V: the result as the start, the face kept


async def test_bad_face_photos_are_refused_before_a_job(toolbox_bot, engine, fast_progress):
    interaction = fake_interaction()
    await generate(toolbox_bot, interaction, "portrait", face=fake_attachment(png_bytes(64, 64), "me.png"))
    assert "InstantID (IdentityNet and face adapter) is not enabled: the bot's operator enables it in /setup" in ephemeral_error(interaction)
    await enable_instantid(toolbox_bot.backend.store)
    interaction = fake_interaction()
    await generate(toolbox_bot, interaction, "portrait", pose=fake_attachment(png_bytes(64, 64), "pose.png"))
    assert "only with a face photo" in ephemeral_error(interaction)
    interaction = fake_interaction()
    await generate(toolbox_bot, interaction, "portrait", face=fake_attachment(b"GIF89a broken", "face.gif", "image/gif"))
    assert "face.gif" in ephemeral_error(interaction)
    assert engine.generated == [] and await toolbox_bot.backend.store.keys("job:") == []


class PromptCaptionEngine:
    """Captions in the `prompt` style, as booru tags."""

    loaded = True

    def load(self):
        pass

    def caption(self, request, progress):
        return [f"masterpiece, best quality, 1girl, {request.style}" for _ in request.images]


async def test_a_prompt_caption_has_a_generate_from_this_button(toolbox_bot, make_toolbox_bot, engine, fast_progress, stand_in_engines):
    stand_in_engines.use(CaptionRequest, PromptCaptionEngine())
    interaction = fake_interaction()
    style = discord.app_commands.Choice(name="prompt", value="prompt")
    await invoke(toolbox_bot, toolbox_bot.tree.get_command("caption"), interaction, fake_attachment(png_bytes(40, 40)), style, None)
    final = final_edit(interaction)
    assert "masterpiece, best quality, 1girl, prompt" in final["content"]
    (button,) = final["view"].children
    caption_job = button.custom_id.rsplit(":", 1)[1]
    assert button.item.label == "Generate from this" and button.custom_id == f"toolbox:caption-generate:{caption_job}"

    restarted = await make_toolbox_bot("cogs.caption", "cogs.upscale", "cogs.generate")
    click = fake_interaction()
    click.client = restarted
    await press_button(f"toolbox:caption-generate:{caption_job}", click)
    assert engine.generated[-1]["prompt"] == "masterpiece, best quality, 1girl, prompt"

    # Other styles carry no such button.
    interaction = fake_interaction()
    tags = discord.app_commands.Choice(name="tags", value="tags")
    await invoke(toolbox_bot, toolbox_bot.tree.get_command("caption"), interaction, fake_attachment(png_bytes(40, 40)), tags, None)
    assert final_edit(interaction)["view"] is None
