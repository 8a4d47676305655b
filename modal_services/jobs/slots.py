"""Job slots: caps that hold when a hundred commands arrive in the same second.

Counting job records and then creating a job is a race: every command of a
burst counts the same records before any of them has created its job. A slot
is instead claimed with the store's one atomic primitive, an atomic create
(`put_if_absent`, which is `modal.Dict.put(..., skip_if_exists=True)` on
Modal and `INSERT OR IGNORE` on SQLite), so two claimers can never both win.

- A scope (one user, one server, everyone) with a cap of N has the numbered
  keys `slot:<scope>:0` .. `slot:<scope>:<N-1>`. A command claims the first
  free one by trying to create each in order; when all N exist the scope is
  full. The value names the holder (the id the job will get) and when and by
  which bot session it was claimed.
- Releasing a slot deletes its key. A slot can also be reclaimed from a
  holder that will never release it: its job has finished, or no job was
  ever created and the claim is old or came from a bot session that is gone.
- Release and reclaim must not race each other (a release that deletes the
  key just after a reclaimer rewrote it would free a slot that is taken). So
  whoever acts on a holder's slot first wins the atomic create of
  `slot-retired:<holder>:<slot key>`: exactly one party, the holder releasing
  or one reclaimer, gets to delete or overwrite the slot, and a key that
  holds holder H changes only through the party that retired H.

Only the claim is atomic; a refused command may briefly hold slots in the
scopes it claimed before the one that was full, so in a burst the caps err
on the side of refusing. Lowering a cap takes effect as jobs end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from modal_services.state.keys import retired_slot_key, slot_key
from modal_services.state.store import StateStore

# A claim with no job yet is a command still reading its attachment (or captioning
# tiles); one older than an interaction token's life will never start its job.
UNSTARTED_CLAIM_TIMEOUT = 15 * 60


@dataclass(frozen=True)
class Scope:
    """Something a cap applies to: `user:<id>`, `guild:<id>` or `global`."""

    name: str
    cap: int


# (slot record) -> whether its holder will never release it.
StaleCheck = Callable[[dict], Awaitable[bool]]


class SlotTable:
    def __init__(self, store: StateStore, session: str, is_stale: StaleCheck):
        self.store = store
        self.session = session
        self.is_stale = is_stale

    async def claim_all(self, holder: str, scopes: list[Scope]) -> tuple[list[str], Scope | None]:
        """Claim one slot in every scope. Returns (claimed keys, None), or ([], the full scope)
        having released what it had claimed."""
        claimed: list[str] = []
        for scope in scopes:
            key = await self.claim(holder, scope)
            if key is None:
                await self.release(holder, claimed)
                return [], scope
            claimed.append(key)
        return claimed, None

    async def claim(self, holder: str, scope: Scope) -> str | None:
        record = {"holder": holder, "session": self.session, "claimed_at": time.time()}
        keys = [slot_key(scope.name, number) for number in range(scope.cap)]
        for key in keys:
            if await self.store.put_if_absent(key, record):
                return key
        for key in keys:
            current = await self.store.get(key)
            if current is None:
                if await self.store.put_if_absent(key, record):  # released since the first pass
                    return key
            elif await self.is_stale(current) and await self.store.put_if_absent(retired_slot_key(current["holder"], key), time.time()):
                # Retiring the stale holder gave this call, and only this call, the right to the key.
                await self.store.put(key, record)
                return key
        return None

    async def release(self, holder: str, keys: list[str]) -> None:
        for key in keys:
            if await self.store.put_if_absent(retired_slot_key(holder, key), time.time()):
                await self.store.pop(key)

    async def forget(self, holder: str, keys: list[str]) -> None:
        """Drop a long-gone holder's retirement markers (kept until then so a late release is a no-op)."""
        for key in keys:
            await self.store.pop(retired_slot_key(holder, key))
