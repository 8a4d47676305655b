"""`toolbox info IMAGE [--json]`: an image's generation data from a terminal, with no backend."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

from bot.cli import main
from modal_services.image_info.reading import MAX_IMAGE_BYTES
from modal_services.image_info.writing import MadeWith
from modal_services.imaging import encode_png
from tests.images import noise_image

A1111 = ("1girl, <lora:add_detail:0.5>, smile\x1b[2J\nNegative prompt: lowres\n"
         "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 42, Size: 832x1216, "
         'Model hash: 6ce0161689, Model: waiIllustrious, Lora hashes: "add_detail: 7c6bad76eb", Clip skip: 2')


def png_file(path: Path, texts: dict[str, str]) -> Path:
    info = PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    noise_image(32, 24).save(path, format="PNG", pnginfo=info)
    return path


def test_info_prints_the_prompt_and_every_setting(tmp_path, capsys):
    image = png_file(tmp_path / "remix.png", {"parameters": A1111})
    assert main(["info", str(image)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        f"{image} (A1111/Forge)", "Prompt: 1girl, smile [2J", "Negative prompt: lowres", "Steps: 30",
        "Sampler: DPM++ 2M Karras", "CFG: 6.5", "Seed: 42", "Size: 832×1216", "Model: waiIllustrious (6ce0161689)",
        "LoRA: add_detail 0.5 (7c6bad76eb)", "Clip skip: 2",
    ]
    assert "\x1b" not in out  # a terminal escape in a stranger's prompt never reaches the terminal


def test_info_json_reads_back_a_result_the_toolbox_wrote(tmp_path, capsys):
    made = MadeWith(prompt="a cat", negative_prompt="dog", steps=28, cfg=5.5, width=64, height=48,
                    sampler=("Euler a", None), model="Illustrious-XL-v2.0", loras=[])
    image = tmp_path / "generated_9.png"
    image.write_bytes(made.tagged(encode_png(noise_image(64, 48)), seed=9))
    assert main(["info", str(image), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["file"] == str(image)
    settings = printed["settings"]
    assert (settings["prompt"], settings["negative_prompt"], settings["steps"], settings["cfg"]) == ("a cat", "dog", 28, 5.5)
    assert (settings["seed"], settings["width"], settings["height"], settings["sampler"]) == (9, 64, 48, "Euler a")
    assert settings["model"] == "Illustrious-XL-v2.0" and settings["loras"] == []


def test_an_image_without_data_says_so(tmp_path, capsys):
    image = tmp_path / "photo.jpg"
    buffer = io.BytesIO()
    noise_image(16, 16).save(buffer, format="JPEG")
    image.write_bytes(buffer.getvalue())
    assert main(["info", str(image)]) == 0
    assert "no generation data" in capsys.readouterr().out
    assert main(["info", str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"file": str(image), "settings": None}


def test_what_cannot_be_read_is_a_usage_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.png")]) == 2
    assert capsys.readouterr().err.startswith("error: INVALID_INPUT: ")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert main(["info", str(text)]) == 2
    assert "is not an image I can read" in capsys.readouterr().err
    huge = tmp_path / "huge.png"
    with huge.open("wb") as file:  # sparse: its size is checked before a byte is read
        file.truncate(MAX_IMAGE_BYTES + 1)
    assert main(["info", str(huge)]) == 2
    assert "images up to 25 MiB are read" in capsys.readouterr().err


def test_info_is_listed_in_the_help(capsys):
    try:
        main(["--help"])
    except SystemExit:
        pass
    assert "info" in capsys.readouterr().out
