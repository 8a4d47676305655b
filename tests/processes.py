"""Processes for tests of what a dead one leaves behind."""

from __future__ import annotations

import subprocess
import sys


def dead_pid() -> int:
    """The pid of a process of this machine that has ended (and been reaped): `os.kill(pid, 0)` fails."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid
