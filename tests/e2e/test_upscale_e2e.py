"""End to end on the tiny models: `toolbox upscale` and /upscale through the LocalBackend and the real engine."""

from __future__ import annotations

import io

import pytest
from PIL import Image

import bot.core.following
from bot.backend import LocalBackend
from bot.cli import main
from bot.client import ToolboxBot
from bot.settings import Settings
from tests.fakes.discord_fakes import ephemeral_error, fake_attachment, fake_interaction, invoke
from tests.images import png_bytes


@pytest.fixture
def settings(tiny_sdxl_data_dir, monkeypatch):
    monkeypatch.setenv("TOOLBOX_DATA_DIR", str(tiny_sdxl_data_dir))
    monkeypatch.setattr(bot.core.following, "POLL_INTERVAL", 0.02)
    return Settings.load()


def test_toolbox_upscale_writes_the_result(settings, tmp_path, capsys):
    source = tmp_path / "in.png"
    source.write_bytes(png_bytes(48, 40))
    out = tmp_path / "out.png"
    assert main(["upscale", str(source), "--scale", "2", "--lora", "Detail Tweaker:0.5", "--seed", "3", "-o", str(out)]) == 0
    assert Image.open(out).size == (96, 80)
    assert "seed 3" in capsys.readouterr().out

    assert main(["upscale", str(source), "--lora", "nope"]) == 2
    assert "error: INVALID_INPUT: No lora named 'nope'" in capsys.readouterr().err
    assert main(["upscale", str(source), "--scale", "9"]) == 2


async def test_slash_upscale_with_a_library_lora(settings):
    toolbox_bot = ToolboxBot(settings, LocalBackend(settings))
    await toolbox_bot.load_extension("cogs.upscale")
    try:
        interaction = fake_interaction()
        await invoke(toolbox_bot, toolbox_bot.tree.get_command("upscale"), interaction,
                     fake_attachment(png_bytes(40, 32)), 2.0, "a cat", None, "detail.safetensors", 1.0,
                     None, None, None, None, 0.5, 5)
        assert ephemeral_error(interaction) is None
        final = interaction.calls.edit_original_response.await_args.kwargs
        result = final["attachments"][0]
        result.fp.seek(0)
        assert Image.open(io.BytesIO(result.fp.read())).size == (80, 64)
        assert "Detail Tweaker (1)" in final["content"]
    finally:
        await toolbox_bot.backend.close()


@pytest.mark.slow
def test_toolbox_upscale_with_tile_captions(settings, tiny_sdxl_data_dir, tiny_qwen_dir, tmp_path, capsys):
    from modal_services.layout import CAPTION_MODEL

    caption_model = tiny_sdxl_data_dir / "models" / CAPTION_MODEL
    if not caption_model.exists():
        caption_model.symlink_to(tiny_qwen_dir, target_is_directory=True)
    source = tmp_path / "in.png"
    source.write_bytes(png_bytes(48, 40, seed=5))
    plain, captioned = tmp_path / "plain.png", tmp_path / "captioned.png"
    assert main(["upscale", str(source), "--seed", "4", "-o", str(plain)]) == 0
    assert main(["upscale", str(source), "--seed", "4", "--tile-captions", "-o", str(captioned)]) == 0
    assert Image.open(captioned).size == (96, 80)
    # Same seed, same everything but the tiles' prompts: the captions reached the engine.
    assert plain.read_bytes() != captioned.read_bytes()
