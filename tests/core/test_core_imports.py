"""The shared request core is for every front end: it never pulls in discord.py nor the ML stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import bot

CORE = ("bot.core.build", "bot.core.choices", "bot.core.generate_models", "bot.core.results")
FORBIDDEN = ("discord", "torch", "diffusers", "transformers", "peft", "accelerate")
# The checkout under test (the tests run from a temporary folder).
CHECKOUT = Path(bot.__file__).resolve().parents[1]


def test_the_request_core_imports_neither_discord_nor_the_ml_stack():
    code = (
        "import importlib, sys\n"
        f"for name in {CORE!r}: importlib.import_module(name)\n"
        f"print(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=CHECKOUT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"imported: {done.stdout.strip()}"
