"""`toolbox` in a newcomer's hands: every failure one `error: CODE: message` line with the right exit status,
help texts that name ranges and defaults, a base install (no engines) that says so, the models named at once."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import bot.cli.parser
from bot.cli import main
from bot.cli.parser import build_parser
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs import limits
from modal_services.jobs.requests import CaptionRequest, FluxGenerateRequest, GenerateRequest, UpscaleRequest
from modal_services.jobs.validation import field_bounds
from modal_services.services import ENGINE_LIBRARIES, NO_ENGINES_MESSAGE

ROOT = Path(__file__).resolve().parents[2]
# A range as help texts write it: `1.5-4`, `-2 to 2`, `more than 0 up to 300`.
RANGE = re.compile(r"-?\d+(\.\d+)?(-| to | up to )-?\d+(\.\d+)?")

# Runs `bot.cli.main` on each argv in turn, as a base install would (the `engines` extra's libraries cannot be
# imported), and prints each run's exit status and stderr, and whether torch got imported.
_BASE_INSTALL = """
import contextlib, io, json, sys
for name in json.loads(sys.argv[1]):
    sys.modules[name] = None
from bot.cli import main
from modal_services.services import missing_engine_libraries
runs = []
for argv in json.loads(sys.argv[2]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    runs.append({"code": code, "stderr": err.getvalue()})
print(json.dumps({"runs": runs, "missing": missing_engine_libraries()}))
"""


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write_png(path: Path, size: tuple[int, int] = (64, 64)) -> Path:
    Image.new("RGB", size, (120, 90, 60)).save(path)
    return path


def sub_parsers(parser: argparse.ArgumentParser, prefix: str = "toolbox"):
    """(`toolbox models edit`, its parser) for every command and verb, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield f"{prefix} {name}", child
                yield from sub_parsers(child, f"{prefix} {name}")


# ------------------------------------------------------------------ help texts


def test_every_numeric_option_names_its_range_and_default():
    checked = 0
    for command, parser in sub_parsers(build_parser()):
        for action in parser._actions:
            if action.type not in (int, float):
                continue
            checked += 1
            where = f"{command} {action.option_strings[-1]}"
            assert action.help and RANGE.search(action.help), f"{where}: no range in {action.help!r}"
            if action.default is not None:
                assert "default" in action.help, f"{where}: no default in {action.help!r}"
    assert checked >= 12  # generate's, upscale's, caption's, models edit's and serve's numbers


def test_upscale_scale_help_says_its_range_and_default(capsys):
    with pytest.raises(SystemExit) as leaving:
        main(["upscale", "--help"])
    assert leaving.value.code == 0
    assert "1.5-4 (default 2)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("model, field, bounds", [
    (UpscaleRequest, "scale", limits.SCALE), (UpscaleRequest, "creativity", limits.CREATIVITY),
    (GenerateRequest, "steps", limits.GENERATION_STEPS), (GenerateRequest, "count", limits.IMAGE_COUNT),
    (GenerateRequest, "cfg", limits.CFG), (GenerateRequest, "width", limits.SDXL_SIDE),
    (GenerateRequest, "identity_strength", limits.IDENTITY_STRENGTH),
    (GenerateRequest, "controlnet_strength", limits.CONTROLNET_STRENGTH),
    (FluxGenerateRequest, "guidance", limits.GUIDANCE), (FluxGenerateRequest, "height", limits.FLUX_SIDE),
])
def test_the_help_s_limits_are_the_requests_own(model, field, bounds):
    assert field_bounds(model, field) == (bounds.low, bounds.high)
    assert model.model_fields[field].default == bounds.default


def test_the_caption_batch_limit_is_the_request_s(capsys, tmp_path):
    assert field_bounds(CaptionRequest, "images")[1] == limits.MAX_CAPTION_IMAGES
    image = write_png(tmp_path / "a.png")
    code, _, err = run(capsys, "caption", str(image), "--batch-size", str(limits.MAX_CAPTION_IMAGES + 1))
    assert code == 2 and err == f"error: INVALID_INPUT: --batch-size must be from 1 to {limits.MAX_CAPTION_IMAGES}.\n"


# ------------------------------------------------------------------ one line, the right exit status


@pytest.mark.parametrize("url", ["notaurl", "ftp://example.com", "http://", "http://host:port/"])
def test_a_bad_api_address_is_invalid_input_before_any_connection(capsys, url):
    code, out, err = run(capsys, "generate", "a cat", "--api", url)
    assert (code, out) == (2, "")
    assert err.startswith("error: INVALID_INPUT: --api ") and err.count("\n") == 1


