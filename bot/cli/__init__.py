"""The `toolbox` command: the bot's verbs from a terminal.

Exit status: 0 on success, 2 on bad usage, 1 on any other failure, with
`error: <CODE>: <message>` on stderr.

Each command group is a module of this package whose `register` adds its parser and sets `run` to the
function that carries the command out; `main` calls that function with the settings and the options.
Building the parser imports every command module, so they import what a command runs with (the
backend, asyncio, tqdm, image decoding) inside the functions that use it: `toolbox --help` pays only
for the request models whose limits and defaults the help shows.
"""

from __future__ import annotations

import argparse
import inspect

from bot.cli.common import exit_status
from bot.cli.parser import build_parser


def main(argv: list[str] | None = None) -> int:
    """The `toolbox` console script: runs the command `argv` names and returns the exit status."""
    args = build_parser().parse_args(argv)
    return exit_status(lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    import asyncio

    from bot.settings import Settings

    outcome = args.run(Settings.load(), args)
    # Most commands are coroutines; `bot` and `serve` run their own event loops.
    if inspect.iscoroutine(outcome):
        asyncio.run(outcome)
