"""/caption and the "Caption image" menu with fake interactions, on the real LocalBackend."""

from __future__ import annotations

import threading

import pytest
from PIL import Image

from modal_services.jobs.requests import CaptionRequest
from tests.fakes.engines import SlowCaptionEngine
from tests.fakes.discord_fakes import ephemeral_error, fake_attachment, fake_interaction, fake_message, invoke
from tests.images import animated_gif, decompression_bomb, encode, noise_image, png_bytes


@pytest.fixture
def slow_engine(stand_in_engines):
    engine = SlowCaptionEngine()
    stand_in_engines.use(CaptionRequest, engine)
    return engine


@pytest.fixture
async def toolbox_bot(make_toolbox_bot):
    return await make_toolbox_bot("cogs.caption")


def caption_command(bot):
    return bot.tree.get_command("caption")


def caption_menu(bot):
    return bot.captions.menu


async def jobs_started(bot) -> int:
    return len(await bot.backend.store.keys("job:"))


def final_text(interaction) -> str:
    return interaction.calls.edit_original_response.await_args.kwargs["content"]


async def test_command_is_registered_with_its_options(toolbox_bot):
    command = caption_command(toolbox_bot)
    assert [p.name for p in command.parameters] == ["image", "style", "question"]
    assert [c.value for c in command.parameters[1].choices] == ["descriptive", "tags", "short", "prompt"]
    assert caption_menu(toolbox_bot).name == "Caption image"


async def test_caption_defers_first_shows_progress_then_the_caption(toolbox_bot, slow_engine, fast_progress):
    interaction = fake_interaction()
    image = fake_attachment(png_bytes(120, 80))
    await invoke(toolbox_bot, caption_command(toolbox_bot), interaction, image, None, None)

    names = [call[0] for call in interaction.calls.mock_calls]
    assert names[0] == "defer"
    assert interaction.calls.defer.await_args.kwargs == {"thinking": True}
    edits = [call.kwargs["content"] for call in interaction.calls.edit_original_response.await_args_list]
    assert any("▰" in text for text in edits[:-1]), edits
    assert len(edits) == len(set(edits)), "the same text was sent twice"
    assert "```\ndescriptive 120x80\n```" in edits[-1]
    assert ephemeral_error(interaction) is None
    assert slow_engine.batches == [1]


async def test_style_and_question_reach_the_engine(toolbox_bot, slow_engine, fast_progress):
    from discord import app_commands

    interaction = fake_interaction()
    tags = app_commands.Choice(name="tags", value="tags")
    await invoke(toolbox_bot, caption_command(toolbox_bot), interaction, fake_attachment(png_bytes()), tags, None)
    assert "tags 96x64" in final_text(interaction)

    interaction = fake_interaction()
    await invoke(toolbox_bot, caption_command(toolbox_bot), interaction, fake_attachment(png_bytes()), tags, "Who?")
    assert "Who? 96x64" in final_text(interaction) and "Answer" in final_text(interaction)


async def test_menu_captions_every_image_in_one_batch(toolbox_bot, slow_engine, fast_progress):
    message = fake_message(
        fake_attachment(png_bytes(10, 20), "a.png"),
        fake_attachment(b"just text", "notes.txt", "text/plain"),
        fake_attachment(png_bytes(30, 40), "b.png"),
        fake_attachment(encode(noise_image(50, 60), "JPEG"), "c.jpg", "image/jpeg"),
    )
    interaction = fake_interaction()
    await invoke(toolbox_bot, caption_menu(toolbox_bot), interaction, message)
    text = final_text(interaction)
    assert slow_engine.batches == [3]
    for index, (name, size) in enumerate((("a.png", "10x20"), ("b.png", "30x40"), ("c.jpg", "50x60")), start=1):
        assert f"**{index}. {name}**" in text and f"descriptive {size}" in text


async def test_animated_gif_uses_its_first_frame(toolbox_bot, slow_engine, fast_progress):
    interaction = fake_interaction()
    await invoke(toolbox_bot, caption_command(toolbox_bot), interaction,
                 fake_attachment(animated_gif(), "anim.gif", "image/gif"), None, None)
    assert "first frame" in final_text(interaction) and "descriptive 40x30" in final_text(interaction)


