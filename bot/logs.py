"""Logging for the long-running commands (`toolbox bot`, `toolbox serve`): one line per record on stderr.

Colour only where a person reads it as it comes, a terminal; a file or a pipe gets plain lines, since
escape codes there only make the log harder to read and to search. NO_COLOR (https://no-color.org)
turns colour off on a terminal too.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

LINE_FORMAT = "[{asctime}] [{levelname:<8}] {name}: {message}"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
RESET = "\x1b[0m"
# Bright black for the time, a colour per level, magenta for the logger's name.
TIME_COLOUR = "\x1b[30;1m"
NAME_COLOUR = "\x1b[35m"
LEVEL_COLOURS = {
    logging.DEBUG: "\x1b[40;1m",
    logging.INFO: "\x1b[34;1m",
    logging.WARNING: "\x1b[33;1m",
    logging.ERROR: "\x1b[31m",
    logging.CRITICAL: "\x1b[41m",
}


def wants_colour(stream: TextIO) -> bool:
    """A terminal, unless NO_COLOR is set; never a file or a pipe."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("NO_COLOR")


class ColourFormatter(logging.Formatter):
    """LINE_FORMAT with the time, the level and the logger's name in colour."""

    def __init__(self):
        super().__init__(LINE_FORMAT, TIME_FORMAT, style="{")
        self._by_level = {
            level: logging.Formatter(
                f"{TIME_COLOUR}{{asctime}}{RESET} {colour}{{levelname:<8}}{RESET} "
                f"{NAME_COLOUR}{{name}}{RESET} {{message}}",
                TIME_FORMAT, style="{")
            for level, colour in LEVEL_COLOURS.items()
        }

    def format(self, record: logging.LogRecord) -> str:
        return self._by_level.get(record.levelno, self._by_level[logging.DEBUG]).format(record)


def setup_logging(level: int = logging.INFO, stream: TextIO | None = None) -> logging.Handler:
    """Send every logger's records at `level` and above to `stream` (stderr), coloured only on a terminal;
    returns the handler. Calling it again replaces the handler it added before rather than doubling lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(ColourFormatter() if wants_colour(handler.stream) else
                         logging.Formatter(LINE_FORMAT, TIME_FORMAT, style="{"))
    handler.set_name("toolbox")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "toolbox"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