def test_an_error_while_the_commands_are_imported_is_one_line(capsys, monkeypatch):
    def broken_parser():
        raise ToolboxError(ErrorCode.INVALID_INPUT, "TOOLBOX_SOMETHING must be a number.")

    monkeypatch.setattr(bot.cli.parser, "build_parser", broken_parser)
    code, out, err = run(capsys, "--help")
    assert (code, out, err) == (2, "", "error: INVALID_INPUT: TOOLBOX_SOMETHING must be a number.\n")


def test_a_bad_upscale_size_setting_is_one_line_not_a_traceback(tmp_path):
    """Read at import (the limits module): a subprocess, so that the import really happens with it."""
    image = write_png(tmp_path / "in.png")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "TOOLBOX_DATA_DIR": str(tmp_path / "data"),
           "HOME": str(tmp_path), "TOOLBOX_UPSCALE_MAX_MP": "abc"}
    done = subprocess.run([sys.executable, "-m", "bot.cli", "upscale", str(image)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("error: INVALID_INPUT: TOOLBOX_UPSCALE_MAX_MP must be a number from 1 to 1024 "
                           "(default 16), not 'abc'.\n")


# ------------------------------------------------------------------ a base install: no engines


def test_a_base_install_says_it_has_no_engines_in_one_line(tmp_path):
    image = write_png(tmp_path / "in.png")
    argvs = [["generate", "a cat"], ["caption", str(image)], ["upscale", str(image)], ["models", "list"]]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "TOOLBOX_DATA_DIR": str(tmp_path / "data"),
           "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _BASE_INSTALL, json.dumps(ENGINE_LIBRARIES), json.dumps(argvs)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["missing"] == list(ENGINE_LIBRARIES)
    *jobs, listing = report["runs"]
    for argv, outcome in zip(argvs, jobs):
        assert outcome == {"code": 1, "stderr": f"error: BACKEND_UNAVAILABLE: {NO_ENGINES_MESSAGE}\n"}, argv
    assert listing["code"] == 0  # what needs no engine still works


# ------------------------------------------------------------------ models


def test_every_missing_model_is_named_at_once(capsys):
    code, out, err = run(capsys, "generate", "a cat")
    assert (code, out) == (1, "") and err.count("\n") == 1 and err.startswith("error: MODELS_MISSING: ")
    for key in ("illustrious-xl", "sdxl-base", "controlnet-tile", "sdxl-vae", "ip-adapter", "clip-vit-h",
                "wd-tagger", "nsfw-classifier"):
        assert key in err, key
    assert str(Path.cwd()) not in err  # no absolute paths


def test_a_caption_with_its_model_missing_fails_fast_without_torch(tmp_path):
    image = write_png(tmp_path / "in.png")
    probe = ("import sys, time; from bot.cli import main; started = time.process_time(); "
             f"code = main(['caption', {str(image)!r}]); "
             "print(code, 'torch' in sys.modules, round(time.process_time() - started, 2))")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "TOOLBOX_DATA_DIR": str(tmp_path / "data"),
           "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    code, torch_imported, seconds = done.stdout.split()
    assert (code, torch_imported) == ("1", "False"), done.stderr
    assert float(seconds) < 1.0
    assert done.stderr.startswith("error: MODELS_MISSING: ") and "qwen3-vl-2b" in done.stderr
    assert str(tmp_path) not in done.stderr


def test_using_the_base_checkpoint_while_its_file_is_missing_is_refused(capsys, tmp_path):
    code, out, err = run(capsys, "models", "use", "illustrious-xl")
    assert (code, out) == (1, "") and err.startswith("error: MODELS_MISSING: ")
    assert "toolbox setup --only illustrious-xl" in err
    checkpoint = tmp_path / "data" / "models" / "illustrious-xl" / "Illustrious-XL-v2.0.safetensors"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"weights")
    code, out, _ = run(capsys, "models", "use", "illustrious-xl")
    assert code == 0 and out.startswith("active checkpoint: Illustrious-XL")


def test_a_scan_that_finds_nothing_says_what_it_checked(capsys, tmp_path):
    code, out, err = run(capsys, "models", "scan")
    assert code == 0, err
    assert out == "0 LoRAs and 0 checkpoints checked: every file present, none untracked.\n"


@pytest.mark.slow
def test_the_bot_without_a_modal_token_stops_at_once_before_discord(tmp_path):
    """A real `toolbox bot` on the Modal backend with no Modal token anywhere: one line, exit 1, in seconds
    (Discord would be retried for a minute first, each try a log line)."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "TOOLBOX_DATA_DIR": str(tmp_path / "data"),
           "HOME": str(tmp_path), "TOOLBOX_BACKEND": "modal", "DISCORD_TOKEN": "not-a-real-token"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "bot.cli", "bot"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert time.monotonic() - started < 20
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: PERMISSION_DENIED: Modal has no valid token") and done.stderr.count("\n") == 1
