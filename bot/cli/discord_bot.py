"""`toolbox bot`: the Discord bot in the foreground."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.settings import Settings


def register(commands) -> None:
    commands.add_parser("bot", help="run the Discord bot").set_defaults(run=run_bot)


def run_bot(settings: Settings, args: argparse.Namespace) -> None:
    """Until SIGTERM or Ctrl-C, which close the bot gracefully; a second Ctrl-C leaves at once. The token
    and the backend are checked first: a missing token or a refused Modal token is one line, at once."""
    import asyncio
    import logging
    import signal
    import threading

    from bot.cli.common import leave_busy_engines
    from bot.logs import setup_logging
    from bot.runner import bot_supervisor, check_backend

    supervisor = bot_supervisor(settings)
    asyncio.run(check_backend(settings))
    setup_logging()
    stop = threading.Event()

    def request_stop(signum, frame) -> None:
        logging.getLogger("bot").info("stopping (%s)", signal.Signals(signum).name)
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    supervisor.run(stop)
    leave_busy_engines(0)  # a model still loading is not waited for: the stop was asked for
