"""The revert sweeper: retries the start of every recorded revert trigger not yet handled, until it succeeds.

The projector records each `run.revert_requested` in `ledger_run_events` in the projection's transaction;
`handled_at` stays empty until the workflow `revert:<run_id>` was started or joined for it. The projector
tries the start at once (`start`), but a start that fails (Temporal unreachable, a timeout) is only logged:
the record's offset moves on and the partition keeps flowing. This module's loop (`run`) is what owns the
retry: every `interval_s` it reads the unhandled triggers and starts them, oldest first. Starting is
idempotent (signal-with-start of one workflow id), so a trigger started twice, by the projector and the
sweeper or after a crash between start and mark, joins the same revert.

Backoff is per trigger (doubling up to `max_backoff_s`), and a sweep stops at its first failure: during a
Temporal outage each sweep makes one attempt instead of one per waiting run, and a trigger whose start
fails for a reason of its own is tried less and less often without holding up the others. While the last
attempt failed, the projector does not try starts itself (each would wait out the client's own retries,
about ten seconds, with the partition held); the sweeper finds them on its next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.coordinator.projector import RevertTrigger, trigger_from_fact
from kinshasa.coordinator.store import run_events
from kinshasa.schemas.clock import utcnow
from kinshasa.schemas.envelope import RunEventKind

log = logging.getLogger(__name__)

StartRevert = Callable[[RevertTrigger], Awaitable[None]]

_BATCH = 200


@dataclass
class _Backoff:
    failures: int
    next_at: float


class RevertSweeper:
    """Starts recorded revert triggers: once from the projector, then from `run` until each one succeeded."""

    def __init__(self, engine: AsyncEngine, start_revert: StartRevert, *, interval_s: float = 2.0,
                 max_backoff_s: float = 30.0, start_timeout_s: float = 30.0) -> None:
        if interval_s <= 0 or max_backoff_s < interval_s:
            raise ValueError(f"sweep interval {interval_s}s and max backoff {max_backoff_s}s: the interval "
                             "must be positive and no longer than the max backoff")
        self.engine = engine
        self.start_revert = start_revert
        self.interval_s = interval_s
        self.max_backoff_s = max_backoff_s
        self.start_timeout_s = start_timeout_s
        self._backoff: dict[str, _Backoff] = {}
        # Starts under way: the projector and a sweep never start the same trigger side by side (each
        # would signal the workflow, and a second signal costs the revert one more round).
        self._inflight: set[str] = set()
        # True while the newest start attempt failed: Temporal is probably unreachable.
        self.outage = False
        self.started = 0
        self.failed_attempts = 0

    async def start(self, trigger: RevertTrigger) -> bool:
        """The projector's attempt: start unless handled already; False if it must wait for a sweep."""
        if self.outage or trigger.message_id in self._backoff:
            return False
        if await self._handled(trigger.message_id):
            return True
        return await self._attempt(trigger)

    async def pending(self) -> list[RevertTrigger]:
        """Unhandled triggers, oldest first (at most one batch)."""
        query = (select(run_events.c.run_id, run_events.c.message_id, run_events.c.payload,
                        run_events.c.actor_id)
                 .where(run_events.c.type == RunEventKind.REVERT_REQUESTED.type,
                        run_events.c.handled_at.is_(None))
                 .order_by(run_events.c.occurred_at, run_events.c.message_id).limit(_BATCH))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [trigger_from_fact(r.run_id, r.message_id, r.payload, r.actor_id) for r in rows]

    async def sweep(self) -> int:
        """One pass: start the triggers whose backoff is over, up to the first failure; how many started."""
        now = time.monotonic()
        started = 0
        for trigger in await self.pending():
            waiting = self._backoff.get(trigger.message_id)
            if waiting is not None and waiting.next_at > now:
                continue
            if not await self._attempt(trigger):
                break
            started += 1
        return started

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every `interval_s` until `stop`; a failing sweep (the database too) is logged and retried."""
        while not stop.is_set():
            try:
                await self.sweep()
            except Exception:
                log.exception("revert sweep failed; retrying in %.1fs", self.interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

    async def _handled(self, message_id: str) -> bool:
        async with self.engine.connect() as conn:
            handled = (await conn.execute(select(run_events.c.handled_at)
                                          .where(run_events.c.message_id == message_id))).scalar()
        return handled is not None

    async def _attempt(self, trigger: RevertTrigger) -> bool:
        if trigger.message_id in self._inflight:
            return True  # the other caller's start: it marks the trigger, or leaves it for the next sweep
        self._inflight.add(trigger.message_id)
        try:
            # Read again now that this caller holds the trigger: the other one may have started and marked
            # it between the caller's own check (or the sweep's listing) and here.
            if await self._handled(trigger.message_id):
                return True
            await asyncio.wait_for(self.start_revert(trigger), self.start_timeout_s)
        except Exception as exc:
            self.outage = True
            self.failed_attempts += 1
            previous = self._backoff.get(trigger.message_id)
            failures = previous.failures + 1 if previous else 1
            delay = min(self.max_backoff_s, self.interval_s * 2 ** (failures - 1))
            self._backoff[trigger.message_id] = _Backoff(failures, time.monotonic() + delay)
            log.warning("could not start the revert of run %s (attempt %d): %r; it is recorded and will be "
                        "retried in %.0fs (is Temporal reachable?)", trigger.run_id, failures, exc, delay)
            return False
        else:
            self.outage = False
            self.started += 1
            self._backoff.pop(trigger.message_id, None)
            log.info("revert of run %s started or joined (%s)", trigger.run_id, trigger.source)
            async with self.engine.begin() as conn:
                await conn.execute(update(run_events).where(run_events.c.message_id == trigger.message_id)
                                   .values(handled_at=utcnow()))
            return True
        finally:
            self._inflight.discard(trigger.message_id)
