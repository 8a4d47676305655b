"""`toolbox status`: the data dir, base models, recommended LoRAs, optional models, tokens, running jobs and
the last check of the durable records against their files."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from bot.cli.common import opened_backend
from bot.core.library import library_for
from bot.core.text import human_duration

if TYPE_CHECKING:
    from bot.settings import Settings
    from modal_services.state.store import StateStore


def register(commands) -> None:
    status = commands.add_parser("status", help="the data dir, base models, tokens and the running download")
    status.add_argument("--json", action="store_true", help="one JSON document on stdout")
    status.set_defaults(run=show_status)


async def show_status(settings: Settings, args: argparse.Namespace) -> None:
    """Base models (present = manifest and, locally, the files on disk), tokens (masked), the running download."""
    import json

    document, states, tokens = await _gather_status(settings)
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        _print_status(document, states, tokens)


async def _gather_status(settings: Settings) -> tuple[dict, list, list]:
    """Everything `toolbox status` shows: its --json document, and the model and token states it came from."""
    from bot.setup_download import active_download, checked_states
    from modal_services.base_models.optional_models import enabled_record, setup_entries
    from modal_services.base_models.registry import STARTER_LORAS, optional_entries
    from modal_services.base_models.tokens import SERVICES, token_state
    from modal_services.remedies import FrontEnd
    from modal_services.state.keys import ACTIVE_CHECKPOINT_KEY

    async with opened_backend(settings) as backend:
        store = backend.store
        states = [state.worded_for(FrontEnd.CLI) for state in await checked_states(settings, store, await setup_entries(store))]
        optional = {entry.key: {"name": entry.name, "terms": entry.optional.summary, "url": entry.optional.url,
                                "enabled": await enabled_record(store, entry.key)} for entry in optional_entries()}
        tokens = [await token_state(store, service) for service in SERVICES]
        library = library_for(settings, store)
        starters = {}
        for starter in STARTER_LORAS.values():
            installed = await library.by_model(starter.civitai_model_id)
            starters[starter.key] = {"name": starter.name, "civitai_model_id": starter.civitai_model_id,
                                     "installed": installed.file if installed else None}
        document = {
            "backend": settings.backend,
            "data_dir": str(settings.data_dir) if settings.backend == "local" else None,
            "models": [state.to_dict() for state in states],
            "starter_loras": starters,
            "optional_models": optional,
            "tokens": {t.service: {"set": t.is_set, "masked": t.masked, "source": t.source, "user": t.user} for t in tokens},
            "active_download": await active_download(store),
            "active_checkpoint": await store.get(ACTIVE_CHECKPOINT_KEY),
            "jobs": await _job_counts(store),
            "records_check": await _records_check(store),
        }
    return document, states, tokens


def _print_status(document: dict, states: list, tokens: list) -> None:
    if document["data_dir"]:
        print(f"data dir: {document['data_dir']}")
    for state in states:
        extra = f" ({state.detail})" if state.detail else ""
        print(f"{state.key:16} {state.state:12} {state.size_bytes / 1e9:6.2f} GB{extra}")
    for key, starter in document["starter_loras"].items():
        print(f"{key:24} {'installed as ' + starter['installed'] if starter['installed'] else 'not installed (optional)'}")
    for key, model in document["optional_models"].items():
        enabled = f"enabled by {model['enabled']['by']}" if model["enabled"] else f"not enabled (toolbox setup --enable {key})"
        print(f"{key:24} {enabled} · {model['terms']}")
    for token in tokens:
        print(token.describe())
    if document["active_download"]:
        print(f"download running: job {document['active_download']}")
    if document["active_checkpoint"]:
        print(f"active checkpoint: {document['active_checkpoint']}")
    for kind, counts in document["jobs"].items():
        print(f"jobs {kind}: {counts['running']} running, {counts['queued']} queued")
    print("records: " + _records_text(document["records_check"]))


def _records_text(check: dict | None) -> str:
    from modal_services.state.reconcile import ReconcileReport

    if check is None:
        return "not checked yet"
    report = ReconcileReport.from_dict(check)
    return report.describe(human_duration(time.time() - report.ran_at))


async def _records_check(store: StateStore) -> dict | None:
    """The last reconcile's report (when it ran, what it found), or None before the first one."""
    from modal_services.state.reconcile import last_report

    report = await last_report(store)
    return report.to_dict() if report else None


async def _job_counts(store: StateStore) -> dict[str, dict[str, int]]:
    """Unfinished jobs per kind (a job whose runner died is failed as it is found, so never counted)."""
    from modal_services.jobs.records import JobStatus, found_jobs

    counts: dict[str, dict[str, int]] = {}
    for job in await found_jobs(store):
        if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            counts.setdefault(job.kind, {"queued": 0, "running": 0})[job.status.value] += 1
    return counts
