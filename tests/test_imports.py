"""The bot stays small: importing it never pulls in the ML stack."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate")


def test_bot_and_cogs_do_not_import_the_ml_stack():
    import pkgutil

    import cogs

    modules = ["bot", "bot.cli", "bot.client", "bot.backend", "bot.progress", "bot.attachments", "bot.replies",
               "bot.settings", "bot.ui", "bot.api", "bot.api.client",
               "modal_services.app"]
    modules += [f"cogs.{info.name}" for info in pkgutil.iter_modules(cogs.__path__)]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"imported: {done.stdout.strip()}"
