"""The projector's consumer handler: parse a record, fold it into the ledger, start the revert it asks for."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.coordinator.projector import LedgerProjector, RevertTrigger
from kinshasa.coordinator.sweeper import RevertSweeper
from kinshasa.topics.consumer import Record


class LedgerHandler:
    """Handles one record of an events topic or kinshasa.runs; idempotent, so redelivery is harmless.

    The projection commits first, recording a `revert_requested` with `handled_at` empty; only then is the
    revert started, and the fact is marked handled after that. A start that fails does not fail the
    record: the trigger is recorded, so the offset moves on and the sweeper retries the start. A crash
    between start and mark starts it again (on redelivery or by the sweeper), which joins the running one.
    """

    def __init__(self, engine: AsyncEngine, sweeper: RevertSweeper | None = None) -> None:
        self.engine = engine
        self.projector = LedgerProjector()
        self.sweeper = sweeper

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
        if self.sweeper is None:
            return
        for trigger in triggers:
            if not await self.sweeper.start(trigger):
                return  # the rest wait for the sweep too: one failed start is enough to hold the partition
