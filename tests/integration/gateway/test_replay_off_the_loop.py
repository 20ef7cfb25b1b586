"""A backtest or a proposal's replay runs in a worker thread: the event loop keeps admitting writes."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from kinshasa.gateway import backtest
from kinshasa.gateway import proposals as proposals_mod
from kinshasa.gateway.incidents import IncidentKind, get_incident, open_incident
from kinshasa.gateway.policy import PolicyDocument, PolicyScope
from kinshasa.gateway.store import install_gateway_tables
from kinshasa.gateway.uow import transaction
from kinshasa.kernel.database import create_engine
from kinshasa.schemas.envelope import utcnow


async def test_backtests_and_drafts_replay_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread = threading.current_thread()
    seen: list[threading.Thread] = []
    compare = backtest.compare

    def recording_compare(*args: Any) -> Any:
        seen.append(threading.current_thread())
        return compare(*args)

    def recording_drafts(self: proposals_mod.Proposer) -> list[proposals_mod.Draft]:
        seen.append(threading.current_thread())
        return []

    monkeypatch.setattr(backtest, "compare", recording_compare)
    monkeypatch.setattr(proposals_mod.Proposer, "drafts", recording_drafts)
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'gw.sqlite3'}")
    try:
        await install_gateway_tables(engine)
        async with transaction(engine) as tx:
            incident_id = await open_incident(tx.conn, IncidentKind.TRIP, utcnow(), run_id="r-1",
                                              agent_id="a", entry_point="e", threshold="writes")
            await tx.commit()
        async with engine.connect() as conn:
            found = await backtest.backtest_policy(
                conn, {}, PolicyScope.DEFAULT, "", PolicyDocument(max_writes=1), utcnow()
            )
            incident = await get_incident(conn, incident_id)
            await proposals_mod.draft(conn, incident, {})
            await conn.rollback()
    finally:
        await engine.dispose()
    assert found.runs_replayed == 0
    assert len(seen) == 2 and all(t is not loop_thread for t in seen), seen


@pytest.mark.parametrize("kind", [IncidentKind.EGRESS_DENIED, IncidentKind.AGENT_BUDGET,
                                  IncidentKind.DEAD_LETTER, IncidentKind.REVERT])
async def test_an_incident_nothing_is_proposed_for_reads_no_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: IncidentKind
) -> None:
    loads: list[Any] = []

    async def recording_load(*args: Any, **kwargs: Any) -> list[Any]:
        loads.append(args)
        return []

    monkeypatch.setattr(proposals_mod, "load_history", recording_load)
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'gw.sqlite3'}")
    try:
        await install_gateway_tables(engine)
        async with transaction(engine) as tx:
            incident_id = await open_incident(tx.conn, kind, utcnow(), run_id="r-1", agent_id="a",
                                              entry_point="e")
            await tx.commit()
        async with engine.connect() as conn:
            drafts = await proposals_mod.draft(conn, await get_incident(conn, incident_id), {})
            await conn.rollback()
    finally:
        await engine.dispose()
    assert drafts == [] and loads == []
