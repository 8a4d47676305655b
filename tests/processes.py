"""Processes for tests of what a stopped or dead one leaves behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def dead_pid() -> int:
    """The pid of a process of this machine that has ended (and been reaped): `os.kill(pid, 0)` fails."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def setup_mid_download(hub, folder, stdout=subprocess.DEVNULL) -> subprocess.Popen:
    """A `toolbox setup --only sdxl-vae` process in `folder`, returned once it is inside a download that
    the hub trickles (time enough to interrupt or kill it)."""
    hub.fault("diffusion_pytorch_model.safetensors", "trickle", at=1000, interval=0.5)
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from bot.cli import main; sys.exit(main(sys.argv[1:]))",
         "setup", "--only", "sdxl-vae"], env=env, cwd=folder, stdout=stdout, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not hub.body_requests("diffusion_pytorch_model.safetensors") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # inside the trickle
    return process
