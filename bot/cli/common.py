"""What several `toolbox` commands share: the exit status, the backend and library, reading and writing
files, asking for confirmation, a job's progress bar, the NSFW check's option.

Every command module imports this one to build the parser, so it imports only what `toolbox --help`
needs; the rest (the request models, the backend) is imported by the functions that use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Callable

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.limits import LORA_WEIGHT, SEED

if TYPE_CHECKING:
    import argparse

    from bot.backend import Backend
    from bot.core.choices import LoraChoice
    from bot.settings import Settings
    from modal_services.jobs.requests import SafetyContext

# After Ctrl-C the engines are told to stop; one still inside a library call that
# cannot be interrupted (a Hugging Face transfer between chunks) is not waited for.
STOP_GRACE_SECONDS = 1.5

SAFETY_HELP = "keep images the NSFW classifier would flag (by default they are withheld, not written)"
LORA_HELP = f"a library LoRA, WEIGHT {LORA_WEIGHT.describe()} (default: its library weight); repeatable"
SEED_HELP = f"{SEED.describe()} (default: random, printed)"


def exit_status(command: Callable[[], None]) -> int:
    """Run `command`: 0 when it succeeds; a ToolboxError is one `error: <CODE>: <message>` line on stderr
    and 2 for bad usage, 1 otherwise; Ctrl-C stops the engines and is 1."""
    try:
        command()
    except ToolboxError as error:
        from modal_services.remedies import FrontEnd, render

        print(f"error: {error.code.value}: {render(error.message, FrontEnd.CLI)}", file=sys.stderr)
        return 2 if error.code in (ErrorCode.INVALID_INPUT, ErrorCode.INVALID_PROMPT) else 1
    except KeyboardInterrupt:
        print("Stopped. A download picks up where it left off the next time.", file=sys.stderr)
        leave_busy_engines(1)
        return 1
    return 0


def leave_busy_engines(status: int) -> None:
    """Give the engine threads (told to stop when the backend closed) a moment; if one is still busy, say so in
    one line and exit at once with `status`.

    A thread still busy then is inside a library call that cannot be interrupted (a model load, a Hugging Face
    transfer between chunks). Returning instead would start the interpreter's shutdown beside it, which waits
    for it and meanwhile refuses new thread-pool work: a loader using a pool (transformers' does) then fails
    with an ERROR and a traceback, for a stop that was expected."""
    from bot.backend import ENGINE_THREAD_PREFIX

    deadline = time.monotonic() + STOP_GRACE_SECONDS
    engines = [thread for thread in threading.enumerate() if thread.name.startswith(ENGINE_THREAD_PREFIX)]
    for thread in engines:
        thread.join(max(0.0, deadline - time.monotonic()))
    busy = sorted({thread.name.removeprefix(ENGINE_THREAD_PREFIX).rsplit("_", 1)[0]
                   for thread in engines if thread.is_alive()})
    if busy:
        logging.getLogger("bot").info("stopped without waiting for %s: a model load or download in progress "
                                      "cannot be interrupted", ", ".join(busy))
        sys.stderr.flush()
        os._exit(status)


@contextlib.asynccontextmanager
async def opened_backend(settings: Settings) -> AsyncIterator[Backend]:
    """The backend for these settings, closed when the command is done with it."""
    from bot.backend import open_backend

    backend = await open_backend(settings)
    try:
        yield backend
    finally:
        await backend.close()


def read_input(path: Path) -> bytes:
    """A file named on the command line; one it cannot read is INVALID_INPUT."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"{path}: {exc.strerror or exc}") from None


def writable_output(path: Path) -> Path:
    """`path`, if a result can be written there; INVALID_INPUT before any job starts otherwise."""
    folder = path.parent
    if not folder.is_dir():
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"-o {path}: there is no folder {folder}.")
    if path.is_dir() or not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"-o {path}: cannot write a file there.")
    return path


def confirm(question: str, yes: bool) -> None:
    """Ask on a terminal; refuse (no prompt to hang on) when stdin is not one and --yes is missing."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise ToolboxError(ErrorCode.INVALID_INPUT, "Confirmation needed: run again with --yes.")
    if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
        raise ToolboxError(ErrorCode.CANCELLED, "Nothing was changed.")


@contextlib.contextmanager
def job_bar(title: str):
    """A terminal bar for one job: yields the `on_update` to give follow_job; full when the job ends."""
    from tqdm import tqdm

    with tqdm(total=100, unit="%", desc=title, disable=None, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}") as bar:
        async def show(record) -> None:
            bar.n = round(record.progress * 100)
            bar.set_postfix_str(record.stage[:60])
            bar.refresh()

        yield show
        bar.n = 100
        bar.refresh()


async def run_with_bar(backend: Backend, request, title: str):
    """Submit `request` and follow it to its result behind a progress bar."""
    from bot.core.following import follow_job

    job = await backend.submit(request, meta={"title": title})
    with job_bar(title) as show:
        return await follow_job(backend, job.id, show)


def cli_safety(args: argparse.Namespace, real_photo: bool = False) -> SafetyContext:
    """A terminal's images are judged as for a channel that is not age-restricted, unless it opts out;
    `real_photo`: the job starts from an image file, which may show a real person."""
    from modal_services.jobs.requests import SafetyContext

    return SafetyContext(policy="off" if args.no_safety_check else "block", real_photo=real_photo)


def report_withheld(result: dict) -> None:
    """One line on stderr for each image the safety check withheld."""
    from modal_services.safety.judge import Reason, SafetyReport
    from modal_services.safety.real_people import REAL_PERSON_WITHHELD

    report = SafetyReport.from_dict(result["safety"])
    for index in report.withheld_for(Reason.DRAWN_MINOR):
        print(f"image {index + 1} withheld: a drawn minor in a sexual context; not written, whatever the "
              "safety options.", file=sys.stderr)
    for index in report.withheld_for(Reason.REAL_PHOTO):
        print(f"image {index + 1} {REAL_PERSON_WITHHELD} Not written.", file=sys.stderr)
    for index in report.withheld_for(Reason.NSFW):
        image = report.images[index]
        print(f"image {index + 1} withheld: NSFW score {image.nsfw_score:.2f}"
              f"{', rated explicit' if image.rating == 'explicit' else ''} (threshold {report.threshold:g}); "
              "not written. --no-safety-check keeps such images.", file=sys.stderr)


def parse_lora_option(value: str) -> LoraChoice:
    """`NAME` or `NAME:WEIGHT` (the --lora option) as the LoRA it names."""
    from bot.core.choices import LoraChoice

    name, separator, weight = value.rpartition(":")
    if not separator:
        return LoraChoice(value.strip())
    try:
        return LoraChoice(name.strip(), float(weight))
    except ValueError:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"--lora {value!r}: the weight after ':' must be a number.") from None
