"""The revert sweeper on SQLite and PostgreSQL: a failed start stays recorded and is retried until it works.

Temporal is stood in for by the start function (what it raises is what an unreachable server makes the
client raise); the tests with the real server stopped and killed are in tests/faults/test_temporal.py.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.coordinator.projector import LedgerProjector, RevertTrigger
from kinshasa.coordinator.store import install_ledger
from kinshasa.coordinator.sweeper import RevertSweeper
from kinshasa.kernel.database import create_engine
from kinshasa.schemas.envelope import Actor, Envelope, RunEventKind, utcnow
from tests.integration.coordinator.harness import wait_for

GATEWAY = Actor(kind="system", id="gateway")


class Temporal:
    """Starts that fail while `down` (or always, for the runs in `refusing`), and the ones that succeeded."""

    def __init__(self) -> None:
        self.down = True
        self.refusing: set[str] = set()
        self.started: list[str] = []

    async def start(self, trigger: RevertTrigger) -> None:
        if self.down or trigger.run_id in self.refusing:
            raise RuntimeError("Failed client connect: connection refused")
        self.started.append(trigger.run_id)


@pytest.fixture
async def ledger_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    await install_ledger(engine)
    try:
        yield engine
    finally:
        await engine.dispose()


async def request_revert(engine: AsyncEngine, run_id: str) -> RevertTrigger:
    fact = Envelope(message_id=uuid.uuid4(), type=RunEventKind.REVERT_REQUESTED.type, run_id=run_id,
                    actor=GATEWAY, correlation_id=run_id, occurred_at=utcnow(),
                    payload={"reason": "bad run", "requested_by": "op-1", "published_count": 3})
    async with engine.begin() as conn:
        trigger = await LedgerProjector().project(conn, fact)
    assert trigger is not None
    return trigger


async def test_a_start_that_fails_stays_recorded_and_the_sweeper_starts_it_once_temporal_answers(
        ledger_engine: AsyncEngine) -> None:
    temporal = Temporal()
    sweeper = RevertSweeper(ledger_engine, temporal.start, interval_s=0.01, max_backoff_s=0.05)
    trigger = await request_revert(ledger_engine, "run-1")

    assert await sweeper.start(trigger) is False
    assert sweeper.outage and sweeper.failed_attempts == 1
    assert [t.message_id for t in await sweeper.pending()] == [trigger.message_id]
    # While the last attempt failed, the projector leaves new triggers to the sweeper at once.
    second = await request_revert(ledger_engine, "run-2")
    assert await sweeper.start(second) is False
    assert sweeper.failed_attempts == 1

    temporal.down = False

    async def all_started() -> bool:
        await sweeper.sweep()
        return not await sweeper.pending()

    await wait_for(all_started, 10, "the sweeper to start both reverts")
    assert sorted(temporal.started) == ["run-1", "run-2"]  # run-1 may still be backing off at first
    assert not sweeper.outage
    # Handled now: a redelivered trigger starts nothing more.
    assert await sweeper.start(trigger) is True
    assert len(temporal.started) == 2


async def test_a_trigger_whose_start_keeps_failing_does_not_hold_up_the_others(
        ledger_engine: AsyncEngine) -> None:
    temporal = Temporal()
    temporal.down = False
    temporal.refusing = {"run-bad"}
    sweeper = RevertSweeper(ledger_engine, temporal.start, interval_s=5.0, max_backoff_s=60.0)
    bad = await request_revert(ledger_engine, "run-bad")
    await request_revert(ledger_engine, "run-good")

    assert await sweeper.sweep() == 0  # the older one fails first and ends the sweep
    assert await sweeper.sweep() == 1  # it now waits out its backoff while the other one starts
    assert temporal.started == ["run-good"]
    assert [t.message_id for t in await sweeper.pending()] == [bad.message_id]


async def test_a_trigger_the_projector_started_after_a_sweep_listed_it_is_not_started_again(
        ledger_engine: AsyncEngine) -> None:
    temporal = Temporal()
    temporal.down = False
    sweeper = RevertSweeper(ledger_engine, temporal.start, interval_s=5.0, max_backoff_s=60.0)
    first = await request_revert(ledger_engine, "run-1")
    second = await request_revert(ledger_engine, "run-2")
    listed = await sweeper.pending()
    assert [t.message_id for t in listed] == [first.message_id, second.message_id]

    # While the sweep works through its list, the projector starts (and marks) the second trigger.
    real_start = temporal.start

    async def start_and_let_the_projector_in(trigger: RevertTrigger) -> None:
        await real_start(trigger)
        if trigger.run_id == "run-1":
            assert await sweeper.start(second) is True

    sweeper.start_revert = start_and_let_the_projector_in
    assert await sweeper.sweep() == 2  # both handled ...
    assert temporal.started == ["run-1", "run-2"]  # ... and each started once
