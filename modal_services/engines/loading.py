"""What every engine's `load()` does when a model will not load: one MODEL_LOAD_FAILED saying which model.

The traceback goes to the log only: its text may hold paths. People see the
model's name, the exception's type and what to try.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError

log = logging.getLogger(__name__)

VERIFY_HINT = f"Its files may be damaged: {remedies.verify()}."


@contextlib.contextmanager
def loading(what: str, source: Path | str, at: str = "", hint: str = VERIFY_HINT) -> Iterator[None]:
    """Any failure inside (but a ToolboxError, which already says what is wrong) becomes MODEL_LOAD_FAILED:
    "<what> could not be loaded<at> (<exception type>). <hint>"."""
    try:
        yield
    except ToolboxError:
        raise
    except Exception as exc:
        log.exception("loading %s from %s failed", what, source)
        message = f"{what[:1].upper()}{what[1:]} could not be loaded{at} ({type(exc).__name__})."
        raise ToolboxError(ErrorCode.MODEL_LOAD_FAILED, f"{message} {hint}" if hint else message) from exc
