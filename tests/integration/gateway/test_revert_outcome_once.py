"""One revert outcome, one incident, however often the coordinator reports it."""

from __future__ import annotations

import uuid

from sqlalchemy import select

from kinshasa.gateway.store import incidents
from kinshasa.schemas.envelope import Actor, Envelope, utcnow
from tests.integration.gateway.conftest import Harness


def _outcome(run_id: str, kind: str) -> Envelope:
    return Envelope(
        message_id=uuid.uuid4(),
        type=kind,
        run_id=run_id,
        actor=Actor(kind="system", id="coordinator"),
        correlation_id=run_id,
        occurred_at=utcnow(),
        payload={"compensated": 0, "irreversible": 0},
    )


async def _incidents_of(harness: Harness, run_id: str) -> list[str]:
    async with harness.gateway.engine.connect() as conn:
        rows = await conn.execute(select(incidents.c.kind).where(incidents.c.run_id == run_id))
        found = sorted(kind for (kind,) in rows)
        await conn.rollback()
    return found


async def test_the_same_revert_outcome_reported_twice_is_one_incident(harness: Harness) -> None:
    """A joined revert request gives the coordinator's workflow another round: the same outcome again,
    under a new message id. The run was reverted once; so is its incident."""
    c = harness.client
    run_id = await c.start_run()
    listener = harness.gateway.listener
    await listener.handle_envelope(_outcome(run_id, "run.revert_failed"))
    await listener.handle_envelope(_outcome(run_id, "run.revert_failed"))
    assert await _incidents_of(harness, run_id) == ["REVERT_FAILED"]
    await listener.handle_envelope(_outcome(run_id, "run.reverted"))
    await listener.handle_envelope(_outcome(run_id, "run.reverted"))
    assert await _incidents_of(harness, run_id) == ["REVERT", "REVERT_FAILED"]
