"""`toolbox bot` in a process of its own, pointed at a fake Discord, for tests that signal it.

    python -m tests.fakes.bot_process <fake Discord base URL>

discord.py is pointed at the fake through its own attributes (the REST base
and the default gateway), and captions run on a stand-in engine that holds
every job until the process stops; everything else is `toolbox bot` itself.
"""

from __future__ import annotations

import dataclasses
import sys

import discord
import yarl


def main() -> int:
    base = sys.argv[1]
    discord.http.Route.BASE = base + "/api/v10"
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(base.replace("http://", "ws://") + "/")

    from bot.cli import main as toolbox
    from modal_services import services
    from tests.fakes.engines import GatedCaptionEngine

    engine = GatedCaptionEngine()
    services.SERVICES["caption"] = dataclasses.replace(
        services.SERVICES["caption"], make_engine=lambda layout: engine, engine_method=lambda: GatedCaptionEngine.caption
    )
    return toolbox(["bot"])


if __name__ == "__main__":
    sys.exit(main())
