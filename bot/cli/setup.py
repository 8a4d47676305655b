"""`toolbox setup`: download the missing base models and recommended LoRAs; enable or disable optional models."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from bot.cli.common import opened_backend, run_with_bar
from bot.core.library import library_for
from modal_services.errors import ToolboxError

if TYPE_CHECKING:
    from bot.backend import Backend
    from bot.settings import Settings
    from modal_services.library.entries import Library


def register(commands) -> None:
    setup = commands.add_parser("setup", help="download the missing base models")
    setup.add_argument("--only", nargs="+", metavar="KEY", help="just these models (see `toolbox status`)")
    toggles = setup.add_mutually_exclusive_group()
    toggles.add_argument("--enable", nargs="+", metavar="KEY", default=[],
                         help="enable these optional models (accepting their licences), then download what is missing")
    toggles.add_argument("--disable", nargs="+", metavar="KEY", default=[],
                         help="disable these optional models (their files stay)")
    setup.set_defaults(run=setup_models)


async def setup_models(settings: Settings, args: argparse.Namespace) -> None:
    """Download the missing base models (or `--only` these, recommended LoRAs included), after
    enabling or disabling optional models (`--disable` only disables)."""
    from modal_services.base_models.optional_models import optional_entry, set_enabled
    from modal_services.base_models.registry import STARTER_LORAS, split_setup_keys

    only = args.only
    base_keys, starters = split_setup_keys(only)  # an unknown key fails here, before anything starts
    for key in (*args.enable, *args.disable):
        optional_entry(key)
    by = "`toolbox setup` on the command line"
    async with opened_backend(settings) as backend:
        library = library_for(settings, backend.store)
        for key in args.disable:
            entry = await set_enabled(backend.store, key, False, by)
            print(f"Disabled {entry.name}; files already downloaded stay.")
        if args.disable:
            return
        for key in args.enable:
            entry = await set_enabled(backend.store, key, True, by)
            print(f"Enabled {entry.name}, accepting its terms: {entry.optional.summary} ({entry.optional.url})")
        if base_keys or not only:
            await _download_base_models(settings, backend, base_keys)
        if starters:
            await _import_starter_loras(settings, backend, library, starters)
        elif not only:
            missing = [s.key for s in STARTER_LORAS.values() if await library.by_model(s.civitai_model_id) is None]
            if missing:
                print(f"Recommended LoRAs (optional): toolbox setup --only {' '.join(missing)}")


async def _download_base_models(settings: Settings, backend: Backend, keys: list[str]) -> None:
    """The missing ones of `keys` (all when empty), with a bar per model and an overall bar."""
    from tqdm import tqdm

    from bot.core.following import watch_job
    from bot.setup_download import checked_states, start_or_attach_download
    from modal_services.base_models.states import model_states
    from modal_services.base_models.optional_models import enabled_models
    from modal_services.base_models.registry import resolve_keys
    from modal_services.jobs.requests import DownloadRequest

    entries = resolve_keys(keys, enabled=await enabled_models(backend.store))
    states = await checked_states(settings, backend.store, entries, hashes=True)
    missing = [state.key for state in states if state.state != "present"]
    if not missing:
        print("All requested base models are present.")
        return
    job_id, started = await start_or_attach_download(
        backend.store, lambda: backend.submit(DownloadRequest.parse({"keys": missing}), owner={"cli": True}),
    )
    if not started:
        print(f"A download is already running (job {job_id}); following it.", file=sys.stderr)
    wanted = [entry for entry in entries if entry.key in missing]
    bars = {
        entry.key: tqdm(total=entry.approx_bytes, unit="B", unit_scale=True, desc=entry.key, position=i + 1,
                        leave=True, disable=None)
        for i, entry in enumerate(wanted)
    }
    overall = tqdm(total=1, unit="B", unit_scale=True, desc="overall", position=0, leave=True, disable=None)

    async def show(job) -> None:
        done = total = 0
        for state in await model_states(backend.store, wanted):
            bar = bars[state.key]
            bar.total = state.size_bytes
            bar.n = state.size_bytes if state.state == "present" else state.bytes_done
            bar.set_postfix_str(state.state, refresh=False)
            bar.refresh()
            done, total = done + bar.n, total + state.size_bytes
        overall.total, overall.n = max(total, 1), done
        overall.refresh()

    try:
        job = await watch_job(backend, job_id, show)
    finally:
        for bar in (overall, *bars.values()):
            bar.close()
    if job.error() is not None:
        raise job.error()
    print(f"Downloaded: {', '.join(missing)}.")


async def _import_starter_loras(settings: Settings, backend: Backend, library: Library, starters: list) -> None:
    """Each recommended LoRA not in the library yet, through the CivitAI importer's job; failures reported together."""
    from modal_services.jobs.requests import ModelImportRequest

    failures: list[tuple[str, ToolboxError]] = []
    for starter in starters:
        installed = await library.by_model(starter.civitai_model_id)
        if installed is not None:
            print(f"{starter.key}: already in the library as {installed.file}.")
            continue
        try:
            request = ModelImportRequest.parse({"ref": starter.reference, "api_base": settings.civitai_api_base})
            result = await run_with_bar(backend, request, f"importing {starter.name}")
        except ToolboxError as error:
            failures.append((starter.key, error))
            continue
        entry = result["entry"]
        print(f"{starter.key}: imported as {entry['file']} (triggers: {', '.join(entry['trigger_words']) or 'none'}).")
    if len(starters) == 1 and failures:
        raise failures[0][1]
    if failures:
        keys = ", ".join(key for key, _ in failures)
        first = failures[0][1]
        raise ToolboxError(first.code, f"{len(failures)} of {len(starters)} LoRAs failed ({keys}). {first.message}")
