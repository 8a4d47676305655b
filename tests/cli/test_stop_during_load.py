"""`toolbox bot` stopped by SIGTERM while a model loads: one quiet line, no ERROR, no traceback, exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]

# `toolbox bot` itself, with a supervisor that instead of Discord submits one caption job and waits for the
# stop. Its engine loads slowly and then, as transformers' loading does, hands work to a thread pool.
BOT_LOADING_A_MODEL = textwrap.dedent("""
    import asyncio, sys, time
    from concurrent.futures import ThreadPoolExecutor

    import bot.runner
    from bot.backend import LocalBackend
    from bot.cli import main
    from bot.settings import Settings
    from modal_services.engines.loading import loading
    from modal_services.jobs.requests import CaptionRequest
    from tests.fakes.engines import StandInEngines, flat_png

    class SlowLoadingCaptionEngine:
        loaded = False

        def load(self):
            print("loading", flush=True)
            with loading("the caption model", "models/qwen3-vl-2b"):
                time.sleep(4)
                with ThreadPoolExecutor(2) as pool:
                    pool.submit(time.sleep, 0).result()
            self.loaded = True

        def caption(self, request, progress):
            return ["a caption"]

    class CaptionThenWait:
        def run(self, stop):
            asyncio.run(self.session(stop))

        async def session(self, stop):
            engines = StandInEngines()
            engines.use(CaptionRequest, SlowLoadingCaptionEngine())
            backend = LocalBackend(Settings.load(), engines)
            await backend.start()
            await backend.submit(CaptionRequest(images=[flat_png((64, 64), 1)], style="short"))
            await asyncio.to_thread(stop.wait)
            await backend.close()

    bot.runner.bot_supervisor = lambda settings: CaptionThenWait()
    sys.exit(main(["bot"]))
""")


@pytest.mark.slow
def test_sigterm_while_the_caption_model_loads_is_one_quiet_line(tmp_path):
    env = {**os.environ, "TOOLBOX_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(REPOSITORY),
           "DISCORD_TOKEN": "fake-token", "NO_COLOR": "1"}
    bot = subprocess.Popen([sys.executable, "-c", BOT_LOADING_A_MODEL], env=env, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert bot.stdout.readline() == "loading\n"
        started = time.monotonic()
        bot.send_signal(signal.SIGTERM)
        _, stderr = bot.communicate(timeout=20)
    finally:
        if bot.poll() is None:
            bot.kill()
    took = time.monotonic() - started
    assert bot.returncode == 0, stderr
    assert "ERROR" not in stderr and "Traceback" not in stderr, stderr
    [line] = [line for line in stderr.splitlines() if "CaptionService" in line]
    assert "[INFO    ] bot: stopped without waiting for CaptionService: a model load" in line
    assert took < 3.5  # the grace, not the rest of the load
