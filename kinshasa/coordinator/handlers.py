"""The projector's consumer handler: parse a record, fold it into the ledger, start the revert it asks for."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.coordinator.projector import LedgerProjector, RevertTrigger
from kinshasa.coordinator.store import run_events
from kinshasa.topics.consumer import Record

log = logging.getLogger(__name__)

StartRevert = Callable[[RevertTrigger], Awaitable[None]]


class LedgerHandler:
    """Handles one record of an events topic or kinshasa.runs; idempotent, so redelivery is harmless.

    The projection commits first; only then is the revert started, and the run fact is marked handled
    after that. A crash in between starts the revert again on redelivery, which joins the running one.
    """

    def __init__(self, engine: AsyncEngine, start_revert: StartRevert | None = None) -> None:
        self.engine = engine
        self.projector = LedgerProjector()
        self.start_revert = start_revert

    async def __call__(self, record: Record) -> None:
        """One record (the DLQ-guarded fallback path)."""
        envelope = record.envelope()  # InvalidMessage: the DLQ guard dead-letters it at once
        async with self.engine.begin() as conn:
            triggers = await self.projector.project_batch(conn, [envelope])
        await self._start_all(triggers)

    async def handle_batch(self, records: list[Record]) -> None:
        """A whole batch in one transaction; any failure (a malformed record too) hands it to the fallback."""
        envelopes = [record.envelope() for record in records]
        async with self.engine.begin() as conn:
            triggers = await self.projector.project_batch(conn, envelopes)
        await self._start_all(triggers)

    async def _start_all(self, triggers: list[RevertTrigger]) -> None:
        if self.start_revert is None:
            return
        for trigger in triggers:
            await self._start_once(trigger)

    async def _start_once(self, trigger: RevertTrigger) -> None:
        async with self.engine.connect() as conn:
            handled = (await conn.execute(select(run_events.c.handled_at)
                                          .where(run_events.c.message_id == trigger.message_id))).scalar()
        if handled is not None:
            return
        assert self.start_revert is not None
        await self.start_revert(trigger)
        log.info("revert of run %s started or joined (%s)", trigger.run_id, trigger.source)
        async with self.engine.begin() as conn:
            await conn.execute(update(run_events).where(run_events.c.message_id == trigger.message_id)
                               .values(handled_at=datetime.now(UTC)))
