"""Keeping the bot connected: restart after crashes, rotate before hard time limits.

`toolbox bot` and the Modal `DiscordBot` container both run the bot through
`BotSupervisor.run`. One gateway session lasts until it crashes, until
`stop` is set, or until `session_limit` (under Modal's 24-hour limit) when it
closes cleanly and a fresh session starts at once. Crashes restart with an
exponential backoff, so a bad token or a Discord outage never turns into a
tight reconnect loop (Discord bans IPs that make too many failed requests).
An outage is logged as one line with its cause and the next try; only an
unexpected crash logs its traceback.

Setting `stop` ends the session gracefully (the bot's `close`: no new
interactions, running jobs' replies told of the restart, the gateway closed,
the stores closed) within `SHUTDOWN_SECONDS`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable

import discord

from bot.outages import describe_outage, quiet_discord_outages
from bot.settings import Settings
from modal_services.errors import ErrorCode, ToolboxError

log = logging.getLogger(__name__)

SESSION_LIMIT = 23.5 * 3600
FIRST_BACKOFF = 5.0
MAX_BACKOFF = 300.0
# A session that lived this long was healthy: the next crash starts the backoff afresh.
HEALTHY_SESSION = 600.0
# Modal gives a stopping container a grace period; `toolbox bot` is stopped by SIGTERM or Ctrl-C.
SHUTDOWN_SECONDS = 10.0
STOP_POLL_SECONDS = 0.2


class BotSupervisor:
    def __init__(
        self,
        make_bot: Callable[[], discord.Client],
        token: str,
        session_limit: float = SESSION_LIMIT,
        first_backoff: float = FIRST_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
    ):
        self.make_bot = make_bot
        self._token = token
        self.session_limit = session_limit
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self.sessions = 0
        self.crashes = 0

    def run(self, stop: threading.Event) -> None:
        """Blocking: sessions one after another until `stop` is set."""
        backoff = self.first_backoff
        quiet_discord_outages()
        while not stop.is_set():
            started = time.monotonic()
            self.sessions += 1
            try:
                asyncio.run(self._session(stop))
            except discord.LoginFailure:
                # Retrying a rejected token only counts towards Discord's invalid-request ban.
                raise ToolboxError(ErrorCode.PERMISSION_DENIED, "Discord refused the bot token: check DISCORD_TOKEN.") from None
            except ToolboxError as error:
                if error.code is not ErrorCode.BACKEND_UNAVAILABLE:
                    raise  # a refused credential or a bad setting: retrying cannot help
                self.crashes += 1
                cause = f"{error.code.value}: {error.message}"
            except Exception as exc:
                self.crashes += 1
                cause = describe_outage(exc)
                if cause is None:
                    log.exception("bot session crashed")
            else:
                continue  # a clean end (rotation or stop): reconnect at once
            if time.monotonic() - started > HEALTHY_SESSION:
                backoff = self.first_backoff
            if cause is not None:
                log.warning("cannot reach Discord or the workers: %s; retrying in %.0f s", cause, backoff)
            else:
                log.info("reconnecting in %.0f s", backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    async def _session(self, stop: threading.Event) -> None:
        bot = self.make_bot()
        async with bot:
            gateway = asyncio.create_task(bot.start(self._token), name="gateway")
            until = asyncio.create_task(self._wait_until_over(stop), name="session-timer")
            done, _ = await asyncio.wait({gateway, until}, return_when=asyncio.FIRST_COMPLETED)
            until.cancel()
            if gateway in done:
                gateway.result()  # raises what ended it
                raise RuntimeError("the gateway connection ended on its own")
            try:
                await asyncio.wait_for(bot.close(), SHUTDOWN_SECONDS)
            except asyncio.TimeoutError:
                log.warning("the bot did not close within %.0f s; leaving anyway", SHUTDOWN_SECONDS)
            await asyncio.gather(gateway, return_exceptions=True)

    async def _wait_until_over(self, stop: threading.Event) -> None:
        deadline = time.monotonic() + self.session_limit
        while not stop.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(min(STOP_POLL_SECONDS, max(deadline - time.monotonic(), 0.0)))


async def check_backend(settings: Settings) -> None:
    """A ToolboxError if the settings' backend cannot work at all (a Modal token missing or refused): asked
    before Discord is, so that `toolbox bot` stops at once, in one line, instead of retrying Discord first."""
    from bot.backend import make_backend

    backend = make_backend(settings)
    try:
        await backend.check()
    finally:
        await backend.close()


def bot_supervisor(settings: Settings) -> BotSupervisor:
    """The supervisor of a ToolboxBot for these settings (a fresh bot and backend per session)."""
    from bot.backend import make_backend
    from bot.client import ToolboxBot

    if not settings.discord_token:
        raise ToolboxError(ErrorCode.INVALID_INPUT, "DISCORD_TOKEN is not set (environment, .env or Modal secret).")
    return BotSupervisor(lambda: ToolboxBot(settings, make_backend(settings)), settings.discord_token)
