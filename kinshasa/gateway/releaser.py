"""The releaser: a background task that moves commands whose quarantine window elapsed into the outbox."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.gateway.quarantine import ReleaseStats, any_due, release_due
from kinshasa.gateway.uow import transaction
from kinshasa.kernel.database import READ_ONLY
from kinshasa.schemas.envelope import utcnow

log = logging.getLogger(__name__)


class Releaser:
    """Polls for due commands; each pass is one transaction. It never touches a held or tripped run."""

    def __init__(
        self,
        engine: AsyncEngine,
        interval_s: float,
        batch: int,
        on_commit: Callable[[], None] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._engine = engine
        self._interval = interval_s
        self._batch = batch
        self._on_commit = on_commit
        # What time it is for the timers (quarantine windows, hold timeouts): injectable, so a test proves
        # a window of an hour elapses without waiting for it.
        self._clock = clock

    async def run_once(self) -> ReleaseStats:
        now = self._clock()
        # Most passes find nothing due: ask without locks first, so an idle pass does not take SQLite's
        # write lock (which every agent write needs) or PostgreSQL row locks.
        async with self._engine.connect() as conn:
            await conn.execution_options(**{READ_ONLY: True})
            if not await any_due(conn, now):
                return ReleaseStats()
        async with transaction(self._engine, self._on_commit) as tx:
            stats = await release_due(tx, now, self._batch)
            await tx.commit()
        return stats

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                stats = await self.run_once()
                if stats.released >= self._batch:
                    continue  # more are due: no sleep
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("releaser pass failed; retrying after %.2fs", self._interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)
