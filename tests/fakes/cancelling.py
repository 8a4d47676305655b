"""A job's progress callback as its reporter behaves once Cancel (or DELETE /jobs/{id}) is asked for."""

from __future__ import annotations

import threading

from modal_services.errors import ErrorCode, ToolboxError


def cancelled_after(seconds: float):
    """A progress callback (any arguments: a transfer's `(done, total)`, a job's `(fraction, stage)`) that raises
    CANCELLED from `seconds` on."""
    asked = threading.Event()
    threading.Timer(seconds, asked.set).start()

    def progress(*_):
        if asked.is_set():
            raise ToolboxError(ErrorCode.CANCELLED, "Stopped on request.")

    return progress
