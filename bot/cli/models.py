"""`toolbox models`: the LoRA and checkpoint library (CivitAI imports), one function per verb."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import TYPE_CHECKING, AsyncIterator

from bot.cli.common import confirm, opened_backend, run_with_bar
from bot.core.library import library_for
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.limits import LORA_WEIGHT
from modal_services.jobs.samplers import NO_SAMPLER, SAMPLER_NAMES
from modal_services.remedies import FrontEnd, render

if TYPE_CHECKING:
    from bot.backend import Backend
    from bot.settings import Settings
    from modal_services.library.entries import Library


def register(commands) -> None:
    models = commands.add_parser("models", help="the LoRA and checkpoint library (CivitAI imports)")
    verbs = models.add_subparsers(dest="verb", required=True)
    do_import = verbs.add_parser("import", help="import from CivitAI: URL, model id, v:<version id>, AIR")
    do_import.add_argument("ref", metavar="REF")
    do_import.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    do_import.add_argument("--json", action="store_true", help="print the library entry as JSON")
    do_import.set_defaults(run=import_model)
    listing = verbs.add_parser("list", help="list the library")
    listing.add_argument("--type", choices=("lora", "checkpoint"))
    listing.add_argument("--query", help="search names, tags and trigger words")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=list_models)
    info = verbs.add_parser("info", help="one model's details")
    info.add_argument("name", metavar="NAME")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=show_model)
    edit = verbs.add_parser("edit", help="rename, set trigger words, default weight or sampler")
    edit.add_argument("name", metavar="NAME")
    edit.add_argument("--name", dest="display_name", metavar="N")
    edit.add_argument("--triggers", metavar='"a, b"')
    edit.add_argument("--weight", type=float, metavar="W",
                      help=f"the weight a LoRA gets when none is asked for, {LORA_WEIGHT.describe()}")
    edit.add_argument("--sampler", metavar="NAME",
                      help=f"a checkpoint's sampler for jobs that name none: {', '.join(SAMPLER_NAMES)}, "
                           f"or {NO_SAMPLER} for the base checkpoint's")
    edit.set_defaults(run=edit_model)
    delete = verbs.add_parser("delete", help="delete a model and its file")
    delete.add_argument("name", metavar="NAME")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    delete.set_defaults(run=delete_model)
    use = verbs.add_parser("use", help="set the active checkpoint (illustrious-xl for the default)")
    use.add_argument("checkpoint", metavar="CHECKPOINT")
    use.set_defaults(run=use_checkpoint)
    scan = verbs.add_parser("scan", help="untracked files and entries whose file is missing")
    scan.add_argument("--adopt", action="store_true", help="add the untracked files to the library")
    scan.add_argument("--json", action="store_true")
    scan.set_defaults(run=scan_models)


@contextlib.asynccontextmanager
async def _opened_library(settings: Settings) -> AsyncIterator[tuple[Backend, Library]]:
    async with opened_backend(settings) as backend:
        yield backend, library_for(settings, backend.store)


def _entry_lines(document: dict) -> str:
    words = ", ".join(document["trigger_words"]) or "none"
    weight = f", weight {document['weight']:g}" if document.get("weight") is not None else ""
    weight += f", sampler {document['sampler']}" if document.get("sampler") else ""
    missing = "  [file missing]" if document.get("missing") else ""
    return (f"{document['name']}  ({document['type']}, {document.get('base_model') or '?'}{weight}){missing}\n"
            f"  file: {document['path']}\n  triggers: {words}\n  size: {document['size_bytes'] / 2**20:.1f} MiB"
            f"  sha256: {document.get('sha256') or '?'}  source: {document['source']}")


def _print_entry(document: dict, as_json: bool) -> None:
    print(json.dumps(document, indent=2) if as_json else _entry_lines(document))


async def import_model(settings: Settings, args: argparse.Namespace) -> None:
    """Plan the import on CivitAI, show it and ask; an installed version is only shown."""
    import asyncio

    from modal_services.base_models.tokens import get_token
    from modal_services.library.civitai import CivitaiClient, parse_reference
    from modal_services.library.civitai_plans import plan_import
    from modal_services.jobs.requests import ModelImportRequest

    ref = parse_reference(args.ref)  # bad input fails before anything starts
    async with _opened_library(settings) as (backend, library):
        client = CivitaiClient(settings.civitai_api_base, await get_token(backend.store, "civitai"))
        try:
            plan = await asyncio.to_thread(plan_import, client, ref)
        finally:
            client.close()
        installed = await library.by_version(plan.version_id)
        if installed is None or installed.missing:
            print(f"{plan.name} · {plan.version_name}: {plan.civitai_type} for {plan.base_model}, "
                  f"{plan.file_name} ({plan.size_bytes / 2**20:.1f} MiB, {plan.format})\n"
                  f"  triggers: {', '.join(plan.trigger_words) or 'none'}\n  {plan.page_url}", file=sys.stderr)
            confirm("Download it?", args.yes)
            request = ModelImportRequest.parse({"ref": f"v:{plan.version_id}", "api_base": settings.civitai_api_base})
            result = await run_with_bar(backend, request, f"importing {plan.name}")
            document = result["entry"]
        else:
            document = library.to_json(installed)
            print("already installed", file=sys.stderr)
        _print_entry(document, args.json)


async def list_models(settings: Settings, args: argparse.Namespace) -> None:
    async with _opened_library(settings) as (_, library):
        found = await library.search(args.query, args.type)
        if args.json:
            print(json.dumps([library.to_json(entry) for entry in found], indent=2))
            return
        active = (await library.active_checkpoint())["file"]
    for entry in found:
        star = "*" if entry.file == active else " "
        missing = "  [file missing]" if entry.missing else ""
        print(f"{star} {entry.type:10} {entry.name[:40]:40} {entry.file}{missing}")
    if not found:
        print("no models", file=sys.stderr)


async def show_model(settings: Settings, args: argparse.Namespace) -> None:
    async with _opened_library(settings) as (_, library):
        _print_entry(library.to_json(await library.find(args.name)), args.json)


async def edit_model(settings: Settings, args: argparse.Namespace) -> None:
    async with _opened_library(settings) as (_, library):
        entry = await library.edit(args.name, args.display_name, args.triggers, args.weight, args.sampler)
        print(_entry_lines(library.to_json(entry)))


async def delete_model(settings: Settings, args: argparse.Namespace) -> None:
    """Any model but the active checkpoint, after confirmation."""
    from modal_services.jobs.requests import ModelDeleteRequest

    async with _opened_library(settings) as (backend, library):
        entry = await library.find(args.name)
        if (await library.active_checkpoint())["file"] == entry.file:
            raise ToolboxError(ErrorCode.INVALID_INPUT, f"{entry.name} is the active checkpoint: `toolbox models use` another first.")
        confirm(f"Delete {entry.name} ({entry.file})?", args.yes)
        await run_with_bar(backend, ModelDeleteRequest.parse({"name": entry.file}), f"deleting {entry.name}")
        print(f"deleted {entry.file}")


async def use_checkpoint(settings: Settings, args: argparse.Namespace) -> None:
    async with _opened_library(settings) as (_, library):
        active = await library.set_active_checkpoint(args.checkpoint)
        print(f"active checkpoint: {active['name']} ({active['path']})")


async def scan_models(settings: Settings, args: argparse.Namespace) -> None:
    """Untracked files and entries whose file is missing; with --adopt the untracked files join the library."""
    from modal_services.jobs.requests import ModelScanRequest

    async with _opened_library(settings) as (backend, library):
        request = ModelScanRequest.parse({"adopt": args.adopt, "api_base": settings.civitai_api_base})
        report = await run_with_bar(backend, request, "scanning")
        if args.json:
            print(json.dumps(report, indent=2))
            return
        if not any(report[found] for found in ("untracked", "missing", "failed", "restored")):
            print(_all_present_line(await library.entries()))
            return
    for item in report["untracked"]:
        print(f"untracked {item['type']:10} {item['file']}")
    for file in report["missing"]:
        print(f"missing            {file}")
    if report.get("restored"):
        print(f"restored {report['restored']} entries from their sidecars")
    for failed in report["failed"]:
        print(f"not adopted {failed['file']}: {failed['code']}: {render(failed['message'], FrontEnd.CLI)}")


def _all_present_line(entries: list) -> str:
    """What a scan that found nothing to report says: how much it checked."""
    from bot.core.text import plural

    loras = sum(entry.type == "lora" for entry in entries)
    return (f"{plural(loras, 'LoRA')} and {plural(len(entries) - loras, 'checkpoint')} checked: "
            "every file present, none untracked.")
