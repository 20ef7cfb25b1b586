"""Live feeds behind the operator's subscriptions: alerts as they are raised and a run as it changes.

Replicas of one gateway share its database, and an alert may be stored by any of them (a trip on a
write, another component's alert read back from kinshasa.alerts by whichever replica consumed it), so
the feeds read the database rather than one process's events. One poller per process serves every
subscriber of the alert feed and runs only while someone listens; a run's feed polls that run's row.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from kinshasa.gateway import runs as runs_mod
from kinshasa.gateway import store
from kinshasa.gateway.alerts import Alert, list_alerts
from kinshasa.gateway.errors import BackendUnavailable
from kinshasa.gateway.reads import Backends
from kinshasa.schemas.envelope import utcnow

log = logging.getLogger(__name__)

Connect = Callable[[], AbstractAsyncContextManager[AsyncConnection]]
# How often the feeds look; an operator sees an alert or a run's change within about this.
POLL_S = 0.5
# An alert is delivered live if it is stored within this long of its own created_at (another component's
# alert carries the time it was raised, and reaches the gateway with the consumer's lag). One stored later
# still lists in the `alerts` query.
LOOKBACK = timedelta(minutes=10)
# Alerts a subscriber has not taken yet; one that falls this far behind loses the oldest.
QUEUE_MAX = 1_000
# What a new subscriber is sent first: the alerts raised this long before it subscribed.
REPLAY = timedelta(seconds=30)
# Run statuses whose revert progress moves: the coordinator is asked only then.
_REVERTING = (store.REVERTING, store.REVERT_FAILED)


class AlertFeed:
    """Every alert as the poller finds it, to every subscriber; a new subscriber first gets those raised in
    the last `REPLAY`, so a client that lists alerts and then subscribes misses none raised in between
    (it may get one twice: alerts carry their id)."""

    def __init__(self, connect: Connect, poll_s: float = POLL_S) -> None:
        self._connect = connect
        self._poll_s = poll_s
        self._subscribers: set[asyncio.Queue[Alert]] = set()
        self._task: asyncio.Task[None] | None = None
        # Subscribers inside `subscribe`, including those still waiting for the poller's first read.
        self._listeners = 0
        # What the poller has seen within LOOKBACK, by id; set once it has read what was already there.
        self._recent: dict[str, Alert] = {}
        self._primed = asyncio.Event()

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[Alert]]:
        queue: asyncio.Queue[Alert] = asyncio.Queue(QUEUE_MAX)
        if self._task is None or self._task.done():
            self._recent = {}
            self._primed = asyncio.Event()
            self._task = asyncio.create_task(self._poll(), name="alert-feed")
        # Counted from before the wait for priming: a subscriber cancelled while the poller primes still
        # leaves through `finally`, and the last one to leave, primed or not, stops the poller.
        self._listeners += 1
        try:
            await self._primed.wait()
            # No await from here to `add`: the poller cannot fan out an alert in between.
            since = utcnow() - REPLAY
            for alert in sorted(self._recent.values(), key=lambda a: a.created_at):
                if alert.created_at >= since:
                    _put(queue, alert)
            self._subscribers.add(queue)
            yield queue
        finally:
            self._subscribers.discard(queue)
            self._listeners -= 1
            if not self._listeners and self._task is not None:
                # No await here: a subscriber joining meanwhile must find either this poller running or
                # none (and start its own), never one that is being cancelled.
                self._task.cancel()
                self._task = None

    @property
    def polling(self) -> bool:
        """Whether a poller is running (one runs only while someone listens)."""
        return self._task is not None and not self._task.done()

    async def _poll(self) -> None:
        while True:
            try:
                since = utcnow() - LOOKBACK
                async with self._connect() as conn:
                    found = await list_alerts(conn, limit=QUEUE_MAX, since=since)
                    await conn.rollback()
                for alert in reversed(found):  # oldest first
                    if alert.alert_id not in self._recent:
                        self._recent[alert.alert_id] = alert
                        for queue in self._subscribers:
                            _put(queue, alert)
                for alert_id in [a for a, alert in self._recent.items() if alert.created_at < since]:
                    del self._recent[alert_id]
            except Exception:
                # A database blip must not end every operator's feed; the next poll tries again.
                log.exception("the alert feed could not read alerts")
            self._primed.set()
            await asyncio.sleep(self._poll_s)


def _put(queue: asyncio.Queue[Alert], alert: Alert) -> None:
    if queue.full():
        queue.get_nowait()  # a subscriber this far behind loses the oldest
    queue.put_nowait(alert)


async def run_changes(
    connect: Connect, backends: Backends, run_id: str, poll_s: float = POLL_S
) -> AsyncIterator[runs_mod.RunRecord]:
    """The run now, then again each time its row, its commands' counts or (while it is reverting) its
    revert progress change, until it settles (`settled`): its last state is sent and the feed ends, so a
    console left open on a finished run costs nothing. RUN_NOT_FOUND before anything for a run that does
    not exist."""
    last: Any = None
    while True:
        async with connect() as conn:
            run = await runs_mod.load_run(conn, run_id)
            counts = await runs_mod.command_counts(conn, run_id)
            await conn.rollback()
        progress: Any = None
        if run.status in _REVERTING:
            try:
                progress = (await backends.progress_many([run_id]))[0]
            except BackendUnavailable:
                progress = None  # the run's own row still moves; the coordinator is asked again next time
        fingerprint = (run, tuple(sorted(counts.items())), progress)
        if fingerprint != last:
            last = fingerprint
            yield run
        if settled(run, counts):
            return
        await asyncio.sleep(poll_s)


def settled(run: runs_mod.RunRecord, counts: dict[str, int]) -> bool:
    """Nothing more to watch: the run was reverted or its revert gave up (an operator's new revert is a new
    decision, and the console subscribes again after it), or it finished holding nothing and awaiting no
    approval. A tripped or running run, or one still holding writes, may still change."""
    if run.status in (store.REVERTED, store.REVERT_FAILED):
        return True
    waiting = counts.get(store.HELD, 0) + counts.get(store.AWAITING_APPROVAL, 0)
    return run.status == store.FINISHED and not waiting
