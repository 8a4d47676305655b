"""The Image info menu and its Generate with these settings button, with fake interactions on the real
LocalBackend: what a member sees of an image's generation data, and the /generate its button submits."""

from __future__ import annotations

import io
import json

import discord
import pytest
from PIL.PngImagePlugin import PngInfo

from cogs.image_info import GenerateWithSettingsButton
from modal_services.jobs.requests import GenerateRequest
from modal_services.library.entries import LibraryEntry, entry_key
from modal_services.layout import LORAS_SUBDIR, local_loras_dir
from modal_services.state.keys import image_info_key
from tests.bot.buttons import press
from tests.fakes.discord_fakes import ephemeral_error, fake_attachment, fake_interaction, fake_message, invoke
from tests.fakes.engines import StandInImageEngine
from tests.images import noise_image, png_bytes

DETAIL_SHA256 = "7c6bad76eb54" + "0" * 52
A1111 = ("masterpiece, 1girl, <lora:add_detail:0.5>, night sky\nNegative prompt: lowres, @everyone\n"
         "Steps: 60, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 830x1220, Model hash: 6ce0161689, "
         'Model: waiIllustrious, Lora hashes: "add_detail: 7c6bad76eb, gone: 0123456789", Version: v1.10.1')


def png_with(texts: dict[str, str]) -> bytes:
    info = PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    noise_image(40, 30).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


@pytest.fixture
def engine(stand_in_engines):
    return stand_in_engines.use(GenerateRequest, StandInImageEngine(shrink=8))


@pytest.fixture
async def toolbox_bot(make_toolbox_bot):
    bot = await make_toolbox_bot("cogs.upscale", "cogs.generate", "cogs.image_info")
    await add_lora(bot, "Detail Tweaker", "detail_tweaker.safetensors", DETAIL_SHA256)
    return bot


async def add_lora(bot, name: str, file: str, sha256: str | None) -> None:
    """A library LoRA whose file is in the data dir, as an import leaves it."""
    folder = local_loras_dir(bot.settings.data_dir) / LORAS_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / file).write_bytes(b"weights")
    entry = LibraryEntry(name=name, file=file, type="lora", sha256=sha256, weight=0.8)
    await bot.backend.store.put(entry_key(file), entry.to_dict())


def image_info_menu(bot):
    return bot.get_cog("ImageInfo").menu


async def image_info(bot, *attachments, admin: bool = False):
    interaction = fake_interaction(admin=admin)
    await invoke(bot, image_info_menu(bot), interaction, fake_message(*attachments))
    return interaction


def reply(interaction) -> dict:
    return interaction.calls.edit_original_response.await_args.kwargs


async def test_the_menu_shows_an_images_settings_privately_with_what_generate_would_do(toolbox_bot):
    interaction = await image_info(toolbox_bot, fake_attachment(png_with({"parameters": A1111}), "remix.png"), admin=True)
    assert interaction.calls.mock_calls[0][0] == "defer"
    assert interaction.calls.defer.await_args.kwargs == {"ephemeral": True, "thinking": True}
    shown = reply(interaction)
    text = shown["content"]
    assert "remix.png" in text and "A1111/Forge" in text
    assert "```\nmasterpiece, 1girl, night sky\n```" in text
    assert "lowres, @everyone" in text  # inside a code block, and no mention is allowed at all
    assert shown["allowed_mentions"].everyone is False and shown["allowed_mentions"].users is False
    assert "Steps 60 · Sampler Euler a · CFG 7 · Seed 123 · Size 830×1220" in text
    assert "Steps 60 is outside 20-50 here: 50 is used." in text
    assert "Size 830×1220 is not one SDXL makes: 832×1216 is used." in text
    assert "Made with the checkpoint waiIllustrious" in text
    assert "In the library: Detail Tweaker" in text
    assert "Not in the library, left out of Generate: gone. Add them with /models import" in text
    assert len(text) <= 2000
    [button] = shown["view"].children
    assert button.item.label == "Generate with these settings"
    assert GenerateWithSettingsButton.__discord_ui_compiled_template__.fullmatch(button.custom_id)


async def test_a_member_is_told_an_admin_adds_missing_loras(toolbox_bot):
    interaction = await image_info(toolbox_bot, fake_attachment(png_with({"parameters": A1111})))
    assert "gone. A server admin can add them." in reply(interaction)["content"]


async def test_the_button_generates_with_the_read_settings_after_a_restart(toolbox_bot, make_toolbox_bot, engine,
                                                                          fast_progress):
    interaction = await image_info(toolbox_bot, fake_attachment(png_with({"parameters": A1111})))
    custom_id = reply(interaction)["view"].children[0].custom_id
    # A new bot on the same data dir: only the store knows the settings.
    restarted = await make_toolbox_bot("cogs.upscale", "cogs.generate", "cogs.image_info")
    click = fake_interaction()
    click.client = restarted
    await press(custom_id, click)
    assert ephemeral_error(click) is None
    [request] = engine.generated
    assert request["prompt"] == "masterpiece, 1girl, night sky" and request["negative_prompt"] == "lowres, @everyone"
    assert (request["steps"], request["cfg"], request["seed"]) == (50, 7.0, 123)
    assert (request["width"], request["height"], request["count"]) == (832, 1216, 1)
    # The image's sampler, which this bot has.
    assert request["sampler"] == "Euler a"
    assert request["loras"] == [{"name": "Detail Tweaker", "file": "detail_tweaker.safetensors", "weight": 0.5,
                                 "trigger_words": []}]
    # The result is the normal /generate reply, with its own buttons.
    assert "masterpiece, 1girl, night sky" in click.calls.edit_original_response.await_args.kwargs["content"]


