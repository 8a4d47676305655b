"""`toolbox bot` in a process of its own, pointed at a fake Discord, for tests that signal it.

    python -m tests.fakes.bot_process <fake Discord base URL>

discord.py is pointed at the fake through its own attributes (the REST base
and the default gateway), and captions run on a stand-in engine that holds
every job until the process stops; everything else is `toolbox bot` itself.
"""

from __future__ import annotations

import sys

import discord
import yarl


def main() -> int:
    base = sys.argv[1]
    discord.http.Route.BASE = base + "/api/v10"
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(base.replace("http://", "ws://") + "/")

    import bot.backend
    from bot.cli import main as toolbox
    from modal_services.jobs.requests import CaptionRequest
    from tests.fakes.engines import GatedCaptionEngine, StandInEngines

    stand_ins = StandInEngines()
    stand_ins.use(CaptionRequest, GatedCaptionEngine())
    # `toolbox bot` makes its backend from the settings: this process's is a local one on the stand-in.
    bot.backend.make_backend = lambda settings: bot.backend.LocalBackend(settings, engines=stand_ins)
    return toolbox(["bot"])


if __name__ == "__main__":
    sys.exit(main())
