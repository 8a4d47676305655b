"""What a migration did (or, in a dry run, would do): one item per file, entry, manifest, token or index."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

log = logging.getLogger(__name__)

# Outcomes that change something, with the verb a dry run uses for them.
CHANGES = {"moved": "would move", "added": "would add", "recorded": "would record",
           "removed": "would remove", "retired": "would retire"}
OUTCOME_ORDER = ("moved", "added", "recorded", "removed", "retired", "kept", "skipped")


@dataclass
class Item:
    kind: str  # file | entry | manifest | token | index
    subject: str
    outcome: str  # one of OUTCOME_ORDER
    detail: str = ""
    retry: bool = False  # skipped for a passing reason: a later run can do it


@dataclass
class MigrationReport:
    dry_run: bool
    items: list[Item] = field(default_factory=list)

    def add(self, kind: str, subject: str, outcome: str, detail: str = "", retry: bool = False) -> Item:
        item = Item(kind, subject, outcome, detail, retry)
        self.items.append(item)
        log.info("migration: %s %s %s: %s", outcome, kind, subject, detail)
        return item

    @property
    def changed(self) -> bool:
        return any(item.outcome in CHANGES for item in self.items)

    def to_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "changed": self.changed, "items": [asdict(item) for item in self.items]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MigrationReport":
        return cls(bool(data["dry_run"]), [Item(**item) for item in data["items"]])


def render_report(report: MigrationReport) -> str:
    if not report.items:
        return "Nothing to migrate: no files or index of the older toolbox were found."
    counts = {outcome: sum(item.outcome == outcome for item in report.items) for outcome in OUTCOME_ORDER}
    summary = ", ".join(f"{n} {outcome}" for outcome, n in counts.items() if n)
    lines = [("Dry run, nothing was changed. The plan: " if report.dry_run else "Migration: ") + summary + "."]
    for outcome in OUTCOME_ORDER:
        for item in (i for i in report.items if i.outcome == outcome):
            verb = CHANGES[outcome] if report.dry_run and outcome in CHANGES else outcome
            lines.append(f"  {verb:12} {item.kind:8} {item.subject}" + (f": {item.detail}" if item.detail else ""))
    if any(item.retry for item in report.items):
        lines.append("Some steps can be retried: run the migration again later.")
    return "\n".join(lines)
