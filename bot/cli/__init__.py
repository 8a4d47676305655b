"""The `toolbox` command: the bot's verbs from a terminal.

Exit status: 0 on success, 2 on bad usage, 1 on any other failure, with
`error: <CODE>: <message>` on stderr.

Each command group is a module of this package whose `register` adds its parser and sets `run` to the
function that carries the command out; `main` calls that function with the settings and the options.
Building the parser imports every command module, so they import what a command runs with (the
backend, the request models, asyncio, tqdm, image decoding) inside the functions that use it; the help
reads its ranges and defaults from `modal_services.jobs.limits`, plain numbers. So `toolbox --help`
imports neither discord.py, pydantic nor torch, and returns at once.

The parser is built inside `exit_status`: a bad setting read while a command module is imported
(`TOOLBOX_UPSCALE_MAX_MP=abc`) is one `error:` line too.
"""

from __future__ import annotations

import inspect

from bot.cli.common import exit_status


def main(argv: list[str] | None = None) -> int:
    """The `toolbox` console script: runs the command `argv` names and returns the exit status."""
    return exit_status(lambda: _run(argv))


def _run(argv: list[str] | None) -> None:
    from bot.cli.parser import build_parser

    args = build_parser().parse_args(argv)  # --help ends here, before the settings are read
    import asyncio

    from bot.settings import Settings

    outcome = args.run(Settings.load(), args)
    # Most commands are coroutines; `bot` and `serve` run their own event loops.
    if inspect.iscoroutine(outcome):
        asyncio.run(outcome)
