"""Import boundaries: the front ends never pull in discord.py, and the bot never pulls in the ML stack.

Each group is imported in one fresh interpreter, so what a module drags in at import time shows in
`sys.modules` however the test process itself has been used. Modules are found on disk, so a new one is
covered the day it is added, whether a front end is one module (`bot/cli.py`) or a package (`bot/cli/`).
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ML_STACK = ("torch", "diffusers", "transformers", "peft", "accelerate")

# Imports the modules in order and prints, for each forbidden module that got loaded, the first of them
# whose import loaded it; and where the top package was imported from.
_PROBE = """
import importlib, json, sys
modules, forbidden = json.loads(sys.argv[1]), json.loads(sys.argv[2])
pulled_by = {}
for name in modules:
    importlib.import_module(name)
    for heavy in forbidden:
        if heavy in sys.modules and heavy not in pulled_by:
            pulled_by[heavy] = name
print(json.dumps({"pulled_by": pulled_by, "origin": sys.modules[modules[0]].__file__}))
"""


def modules_under(name: str) -> list[str]:
    """`name` and, when it is a package, every module below it, found without importing anything
    (but a package's `__main__`, which runs the program when imported)."""
    folder = ROOT.joinpath(*name.split("."))
    found = [name]
    for info in pkgutil.iter_modules([str(folder)]):
        if info.name == "__main__":
            continue
        child = f"{name}.{info.name}"
        found += modules_under(child) if info.ispkg else [child]
    return found


def pulled_in(modules: list[str], forbidden: tuple[str, ...]) -> dict[str, str]:
    """Which of `forbidden` importing `modules` loads, each with the module whose import loaded it."""
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(modules), json.dumps(forbidden)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    # This checkout's code, not an installed copy of the project.
    assert Path(report["origin"]).resolve().is_relative_to(ROOT), report["origin"]
    return report["pulled_by"]


def test_the_front_ends_and_the_shared_core_do_not_import_discord():
    modules = [*modules_under("bot.core"), *modules_under("bot.cli"), *modules_under("bot.api"),
               *modules_under("bot.backend")]
    assert pulled_in(modules, ("discord",)) == {}


def test_bot_and_cogs_do_not_import_the_ml_stack():
    modules = [*modules_under("bot"), *modules_under("cogs"), "modal_services.app"]
    assert pulled_in(modules, ML_STACK) == {}


def test_every_module_of_bot_and_cogs_is_probed():
    found = set(modules_under("bot")) | set(modules_under("cogs"))
    on_disk = {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for package in ("bot", "cogs") for path in (ROOT / package).rglob("*.py")
               if path.stem != "__main__"}
    assert found == on_disk
    assert {"bot.core.following", "bot.cli", "bot.api", "cogs.generate"} <= found


def test_the_cli_s_help_pulls_in_neither_discord_pydantic_nor_the_ml_stack():
    """`toolbox --help` and each command's help build the whole parser: it stays light, so they return at once."""
    probe = ("import json, sys; from bot.cli.parser import build_parser; build_parser().format_help(); "
             "print(json.dumps(sorted(name for name in ('discord', 'pydantic', 'fastapi', 'PIL', *json.loads(sys.argv[1])) "
             "if name in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe, json.dumps(ML_STACK)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
