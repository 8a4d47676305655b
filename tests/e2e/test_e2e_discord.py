"""The real discord.py client, on `toolbox bot`'s code path, against a fake Discord on 127.0.0.1.

The bot runs as `toolbox bot` runs it (the supervisor, ToolboxBot, the local
backend) in a thread of its own; discord.py is pointed at the fake through
its own base-URL attributes. The assertions are on the HTTP requests the bot
makes: acks within 3 s, edit spacing, ephemeral flags, and no request the
fake (like Discord) refuses.
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import sys
import threading
import time
from pathlib import Path

import discord
import pytest
import yarl

from bot.runner import bot_supervisor
from bot.settings import Settings
from modal_services.jobs.requests import CaptionRequest
from tests.fakes.discord_server import EPHEMERAL, FakeDiscord
from tests.fakes.engines import GatedCaptionEngine, SlowCaptionEngine
from tests.images import png_bytes

EDIT_INTERVAL = 0.5
ACK_LIMIT = 3.0


async def eventually(check, timeout: float = 15.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def fake_discord(monkeypatch):
    fake = FakeDiscord()
    await fake.start()
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    monkeypatch.setenv("DISCORD_TOKEN", "fake-bot-token.abc.def")
    # Its CDN route is the only host attachments may come from (not Discord's, so allowed explicitly).
    cdn = yarl.URL(fake.base_url)
    monkeypatch.setenv("TOOLBOX_ALLOWED_HOSTS", f"{cdn.host}:{cdn.port}")
    yield fake
    await fake.stop()


class BotThread:
    """`toolbox bot`'s supervisor in a thread, stopped as SIGTERM stops it (the stop event)."""

    def __init__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=bot_supervisor(Settings.load()).run, args=(self.stop,), daemon=True)

    async def start(self, fake: FakeDiscord) -> None:
        fake.identified.clear()
        self.thread.start()
        await asyncio.wait_for(fake.identified.wait(), timeout=20)
        await eventually(lambda: fake.commands, what="command sync")

    async def shut_down(self) -> float:
        started = time.monotonic()
        self.stop.set()
        await asyncio.to_thread(self.thread.join, 15)
        assert not self.thread.is_alive(), "the bot did not stop"
        return time.monotonic() - started


@pytest.fixture
def pacing(monkeypatch):
    monkeypatch.setattr("bot.progress.MIN_EDIT_INTERVAL", EDIT_INTERVAL)
    monkeypatch.setattr("bot.core.following.POLL_INTERVAL", 0.05)
    monkeypatch.setattr("modal_services.jobs.records.PROGRESS_WRITE_INTERVAL", 0.05)
    monkeypatch.setattr("bot.tracker.SNAPSHOT_MAX_AGE", 0.0)


@pytest.fixture
async def live_bot(fake_discord, pacing, backends_from_settings):
    bot = BotThread()
    await bot.start(fake_discord)
    yield bot
    if bot.thread.is_alive():
        await bot.shut_down()


def caption_options(attachment: dict) -> list[dict]:
    return [{"name": "image", "type": 11, "value": attachment["id"]}]


async def caption(fake: FakeDiscord, name: str, data: bytes, user_id: int = 1001, delay: float = 0.0, **described):
    attachment = fake.attachment(name, data, delay=delay, **described)
    return await fake.send_interaction(fake.slash("caption", caption_options(attachment), user_id=user_id,
                                                  attachments=[attachment]))


def ephemeral_texts(fake: FakeDiscord, token: str) -> list[str]:
    texts = []
    for request in fake.calls_for(token):
        body = request.body or {}
        data = body.get("data", body) if request.path.endswith("/callback") else body
        if (data.get("flags") or 0) & EPHEMERAL:
            texts.append(data.get("content", ""))
    return texts


def cancel_custom_id(message: dict) -> str:
    return next(button["custom_id"] for row in message["components"] for button in row["components"]
                if button["custom_id"].startswith("toolbox:cancel:"))


async def test_caption_bad_input_and_admin_only_over_the_real_client(fake_discord, live_bot, backends_from_settings):
    fake = fake_discord
    backends_from_settings.use(CaptionRequest, SlowCaptionEngine(steps=8, delay=0.25))
    assert {"caption", "upscale", "setup", "Caption image"} <= {command["name"] for command in fake.commands}

    token = await caption(fake, "cat.png", png_bytes(64, 48))
    await eventually(lambda: any("64x48" in (r.body or {}).get("content", "") for r in fake.original_edits(token)),
                     what="the caption")
    assert fake.callback(token)["type"] == 5 and fake.ack_delay(token) < ACK_LIMIT
    edits = fake.original_edits(token)
    assert len(edits) >= 3 and "▰" in edits[1].body["content"]
    gaps = [later.at - earlier.at for earlier, later in zip(edits, edits[1:])]
    assert min(gaps) >= EDIT_INTERVAL - 0.05, gaps

    # Discord reports this image's size: refused privately, before any public "thinking…".
    huge = await caption(fake, "huge.png", png_bytes(16, 16), width=30000, height=30000)
    await eventually(lambda: fake.callback(huge), what="the refusal")
    assert fake.callback(huge)["type"] == 4 and fake.callback(huge)["data"]["flags"] & EPHEMERAL
    assert "30000×30000" in fake.callback(huge)["data"]["content"]

    # An image by name whose bytes are not: found after the defer, then answered privately.
    fake_png = await caption(fake, "fake.png", b"this is text, not a PNG")
    await eventually(lambda: ephemeral_texts(fake, fake_png), what="the late refusal")
    assert [r.method for r in fake.calls_for(fake_png)][-2:] == ["DELETE", "POST"]

    setup = await fake.send_interaction(fake.slash("setup", [], user_id=4242, admin=False))
    await eventually(lambda: fake.callback(setup), what="the admin check")
    assert fake.callback(setup)["data"]["flags"] & EPHEMERAL
    assert fake.refused == []