BEFORE_DEFER = {
    "not an image": (fake_attachment, (b"%PDF-1.4", "doc.pdf", "application/pdf"), "not an image"),
    "zero bytes": (fake_attachment, (b"", "empty.png", "image/png"), "empty"),
    "huge file": (fake_attachment, (png_bytes(), "big.png", "image/png", 60 * 1024 * 1024), "limit"),
    # Discord reports an image's width and height: a 30000×30000 PNG is refused without downloading it.
    "huge image by its reported size": (fake_attachment, (png_bytes(), "wide.png", "image/png", None, 30000, 30000),
                                        "30000×30000"),
}
AFTER_DEFER = {
    "corrupt bytes": (png_bytes()[:300], "corrupt"),
    "decompression bomb": (decompression_bomb(), "too many pixels"),
    "huge image": (encode(Image.new("1", (7000, 7000)), "PNG"), "MP"),
    "renamed non-image": (b"MZ\x90\x00 an executable", "not an image"),
}


@pytest.mark.parametrize("case", sorted(BEFORE_DEFER))
async def test_bad_metadata_is_refused_before_deferring(toolbox_bot, slow_engine, case):
    make, args, expected = BEFORE_DEFER[case]
    interaction = fake_interaction()
    await invoke(toolbox_bot, caption_command(toolbox_bot), interaction, make(*args), None, None)
    interaction.calls.defer.assert_not_awaited()
    assert expected in ephemeral_error(interaction)
    assert await jobs_started(toolbox_bot) == 0 and slow_engine.batches == []


@pytest.mark.parametrize("case", sorted(AFTER_DEFER))
async def test_bad_content_gets_a_private_error_and_starts_no_job(toolbox_bot, slow_engine, case):
    data, expected = AFTER_DEFER[case]
    interaction = fake_interaction()
    await invoke(toolbox_bot, caption_command(toolbox_bot), interaction, fake_attachment(data), None, None)
    assert expected in ephemeral_error(interaction)
    # the public "thinking…" reply is removed so the error is the user's alone
    interaction.calls.delete_original_response.assert_awaited_once()
    assert await jobs_started(toolbox_bot) == 0 and slow_engine.batches == []


async def test_an_attachment_the_cdn_will_not_serve_gets_a_private_error(toolbox_bot, slow_engine, fake_cdn):
    attachment = fake_attachment(png_bytes(), "lost.png")
    attachment.url = fake_cdn.answer(404, "lost.png")
    interaction = fake_interaction()
    await invoke(toolbox_bot, caption_command(toolbox_bot), interaction, attachment, None, None)
    assert "`lost.png` could not be downloaded" in ephemeral_error(interaction)
    interaction.calls.delete_original_response.assert_awaited_once()
    assert await jobs_started(toolbox_bot) == 0 and slow_engine.batches == []


async def test_message_without_images(toolbox_bot, slow_engine):
    interaction = fake_interaction()
    message = fake_message(fake_attachment(b"hello", "a.txt", "text/plain"))
    await invoke(toolbox_bot, caption_menu(toolbox_bot), interaction, message)
    assert "no image attachments" in ephemeral_error(interaction)
    interaction.calls.defer.assert_not_awaited()
    assert await jobs_started(toolbox_bot) == 0


async def test_missing_model_points_admins_at_setup(toolbox_bot, fast_progress):
    interaction = fake_interaction()
    await invoke(toolbox_bot, caption_command(toolbox_bot), interaction, fake_attachment(png_bytes()), None, None)
    error = ephemeral_error(interaction)
    assert "not installed" in error and "the bot's operator runs /setup → Download missing" in error


async def test_unexpected_failure_is_generic_and_logged(toolbox_bot, stand_in_engines):
    class Broken(SlowCaptionEngine):
        def caption(self, *args, **kwargs):
            raise RuntimeError("token=abc123 leaked in a traceback")

    stand_in_engines.use(CaptionRequest, Broken())
    interaction = fake_interaction()
    await invoke(toolbox_bot, caption_command(toolbox_bot), interaction, fake_attachment(png_bytes()), None, None)
    error = ephemeral_error(interaction)
    assert "Something went wrong" in error and "abc123" not in error


async def test_the_event_loop_stays_free_while_a_job_runs(toolbox_bot, fast_progress, stand_in_engines):
    engine = SlowCaptionEngine(steps=10, delay=0.03)
    stand_in_engines.use(CaptionRequest, engine)
    worker_threads = set()
    original = engine.caption

    def recording(*args, **kwargs):
        worker_threads.add(threading.current_thread().name)
        return original(*args, **kwargs)

    engine.caption = recording
    interaction = fake_interaction()
    await invoke(toolbox_bot, caption_command(toolbox_bot), interaction, fake_attachment(png_bytes()), None, None)
    assert worker_threads and all(name.startswith("engine-CaptionService") for name in worker_threads)
