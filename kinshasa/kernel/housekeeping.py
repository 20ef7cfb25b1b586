"""Scheduled pruning of what a component no longer needs: outbox rows published long ago.

A published outbox row has done its job once the broker acknowledged it; kept for `keep_published`
(a day by default) it still absorbs a retried emission of the same deterministic message id, and an
operator can still see what went out recently. After that it is deleted, in chunks of `chunk` rows,
each its own short transaction, so a SQLite writer never waits long behind the pruner.

Inbox rows are not pruned: the command and event topics keep every message forever, so a consumer
group reset to an old offset must still find each message it already applied.

A component may hand the housekeeper its own pruners (`also`), run in the same rounds: the gateway's
idempotency keys expire after 24 hours this way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.kernel.outbox import OutboxStore, SqlOutboxStore
from kinshasa.schemas.envelope import utcnow
from kinshasa.settings import ComponentSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HousekeepingPolicy:
    """How long published outbox rows stay, how often the pruner looks, and its chunk size."""

    keep_published: timedelta = timedelta(days=1)
    every: timedelta = timedelta(minutes=10)
    chunk: int = 5_000

    def __post_init__(self) -> None:
        if self.keep_published < timedelta(0):
            raise ValueError(f"keep_published must not be negative, got {self.keep_published}")
        if self.every <= timedelta(0):
            raise ValueError(f"every must be positive, got {self.every}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {self.chunk}")


def housekeeping_policy(settings: ComponentSettings) -> HousekeepingPolicy:
    """The policy a component's settings ask for (KINSHASA_..._OUTBOX_KEEP_PUBLISHED_HOURS)."""
    return HousekeepingPolicy(keep_published=timedelta(hours=settings.outbox_keep_published_hours))


# A component's own pruning: given the time now, delete what expired (in short transactions); the count.
Pruner = Callable[[datetime], Awaitable[int]]


class Housekeeper:
    """Prunes one component's published outbox rows on a schedule; `run(stop)` until stopped."""

    def __init__(self, engine: AsyncEngine, policy: HousekeepingPolicy | None = None, *,
                 store: OutboxStore | None = None, clock: Callable[[], datetime] = utcnow,
                 also: Sequence[Pruner] = ()) -> None:
        self.engine = engine
        self.policy = policy or HousekeepingPolicy()
        self.store = store or SqlOutboxStore()
        self.clock = clock
        self.also = tuple(also)

    async def prune_once(self) -> int:
        """Delete every published row older than the policy allows, chunk by chunk; returns the count."""
        before = self.clock() - self.policy.keep_published
        total = 0
        while True:
            async with self.engine.begin() as conn:
                deleted = await self.store.prune_published(conn, published_before=before,
                                                           limit=self.policy.chunk)
            total += deleted
            if deleted < self.policy.chunk:
                break
            await asyncio.sleep(0)  # let the component's own transactions in between chunks
        if total:
            log.info("pruned %d outbox rows published before %s", total, before.isoformat())
        for prune in self.also:
            await prune(self.clock())
        return total

    async def run(self, stop: asyncio.Event) -> None:
        """Prune every `policy.every` until `stop` is set; a failed round is logged and tried again."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.policy.every.total_seconds())
            if stop.is_set():
                return
            try:
                await self.prune_once()
            except Exception:  # housekeeping must never take the component down
                log.exception("outbox pruning failed; trying again in %s", self.policy.every)
