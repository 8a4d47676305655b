"""Numbers read from the environment (`TOOLBOX_...` settings), each with its default and its range.

A value that is not a number, or out of range, is INVALID_INPUT naming the
variable, what it takes and its default, never a traceback: these are read
at start-up and at import, where a newcomer's typo would otherwise end in one.
"""

from __future__ import annotations

import os
from typing import Mapping

from modal_services.errors import ErrorCode, ToolboxError


def env_number(name: str, default: float, *, minimum: float, maximum: float, whole: bool = False,
               environ: Mapping[str, str] | None = None) -> float:
    """`name` from `environ` (the process environment by default): `default` when unset or blank, else a
    number in [minimum, maximum] (an int when `whole`)."""
    value = (os.environ if environ is None else environ).get(name, "").strip()
    if not value:
        return default
    kind = "a whole number" if whole else "a number"
    try:
        number = int(value) if whole else float(value)
    except ValueError:
        number = None
    if number is None or number != number or not minimum <= number <= maximum:
        raise ToolboxError(ErrorCode.INVALID_INPUT,
                           f"{name} must be {kind} from {minimum:g} to {maximum:g} (default {default:g}), "
                           f"not {value[:40]!r}.")
    return number
