"""What a finished job's result buttons reuse, kept as durable records with a retention each server sets.

A result's parameters (`generate:<job id>`, `upscale:<job id>`, `generate-faces:<job id>`,
`caption-prompt:<job id>`, and `image-info:<id>` for settings Image info read) are files on the records home (see `durable.py`): they outlive the job
record and the live store's memory. Each is kept stamped with when it was kept and the server it was
made on, `{"params": ..., "kept_at": <epoch seconds>, "guild_id": <id or None>}`, so that:

- a button pressed after the server's retention is answered, privately, that the result is too old
  to reuse, naming the command that makes it again (`read_result_params`), and one pressed on
  another server (a forged custom id) that its buttons work only where it was made;
- `sweep_result_params` deletes the records past their server's retention (at the bot's start and
  from the daily reconcile).

Records kept before they were stamped hold the bare parameters: they count as kept now (never "too
old" at once), and the sweep stamps them so that their retention starts.

Discord-free: the bot, the reconcile and tests use it alike.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.records import Job
from modal_services.state.keys import RESULT_PARAMS_PREFIXES, job_key
from modal_services.state.store import StateStore

log = logging.getLogger(__name__)

DAY_SECONDS = 86_400
# How many days a server keeps its results' parameters: `(store, guild id) -> days`.
RetentionDays = Callable[[StateStore, int | None], Awaitable[int]]
# The command that makes a result of each kind again, named when its buttons can no longer.
RERUN_COMMANDS = {"generate:": "/generate", "generate-faces:": "/generate", "upscale:": "/upscale",
                  "caption-prompt:": "/caption", "image-info:": "Image info"}
_STAMPED_FIELDS = {"params", "kept_at", "guild_id"}


@dataclass(frozen=True)
class KeptParams:
    """One record: the parameters, when they were kept (None: before records were stamped) and where."""

    params: Any
    kept_at: float | None
    guild_id: int | None

    @classmethod
    def from_record(cls, record: Any) -> "KeptParams":
        if isinstance(record, dict) and set(record) == _STAMPED_FIELDS:
            return cls(record["params"], record["kept_at"], record["guild_id"])
        return cls(record, None, None)

    def to_record(self) -> dict[str, Any]:
        return {"params": self.params, "kept_at": self.kept_at, "guild_id": self.guild_id}

    def expired(self, retention_days: int, now: float) -> bool:
        return self.kept_at is not None and now - self.kept_at > retention_days * DAY_SECONDS


async def keep_result_params(store: StateStore, key: str, params: Any, guild_id: int | None) -> None:
    """Keep what a result's buttons reuse under `key` (one of `RESULT_PARAMS_PREFIXES` + the job id)."""
    await store.put(key, KeptParams(params, time.time(), guild_id).to_record())


async def read_result_params(store: StateStore, key: str, guild_id: int | None, retention_days: RetentionDays) -> Any:
    """The parameters kept under `key` for a button pressed in server `guild_id` (None: a DM), or None if
    none are. PERMISSION_DENIED when the result was made elsewhere (a custom id forged with another
    server's job id reuses nothing); INVALID_INPUT, with the command to run again, when they are older
    than the retention of the server they were made on."""
    record = await store.get(key)
    if record is None:
        return None
    kept = KeptParams.from_record(record)
    # An unstamped record's server is its job's, while that is kept (unknown after: no server's).
    made_on = kept.guild_id if kept.kept_at is not None else await _guild_of_job(store, key.partition(":")[2])
    if made_on != guild_id:
        raise ToolboxError(ErrorCode.PERMISSION_DENIED, "That result's buttons work only where it was made.")
    if kept.kept_at is not None:
        days = await retention_days(store, kept.guild_id)
        if kept.expired(days, time.time()):
            raise ToolboxError(ErrorCode.INVALID_INPUT, too_old_message(key, days))
    return kept.params


def too_old_message(key: str, days: int) -> str:
    command = next(command for prefix, command in RERUN_COMMANDS.items() if key.startswith(prefix))
    return f"That result is too old to reuse (results are kept {in_days(days)} on this server); run {command} again."


def in_days(days: int) -> str:
    """`1 day`, `90 days`: a retention in words."""
    return "1 day" if days == 1 else f"{days} days"


async def sweep_result_params(store: StateStore, retention_days: RetentionDays) -> int:
    """Delete every result-params record (its file and its cache entry) older than the retention of
    its server; stamp the unstamped ones as kept now. Returns how many were deleted."""
    now = time.time()
    retention: dict[int | None, int] = {}
    deleted = 0
    for prefix in RESULT_PARAMS_PREFIXES:
        for key, record in (await store.items(prefix)).items():
            kept = KeptParams.from_record(record)
            if kept.kept_at is None:
                guild_id = await _guild_of_job(store, key[len(prefix):])
                await store.put(key, KeptParams(kept.params, now, guild_id).to_record())
                continue
            if kept.guild_id not in retention:
                retention[kept.guild_id] = await retention_days(store, kept.guild_id)
            if kept.expired(retention[kept.guild_id], now):
                await store.pop(key)
                deleted += 1
    if deleted:
        log.info("deleted %d result-params records older than their server's retention", deleted)
    return deleted


async def _guild_of_job(store: StateStore, job_id: str) -> int | None:
    """The server a job was asked on, while its record is still kept (None after, or in a DM)."""
    record = await store.get(job_key(job_id))
    return Job.from_dict(record).owner.get("guild_id") if record else None
