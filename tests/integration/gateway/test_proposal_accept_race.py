"""Two operators accepting proposals of one layer at once: neither change is lost."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import insert, text

from kinshasa.gateway import backtest
from kinshasa.gateway import proposals as proposals_mod
from kinshasa.gateway.backtest import load_policy_history
from kinshasa.gateway.errors import Invalid
from kinshasa.gateway.incidents import IncidentKind, open_incident
from kinshasa.gateway.policy import PolicyScope
from kinshasa.gateway.store import install_gateway_tables, proposals
from kinshasa.gateway.uow import transaction
from kinshasa.kernel.database import create_engine
from kinshasa.schemas.envelope import utcnow


async def _proposal(conn: Any, entry_point: str, settings: dict[str, Any]) -> str:
    incident_id = await open_incident(conn, IncidentKind.TRIP, utcnow(), run_id=str(uuid.uuid4()),
                                      agent_id="agent-1", entry_point=entry_point, threshold="writes")
    proposal_id = str(uuid.uuid4())
    zero = {name: 0 for name in backtest.Backtest.__dataclass_fields__}
    await conn.execute(insert(proposals).values(
        proposal_id=proposal_id, incident_id=incident_id, scope=PolicyScope.ENTRY_POINT.value,
        subject=entry_point, settings=json.dumps(settings), rationale="r", backtest=json.dumps(zero),
        status="PROPOSED", created_at=utcnow(),
    ))
    return proposal_id


@pytest.mark.postgres
async def test_two_proposals_of_one_layer_accepted_at_once_both_take_effect(postgres_url: str) -> None:
    """Each accept reads the layer, merges its change and appends: the second must read the first's."""
    engine = create_engine(postgres_url)
    try:
        await install_gateway_tables(engine)
        async with transaction(engine) as tx:
            fewer_writes = await _proposal(tx.conn, "billing", {"max_writes": 5})
            slower = await _proposal(tx.conn, "billing", {"max_velocity": 3})
            await tx.commit()

        async def accept_slower() -> None:
            async with transaction(engine) as tx:
                await proposals_mod.accept(tx.conn, slower, "slow down", "op-2")
                await tx.commit()

        async with transaction(engine) as first:
            await proposals_mod.accept(first.conn, fewer_writes, "fewer writes", "op-1")
            second = asyncio.create_task(accept_slower())
            # The second accept either finishes (it read the layer without the first's change) or waits
            # on a lock; either way it has had its chance to read before the first commits.
            deadline = time.monotonic() + 20
            async with engine.connect() as probe:
                while not second.done():
                    waiting = await probe.scalar(text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND datname = current_database()"
                    ))
                    await probe.rollback()
                    if waiting:
                        break
                    assert time.monotonic() < deadline, "the second accept neither finished nor waited"
                    await asyncio.sleep(0.02)
            await first.commit()
        await second

        async with engine.connect() as conn:
            history = await load_policy_history(conn)
            await conn.rollback()
        layer = history.layers_at(None)[(PolicyScope.ENTRY_POINT, "billing")]
        assert (layer.document.max_writes, layer.document.max_velocity) == (5, 3)
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_two_operators_accepting_one_proposal_at_once_append_one_version(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    try:
        await install_gateway_tables(engine)
        async with transaction(engine) as tx:
            proposal = await _proposal(tx.conn, "billing", {"max_writes": 5})
            await tx.commit()

        async def accept(operator: str) -> str:
            async with transaction(engine) as tx:
                await proposals_mod.accept(tx.conn, proposal, "mine", operator)
                await tx.commit()
            return operator

        answers = await asyncio.gather(accept("op-1"), accept("op-2"), return_exceptions=True)
        refused = [a for a in answers if isinstance(a, Invalid)]
        assert len(refused) == 1 and "already ACCEPTED" in str(refused[0]), answers
        async with engine.connect() as conn:
            history = await load_policy_history(conn)
            decided = await proposals_mod.get_proposal(conn, proposal)
            await conn.rollback()
        assert [pv.version for pv in history.versions] == [decided.policy_version]
        assert decided.decided_by in [a for a in answers if isinstance(a, str)]
    finally:
        await engine.dispose()
