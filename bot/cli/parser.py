"""The `toolbox` parser: one sub-command per command group, in the order `toolbox --help` lists them."""

from __future__ import annotations

import argparse

from bot.cli import caption, discord_bot, generate, info, migrate, models, serve, setup, status, upscale

COMMAND_GROUPS = (discord_bot, caption, setup, status, models, migrate, upscale, generate, info, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolbox", description="AI Toolbox: the Discord bot and its verbs.")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.register(commands)
    return parser