async def test_a_lora_found_by_name_and_one_imported_after_the_reading_are_used(toolbox_bot, engine, fast_progress):
    comfy = {"3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 30, "cfg": 6, "sampler_name": "euler",
                                                        "scheduler": "normal", "model": ["10", 0], "positive": ["6", 0]}},
             "10": {"class_type": "LoraLoader", "inputs": {"lora_name": "watercolor.safetensors", "strength_model": 0.9,
                                                           "model": ["4", 0]}},
             "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "Illustrious-XL-v2.0.safetensors"}},
             "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox"}}}
    interaction = await image_info(toolbox_bot, fake_attachment(png_with({"prompt": json.dumps(comfy)})))
    text = reply(interaction)["content"]
    assert "ComfyUI" in text and "Not in the library, left out of Generate: watercolor." in text
    assert "Made with the checkpoint" not in text  # the server's own default checkpoint
    await add_lora(toolbox_bot, "Watercolor", "watercolor.safetensors", None)
    click = fake_interaction()
    click.client = toolbox_bot
    await press(reply(interaction)["view"].children[0].custom_id, click)
    [request] = engine.generated
    assert [(lora["file"], lora["weight"]) for lora in request["loras"]] == [("watercolor.safetensors", 0.9)]


async def test_images_without_data_and_several_images_in_one_message(toolbox_bot):
    interaction = await image_info(toolbox_bot, fake_attachment(png_bytes(), "plain.png"),
                                   fake_attachment(png_with({"parameters": A1111}), "second.png"))
    shown = reply(interaction)
    assert "plain.png**: no generation data" in shown["content"]
    assert [button.item.label for button in shown["view"].children] == ["Generate with image 2's settings"]


async def test_a_prompt_too_long_for_generate_is_shown_without_a_button(toolbox_bot):
    long = "tag, " * 400 + "\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1"
    interaction = await image_info(toolbox_bot, fake_attachment(png_with({"parameters": long})))
    shown = reply(interaction)
    assert "Cannot be generated here: The image's prompt is 1999 characters; a generate request takes at most 1000." in shown["content"]
    assert shown["view"] is None and len(shown["content"]) <= 2000


async def test_hostile_metadata_is_shown_safely(toolbox_bot):
    hostile = ("```\n@everyone <@123456789012345678> **bold** " + "x" * 5000 + "\x1b[2J\n"
               "Steps: 20, Sampler: <@&123456789012345678> `x`, CFG scale: 7, Seed: 1, Model: [link](https://evil.example)")
    interaction = await image_info(toolbox_bot, fake_attachment(png_with({"parameters": hostile})))
    text = reply(interaction)["content"]
    assert len(text) <= 2000 and "\x1b" not in text
    assert text.count("```") == 2  # the prompt's own fence cannot close the block
    settings_line = next(line for line in text.split("\n") if line.startswith("Steps"))
    assert "<@&1234" not in settings_line and "\\[link]" in settings_line and "\\`x\\`" in settings_line


@pytest.mark.parametrize("attachment, words", [
    (lambda: fake_attachment(b"%PDF-1.4", "doc.pdf", "application/pdf"), "no image attachments"),
    (lambda: fake_attachment(png_bytes(), "big.png", size=30 * 1024 * 1024), "the limit is 25 MiB"),
    (lambda: fake_attachment(b"not really a png", "fake.png"), "is not an image I can read"),
])
async def test_bad_attachments_get_a_private_message(toolbox_bot, attachment, words):
    interaction = await image_info(toolbox_bot, attachment())
    assert words in ephemeral_error(interaction)


async def test_a_button_whose_settings_are_gone_or_from_another_server_says_so(toolbox_bot):
    click = fake_interaction()
    click.client = toolbox_bot
    await press("toolbox:image-info:generate:00aa", click)
    assert "no longer kept; use Image info" in ephemeral_error(click)
    interaction = await image_info(toolbox_bot, fake_attachment(png_with({"parameters": A1111})))
    elsewhere = fake_interaction(guild_id=9999)
    elsewhere.client = toolbox_bot
    await press(reply(interaction)["view"].children[0].custom_id, elsewhere)
    assert "only where it was made" in ephemeral_error(elsewhere)
    kept = await toolbox_bot.backend.store.keys("image-info:")
    assert len(kept) == 1 and kept[0] == image_info_key(kept[0].split(":", 1)[1])


def test_the_menu_is_a_message_context_menu(toolbox_bot):
    menu = image_info_menu(toolbox_bot)
    assert menu.name == "Image info" and menu.type is discord.AppCommandType.message