async def test_a_burst_over_the_cap_and_a_cancel(fake_discord, live_bot, backends_from_settings):
    fake = fake_discord
    gate = threading.Event()
    backends_from_settings.use(CaptionRequest, GatedCaptionEngine(gate))
    tokens = await asyncio.gather(*(caption(fake, f"b{i}.png", png_bytes(32, 32, seed=i), user_id=7, delay=0.5)
                                    for i in range(5)))
    await eventually(lambda: all(fake.callback(token) for token in tokens), what="every ack")
    assert max(fake.ack_delay(token) for token in tokens) < ACK_LIMIT
    refused = await eventually(lambda: [t for t in tokens if ephemeral_texts(fake, t)] if
                               sum(bool(ephemeral_texts(fake, t)) for t in tokens) == 3 else None, what="3 refusals")
    assert all("You already have" in ephemeral_texts(fake, token)[0] for token in refused)
    running = [token for token in tokens if token not in refused]
    assert len(running) == 2

    job_message = await eventually(lambda: (fake.interactions[running[0]]["original"] or {}).get("components")
                                   and fake.interactions[running[0]]["original"], what="a Cancel button")
    press = await fake.send_interaction(fake.button(cancel_custom_id(job_message), job_message, user_id=7))
    await eventually(lambda: fake.callback(press), what="the cancel ack")
    assert fake.callback(press)["data"]["flags"] & EPHEMERAL
    await eventually(lambda: any("Cancelled" in text for text in ephemeral_texts(fake, running[0])), what="Cancelled")
    gate.set()
    await eventually(lambda: any("a caption" in (r.body or {}).get("content", "") for r in fake.original_edits(running[1])),
                     what="the other job's caption")
    for token in tokens:
        edits = fake.original_edits(token)
        gaps = [later.at - earlier.at for earlier, later in zip(edits, edits[1:])]
        assert not gaps or min(gaps) >= EDIT_INTERVAL - 0.05, gaps
    assert fake.refused == []


async def test_a_restart_tells_the_reply_and_the_button_still_answers(fake_discord, live_bot, backends_from_settings):
    fake = fake_discord
    backends_from_settings.use(CaptionRequest, GatedCaptionEngine())  # never finishes in the first session
    token = await caption(fake, "slow.png", png_bytes(32, 32))
    message = await eventually(lambda: (fake.interactions[token]["original"] or {}).get("components")
                               and fake.interactions[token]["original"], what="the running job's reply")
    took = await live_bot.shut_down()
    assert took < 10
    assert "restarting" in fake.original_edits(token)[-1].body["content"]
    # The message as a user sees it during the restart, its Cancel button still there.
    seen = copy.deepcopy(message)
    # The client closed the gateway itself (discord.py sends 1000, and its reader may race a 4000 in first),
    # rather than the connection being dropped (1006).
    [close_code] = [detail for _, event, detail in fake.gateway_events if event == "closed"]
    assert close_code in (1000, 4000)

    again = BotThread()
    await again.start(fake)
    try:
        # The local backend's job died with the process: its message says so, through the bot token.
        await eventually(lambda: any("restarted" in (r.body or {}).get("content", "")
                                     for r in fake.message_edits(int(message["id"]))), what="the resumed report")
        press = await fake.send_interaction(fake.button(cancel_custom_id(seen), seen, user_id=1001))
        await eventually(lambda: fake.callback(press), what="the old button's answer")
        assert fake.callback(press)["type"] == 4 and "already finished" in fake.callback(press)["data"]["content"]
    finally:
        await again.shut_down()
    assert fake.refused == []




async def start_bot_process(fake: FakeDiscord, data_dir: Path) -> asyncio.subprocess.Process:
    fake.identified.clear()
    environment = {**os.environ, "DISCORD_TOKEN": "fake-bot-token.abc.def", "TOOLBOX_DATA_DIR": str(data_dir),
                   "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fakes.bot_process", fake.base_url,
        env=environment, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    await asyncio.wait_for(fake.identified.wait(), timeout=30)
    await eventually(lambda: fake.commands, what="command sync")
    return process


async def stop_process(process: asyncio.subprocess.Process, signum: int) -> tuple[float, str]:
    started = time.monotonic()
    process.send_signal(signum)
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=15)
    except asyncio.TimeoutError:
        process.kill()
        raise AssertionError("the bot did not stop within 15 s")
    return time.monotonic() - started, stderr.decode(errors="replace")


@pytest.mark.slow
async def test_sigterm_during_a_job_ends_within_10_s_and_the_job_is_picked_up_again(fake_discord, tmp_path):
    fake = fake_discord
    first = await start_bot_process(fake, tmp_path / "data")
    token = await caption(fake, "slow.png", png_bytes(32, 32))
    message = await eventually(lambda: any("Captioning" in (r.body or {}).get("content", "") for r in fake.original_edits(token))
                               and fake.interactions[token]["original"], what="the job running")
    took, stderr = await stop_process(first, signal.SIGTERM)
    assert took < 10 and first.returncode == 0, stderr
    assert "restarting" in fake.original_edits(token)[-1].body["content"]
    assert "Traceback" not in stderr

    second = await start_bot_process(fake, tmp_path / "data")
    await eventually(lambda: any("restarted" in (r.body or {}).get("content", "")
                                 for r in fake.message_edits(int(message["id"]))), what="the job reported again")
    took, stderr = await stop_process(second, signal.SIGINT)  # Ctrl-C closes as gracefully
    assert took < 10 and second.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert fake.refused == []
