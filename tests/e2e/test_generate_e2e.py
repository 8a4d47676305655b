"""`toolbox generate` through the LocalBackend: once on the real engine and tiny models, and its file naming and refusals."""

from __future__ import annotations
import io

import pytest
from PIL import Image

import bot.core.following
from bot.cli import main
from bot.cli.generate import output_paths
from modal_services.jobs.requests import GenerateRequest
from tests.fakes.engines import StandInImageEngine
from tests.images import png_bytes


@pytest.fixture
def settings(tiny_sdxl_data_dir, monkeypatch):
    monkeypatch.setenv("TOOLBOX_DATA_DIR", str(tiny_sdxl_data_dir))
    monkeypatch.setattr(bot.core.following, "POLL_INTERVAL", 0.02)


@pytest.mark.slow
def test_toolbox_generate_writes_the_image(settings, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code = main(["generate", "a cat", "--width", "512", "--height", "512", "--steps", "20", "--cfg", "1",
                 "--seed", "3", "--lora", "Detail Tweaker:0.5", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert Image.open(out).size == (512, 512)
    assert f"{out} (512×512, seed 3, Illustrious-XL" in capsys.readouterr().out


@pytest.mark.slow
def test_toolbox_generate_with_a_face_runs_instantid_on_the_real_face_analysis(settings, tiny_sdxl_data_dir, tmp_path,
                                                                               capsys, monkeypatch):
    """The whole face path on the local backend: insightface on (synthetic) antelopev2, the tiny IdentityNet and
    face adapter, the tiny SDXL."""
    import shutil

    from modal_services.layout import ANTELOPEV2_DIR
    from tests.fixtures.tiny_faces import write_synthetic_antelopev2
    from tests.fixtures.tiny_instantid import add_tiny_instantid

    # A data dir of its own: the module's other tests see InstantID neither installed nor enabled.
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_sdxl_data_dir, data_dir)
    monkeypatch.setenv("TOOLBOX_DATA_DIR", str(data_dir))
    models = data_dir / "models"
    add_tiny_instantid(models)
    enable_in(data_dir)
    write_synthetic_antelopev2(models / ANTELOPEV2_DIR)
    face, dark, out = tmp_path / "face.jpg", tmp_path / "dark.png", tmp_path / "me.png"
    Image.new("RGB", (800, 800), (210, 170, 150)).save(face)
    Image.new("RGB", (800, 800), (0, 0, 0)).save(dark)
    common = ["--width", "512", "--height", "512", "--steps", "20", "--cfg", "1", "--seed", "3"]
    assert main(["generate", "a portrait", *common, "--face", str(dark), "-o", str(out)]) == 2
    assert "INVALID_INPUT: No face was found in the face image" in capsys.readouterr().err and not out.exists()
    code = main(["generate", "a portrait", *common, "--face", str(face), "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert Image.open(out).size == (512, 512)
    # The synthetic detector sees two faces in any photo that is not black.
    assert "2 faces in the face photo: the largest one was used." in capsys.readouterr().out


def enable_in(data_dir) -> None:
    import asyncio

    from modal_services.state.store import SqliteStore
    from tests.fixtures.tiny_instantid import enable_instantid

    async def enable():
        store = SqliteStore(data_dir / "state.sqlite3")
        await enable_instantid(store)
        await store.close()

    asyncio.run(enable())


def test_several_images_are_numbered_and_bad_requests_start_nothing(settings, tiny_sdxl_data_dir, tmp_path, capsys,
                                                                    backends_from_settings):
    engine = backends_from_settings.use(GenerateRequest, StandInImageEngine())
    out = tmp_path / "fox.png"
    assert main(["generate", "a fox", "--count", "3", "--seed", "10", "--aspect", "16:9", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    for index, seed in ((1, 10), (2, 11), (3, 12)):
        assert (tmp_path / f"fox_{index}.png").is_file() and f"fox_{index}.png (1344×768, seed {seed}" in printed
    request = engine.generated[0]
    assert (request["width"], request["height"], request["count"]) == (1344, 768, 3)
    assert request["checkpoint"] is None and request["timeout"] == 300 and request["face_image"] is None

    face = tmp_path / "face.png"
    face.write_bytes(png_bytes(40, 30))
    assert main(["generate", "a fox", "--face", str(face)]) == 1
    assert "MODELS_MISSING: InstantID (IdentityNet and face adapter) is not enabled" in capsys.readouterr().err
    enable_in(tiny_sdxl_data_dir)
    assert main(["generate", "a fox", "--face", str(face), "--controlnet-strength", "0.5", "-o", str(out)]) == 0
    request = engine.generated[-1]
    assert Image.open(io.BytesIO(request["face_image"])).size == (40, 30)
    assert request["controlnet_strength"] == 0.5 and request["pose_image"] is None
    not_an_image = tmp_path / "not-an-image.png"
    not_an_image.write_bytes(b"plain text")
    capsys.readouterr()

    for argv, words in (
        (["generate", "   "], "INVALID_PROMPT: The prompt cannot be empty"),
        (["generate", "a fox", "--width", "500", "--height", "512"], "INVALID_INPUT: The width must be a multiple of 64"),
        (["generate", "a fox", "--width", "512"], "the width and the height together"),
        (["generate", "a fox", "--count", "5"], "image count"),
        (["generate", "a fox", "--lora", "nope"], "No lora named 'nope'"),
        (["generate", "a fox", "--pose", str(out)], "only with a face photo"),
        (["generate", "a fox", "--face", str(tmp_path / "absent.png")], "absent.png"),
        (["generate", "a fox", "--face", str(not_an_image)], "not-an-image.png"),
        (["generate", "a fox", "--face", str(out), "--identity-strength", "3"], "identity strength must be between 0 and 1.5"),
    ):
        assert main(argv) == 2
        assert words in capsys.readouterr().err
    assert len(engine.generated) == 2


def test_output_paths():
    assert output_paths(None, 7, 1)[0].name == "generated_7.png"
    assert [path.name for path in output_paths(None, 7, 2)] == ["generated_7_1.png", "generated_7_2.png"]
    from pathlib import Path

    assert [path.name for path in output_paths(Path("out/x"), 1, 2)] == ["x_1.png", "x_2.png"]
