"""`toolbox upscale` refuses bad values and an unwritable output at once: no engine, no job."""

from __future__ import annotations

import asyncio

import pytest

from bot.cli import main
from bot.settings import Settings
from modal_services.state.keys import JOB_PREFIX
from modal_services.state.store import SqliteStore
from tests.images import png_bytes


@pytest.fixture
def engines_built(backends_from_settings):
    """The engines the CLI's backend builds in this test (none, when a bad value stops the command first)."""
    return backends_from_settings.built


async def job_keys() -> list[str]:
    store = SqliteStore(Settings.load().state_path)
    try:
        return await store.keys(JOB_PREFIX)
    finally:
        await store.close()


@pytest.mark.parametrize("argv, words", [
    (["--creativity", "5"], "Creativity must be between 0.05 and 1 (got 5)."),
    (["--seed", "-1"], "The seed must be between 0 and 4294967295 (got -1)."),
    (["--scale", "9"], "Scale must be between 1.5 and 4 (got 9)."),
    (["--lora", "detail:7"], "A LoRA weight must be between -2 and 2 (got 7)."),
    (["-o", "/nonexistent/x.png"], "-o /nonexistent/x.png: there is no folder /nonexistent."),
])
def test_bad_values_fail_at_once_with_one_line(engines_built, tmp_path, capsys, argv, words):
    image = tmp_path / "in.png"
    image.write_bytes(png_bytes(48, 40))
    assert main(["upscale", str(image), *argv]) == 2
    out, err = capsys.readouterr()
    assert err == f"error: INVALID_INPUT: {words}\n" and out == ""
    assert engines_built == []
    assert asyncio.run(job_keys()) == []
    assert not (tmp_path / "in_x2.png").exists()


def test_an_output_in_a_folder_that_is_a_file_is_refused(engines_built, tmp_path, capsys):
    image = tmp_path / "in.png"
    image.write_bytes(png_bytes(48, 40))
    assert main(["upscale", str(image), "-o", str(image / "x.png")]) == 2
    assert capsys.readouterr().err.startswith("error: INVALID_INPUT: -o ")
    assert engines_built == []
