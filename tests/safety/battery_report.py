"""How much of the prompt batteries the built-in screen refuses, by category and by language.

    python -m tests.safety.battery_report            # the table for the README
    python -m tests.safety.battery_report --misses   # also the tuning lines it gets wrong

The batteries (tests/safety/batteries/) hold prompts that must be refused and benign prompts that share words with
them. Every fourth line of each was set aside before the screen was tuned (`*.heldout.tsv`); `--misses` lists only
the tuning part's mistakes, so the held-out part stays unread while tuning.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from modal_services.safety.prompt_screen import involves_minors_sexually

BATTERIES = Path(__file__).parent / "batteries"
PARTS = {"tuning": "", "held-out": ".heldout"}
TITLES = {"refuse": "must refuse: refused", "benign": "benign: refused"}


@dataclass(frozen=True)
class BatteryLine:
    category: str
    language: str
    prompt: str
    negative: str

    @property
    def refused(self) -> bool:
        return involves_minors_sexually(self.prompt, self.negative)


def load(kind: str, part: str) -> list[BatteryLine]:
    """One battery ("refuse" or "benign"), one part ("tuning" or "held-out")."""
    path = BATTERIES / f"{kind}{PARTS[part]}.tsv"
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.strip() and not raw.startswith("#"):
            category, language, prompt, *negative = raw.split("\t")
            lines.append(BatteryLine(category, language, prompt, negative[0] if negative else ""))
    return lines


@dataclass
class Count:
    refused: int = 0
    total: int = 0

    def add(self, refused: bool) -> None:
        self.refused += refused
        self.total += 1

    @property
    def rate(self) -> float:
        return self.refused / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.refused}/{self.total} ({self.rate:.0%})" if self.total else "-"


def counts(lines: list[BatteryLine], key: str) -> dict[str, Count]:
    """Refused/total per value of `key` ("category" or "language"), plus "all"."""
    by_key: dict[str, Count] = defaultdict(Count)
    for line in lines:
        refused = line.refused
        by_key[getattr(line, key)].add(refused)
        by_key["all"].add(refused)
    return by_key


def table(key: str, kinds: tuple[str, ...]) -> str:
    """A markdown table: one row per category or language, refused/total for each battery and part."""
    columns = {(kind, part): counts(load(kind, part), key) for kind in kinds for part in PARTS}
    names = sorted({name for by_key in columns.values() for name in by_key} - {"all"}) + ["all"]
    titles = [f"{TITLES[kind]}, {part}" for kind, part in columns]
    rows = [f"| {key} | " + " | ".join(titles) + " |", "| --- |" + " --- |" * len(titles)]
    rows += [f"| {name} | " + " | ".join(str(by_key.get(name, Count())) for by_key in columns.values()) + " |"
             for name in names]
    return "\n".join(rows)


def report() -> str:
    return "\n\n".join([table("category", ("refuse",)), table("category", ("benign",)),
                        table("language", ("refuse", "benign"))])


def tuning_misses() -> list[str]:
    wrong = [("passed", line) for line in load("refuse", "tuning") if not line.refused]
    wrong += [("refused", line) for line in load("benign", "tuning") if line.refused]
    return [f"{what}\t{line.category}\t{line.language}\t{line.prompt}\t{line.negative}" for what, line in wrong]


if __name__ == "__main__":
    print(report())
    if "--misses" in sys.argv:
        print("\n".join(["", "Tuning lines it gets wrong:"] + tuning_misses()))
