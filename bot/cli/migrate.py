"""`toolbox migrate`: the older Gradio toolbox's files and indexes brought into this layout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from modal_services.errors import ErrorCode, ToolboxError

if TYPE_CHECKING:
    from bot.settings import Settings
    from modal_services.library.migration_report import MigrationReport


def register(commands) -> None:
    migrate = commands.add_parser("migrate", help="bring the older Gradio toolbox's files and indexes into this layout")
    migrate.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    migrate.add_argument("--json", action="store_true", help="the report as one JSON document on stdout")
    migrate.set_defaults(run=migrate_files)


async def migrate_files(settings: Settings, args: argparse.Namespace) -> None:
    """The migration of the older toolbox's files: the data dir's, or the Modal volumes' (beside them)."""
    import json

    from modal_services.library.migration_report import MigrationReport, render_report

    if settings.backend == "modal":
        report = MigrationReport.from_dict(await _migrate_on_modal(settings, args.dry_run))
    else:
        report = await _migrate_data_dir(settings, args.dry_run)
    print(json.dumps(report.to_dict(), indent=2) if args.json else render_report(report))


async def _migrate_data_dir(settings: Settings, dry_run: bool) -> MigrationReport:
    import tempfile

    from modal_services.layout import Layout
    from modal_services.library.migration import Migration
    from modal_services.state.durable import DurableStore, local_homes
    from modal_services.state.store import SqliteStore

    with tempfile.TemporaryDirectory() as scratch:
        # A dry run on a data dir without state must not create it: it reads an empty store instead.
        fresh = dry_run and not settings.state_path.exists()
        # A dry run reads the records and writes none.
        live = SqliteStore(Path(scratch) / "state.sqlite3" if fresh else settings.state_path)
        store = DurableStore(live, local_homes(settings.data_dir))
        try:
            migration = Migration(Layout(settings.models_dir, settings.loras_dir, store), dry_run=dry_run,
                                  on_step=lambda text: print(f"{text}…", file=sys.stderr))
            return await migration.run()
        finally:
            await store.close()


async def _migrate_on_modal(settings: Settings, dry_run: bool) -> dict:
    """The deployed app's `migrate_volumes`, which runs where the volumes are mounted."""
    import modal

    print(f"migrating the volumes of the Modal app {settings.modal_app!r}…", file=sys.stderr)
    try:
        return await modal.Function.from_name(settings.modal_app, "migrate_volumes").remote.aio(dry_run)
    except modal.exception.Error as exc:
        raise ToolboxError(ErrorCode.BACKEND_UNAVAILABLE,
                           f"The Modal app {settings.modal_app!r} could not be reached. Is it deployed "
                           "(`modal deploy -m modal_services.app`)? `modal run -m modal_services.app::migrate` "
                           "runs the migration without a deployment.") from exc
