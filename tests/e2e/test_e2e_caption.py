"""End to end: the cog → LocalBackend → the caption engine on a tiny Qwen3-VL → the reply."""

from __future__ import annotations

import pytest

from bot.backend import LocalBackend
from bot.cli import main as toolbox
from bot.settings import Settings
from modal_services.engines.caption import CaptionEngine
from modal_services.layout import Layout
from modal_services.jobs.requests import CaptionRequest
from modal_services.jobs.records import JobStatus, load_job
from tests.fakes.discord_fakes import ephemeral_error, fake_attachment, fake_interaction, fake_message, invoke
from tests.images import encode, noise_image, png_bytes


@pytest.fixture(scope="module")
def reference_engine(tiny_qwen_dir):
    engine = CaptionEngine(Layout(tiny_qwen_dir.parent))
    engine.load()
    return engine


@pytest.fixture
async def toolbox_bot(installed_caption_model, fast_progress, make_toolbox_bot):
    return await make_toolbox_bot("cogs.caption")


async def test_slash_caption_end_to_end(toolbox_bot, reference_engine):
    data = png_bytes(120, 90, seed=11)
    interaction = fake_interaction()
    await invoke(toolbox_bot, toolbox_bot.tree.get_command("caption"), interaction, fake_attachment(data), None, None)

    assert ephemeral_error(interaction) is None
    assert interaction.calls.mock_calls[0][0] == "defer"
    edits = [call.kwargs["content"] for call in interaction.calls.edit_original_response.await_args_list]
    expected = reference_engine.caption(CaptionRequest(images=[data], style="descriptive"), lambda f, s: None)[0]
    assert expected and expected.replace("```", "'''") in edits[-1]
    assert any("Loading the model" in text or "Captioning" in text or "Queued" in text for text in edits[:-1])

    [key] = await toolbox_bot.backend.store.keys("job:")
    job = await load_job(toolbox_bot.backend.store, key.split(":", 1)[1])
    assert job.status is JobStatus.DONE and job.owner["user_id"] == interaction.user.id


async def test_menu_batch_end_to_end(toolbox_bot, reference_engine):
    images = [png_bytes(64, 64, seed=21), encode(noise_image(80, 48, seed=22), "JPEG")]
    message = fake_message(fake_attachment(images[0], "one.png"), fake_attachment(images[1], "two.jpg", "image/jpeg"))
    interaction = fake_interaction()
    await invoke(toolbox_bot, toolbox_bot.captions.menu, interaction, message)
    sent = [interaction.calls.edit_original_response.await_args.kwargs["content"]]
    sent += [call.args[0] for call in interaction.calls.followup_send.await_args_list]
    reply = "\n".join(sent)
    assert "**1. one.png**" in reply and "**2. two.jpg**" in reply
    assert ephemeral_error(interaction) is None


@pytest.mark.slow
def test_cli_caption_with_sidecars(installed_caption_model, tmp_path, reference_engine, capsys):
    paths = []
    for index in range(3):
        path = tmp_path / f"img{index}.png"
        path.write_bytes(png_bytes(64, 48, seed=30 + index))
        paths.append(path)
    assert toolbox(["caption", *map(str, paths), "--style", "prompt", "--sidecar", "--batch-size", "2"]) == 0
    for path in paths:
        expected = reference_engine.caption(CaptionRequest(images=[path.read_bytes()], style="prompt"), lambda f, s: None)[0]
        assert path.with_suffix(".txt").read_text(encoding="utf-8") == expected + "\n"


# ---- the `tags` style: the booru tagger's tags, with no caption model installed at all

# The tiny "safe" tagger's tags for an image with no red in it (tests/engines/test_caption_tags.py says why).
SAFE_TAGS = "hatsune miku, 1girl, solo, long hair, ^_^, smile, general"


def blue_png() -> bytes:
    from PIL import Image

    return encode(Image.new("RGB", (96, 64), (0, 0, 255)))


async def test_slash_caption_tags_come_from_the_tagger(install_tagger, fast_progress, make_toolbox_bot):
    from discord import app_commands

    install_tagger("safe")
    toolbox_bot = await make_toolbox_bot("cogs.caption")
    interaction = fake_interaction()
    await invoke(toolbox_bot, toolbox_bot.tree.get_command("caption"), interaction, fake_attachment(blue_png()),
                 app_commands.Choice(name="tags", value="tags"), None)
    assert ephemeral_error(interaction) is None
    reply = interaction.calls.edit_original_response.await_args.kwargs["content"]
    assert "Caption (tags)" in reply and SAFE_TAGS in reply


def test_cli_caption_tags_with_sidecars(install_tagger, tmp_path, capsys):
    install_tagger("safe")
    paths = [tmp_path / "one.png", tmp_path / "two.png"]
    for path in paths:
        path.write_bytes(blue_png())
    assert toolbox(["caption", *map(str, paths), "--style", "tags", "--sidecar", "--batch-size", "1"]) == 0
    assert [path.with_suffix(".txt").read_text(encoding="utf-8") for path in paths] == [SAFE_TAGS + "\n"] * 2
    # The other styles need the caption model, which is not installed here.
    assert toolbox(["caption", str(paths[0]), "--style", "descriptive"]) == 1
    assert capsys.readouterr().err.startswith("error: MODELS_MISSING: ")


def test_cli_caption_prints_and_fails_cleanly(installed_caption_model, tmp_path, capsys):
    image = tmp_path / "one.png"
    image.write_bytes(png_bytes(seed=40))
    assert toolbox(["caption", str(image), "--style", "short"]) == 0
    assert capsys.readouterr().out.strip()

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not a png")
    assert toolbox(["caption", str(image), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_INPUT: ") and "bad.png" in err
    assert not image.with_suffix(".txt").exists()


def test_cli_reports_missing_models(tmp_path, capsys):
    image = tmp_path / "one.png"
    image.write_bytes(png_bytes())
    assert toolbox(["caption", str(image)]) == 1
    assert capsys.readouterr().err.startswith("error: MODELS_MISSING: ")


def test_cli_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exited:
        toolbox(["caption"])
    assert exited.value.code == 2


async def test_uncollected_local_results_are_let_go(monkeypatch, fast_progress, stand_in_engines):
    import asyncio

    import bot.backend
    from tests.fakes.engines import SlowCaptionEngine

    monkeypatch.setattr(bot.backend, "RESULT_KEEP_SECONDS", 0.05)
    stand_in_engines.use(CaptionRequest, SlowCaptionEngine(steps=1, delay=0))
    backend = LocalBackend(Settings.load(), engines=stand_in_engines)
    job = await backend.submit(CaptionRequest.parse({"images": [png_bytes()], "style": "short", "question": None}))
    for _ in range(200):
        if (await backend.job(job.id)).status is JobStatus.DONE and job.id not in backend._tasks:
            break
        await asyncio.sleep(0.02)
    assert job.id not in backend._tasks  # nobody asked for it: not kept forever
    with pytest.raises(Exception, match="no longer kept"):
        await backend.result(job.id)
    await backend.close()
