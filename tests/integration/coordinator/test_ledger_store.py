"""The ledger projection and its reads on SQLite and PostgreSQL: idempotent by event id, in apply order."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from kinshasa.coordinator.api import ledger_app
from kinshasa.coordinator.projector import LedgerProjector
from kinshasa.coordinator.run_ledger import Ledger
from kinshasa.coordinator.store import install_ledger
from kinshasa.kernel import sqlite_driver
from kinshasa.kernel.database import create_engine
from kinshasa.schemas.envelope import Actor, EntityRef, Envelope, RunEventKind, deterministic_id
from kinshasa.services.registry import example_catalogue

CATALOGUE = example_catalogue()

AGENT = Actor(kind="agent", id="agent-1")
SERVICE = Actor(kind="service", id="documents")
COORDINATOR = Actor(kind="system", id="coordinator")
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def applied(run_id: str, service: str, op: str, entity_id: str, at: datetime = T0) -> Envelope:
    spec = CATALOGUE.by_command_type(f"{service}.{op}")
    command_id = uuid.uuid4()
    return Envelope(message_id=deterministic_id("applied", str(command_id)), type=spec.event_type("applied"),
                    run_id=run_id, actor=AGENT, causation_id=command_id, correlation_id=run_id,
                    entity=EntityRef(service=service, type=spec.entity_type, id=entity_id), occurred_at=at,
                    payload={"irreversible": True} if spec.egress else {})


def outcome(forward: Envelope, suffix: str, attempt: int = 1, reason: str | None = None) -> Envelope:
    command_type = forward.type.rsplit(".", 1)[0]
    compensate_id = deterministic_id("compensate", str(forward.message_id), str(attempt))
    message_id = deterministic_id("compensated", str(forward.message_id)) if suffix == "compensated" \
        else deterministic_id("compensation_failed", str(compensate_id))
    payload: dict[str, Any] = {"forward_event_id": str(forward.message_id), "forward_type": forward.type}
    if reason:
        payload["reason"] = reason
    return Envelope(message_id=message_id, type=f"{command_type}.{suffix}", run_id=forward.run_id,
                    actor=COORDINATOR, causation_id=compensate_id, correlation_id=forward.run_id,
                    entity=forward.entity, occurred_at=T0 + timedelta(minutes=5), payload=payload)


def fact(run_id: str, kind: RunEventKind, payload: dict[str, Any], at: datetime = T0) -> Envelope:
    return Envelope(message_id=uuid.uuid4(), type=kind.type, run_id=run_id,
                    actor=Actor(kind="system", id="gateway"), correlation_id=run_id, occurred_at=at,
                    payload=payload)


@pytest.fixture
async def ledger(database_url: str) -> AsyncIterator[Ledger]:
    engine = create_engine(database_url)
    await install_ledger(engine)
    store = Ledger(engine)
    try:
        yield store
    finally:
        await store.close()
        await engine.dispose()


async def project(ledger: Ledger, *envelopes: Envelope) -> list[Any]:
    async with ledger.engine.begin() as conn:
        return await LedgerProjector().project_batch(conn, list(envelopes))


async def test_the_same_event_twice_is_one_step(ledger: Ledger) -> None:
    event = applied("r1", "documents", "rename", "d1")
    await project(ledger, event)
    await project(ledger, event, event)  # redelivered, and twice in one batch
    counts = await ledger.counts("r1")
    assert counts.steps == 1 and counts.results == 1


async def test_steps_are_numbered_in_apply_order_and_egress_is_irreversible(ledger: Ledger) -> None:
    events = [applied("r2", "documents", "create", "d1"), applied("r2", "ledger", "post_entry", "a1"),
              applied("r2", "documents", "rename", "d1"), applied("r2", "notifier", "send_email", "e1")]
    await project(ledger, *events[:2])
    await project(ledger, *events[2:])
    page, more = await ledger.steps_page("r2", limit=10)
    assert more is None
    assert [s["step_id"] for s in page] == [4, 3, 2, 1]  # newest first
    assert [s["forward_event_id"] for s in reversed(page)] == [str(e.message_id) for e in events]
    assert page[0]["status"] == "irreversible" and {s["status"] for s in page[1:]} == {"applied"}
    first, before = await ledger.steps_page("r2", limit=3)
    rest, _ = await ledger.steps_page("r2", limit=3, before=before)
    assert [s["step_id"] for s in first + rest] == [4, 3, 2, 1]


async def test_the_pages_of_many_runs_are_read_at_once_in_the_order_asked(ledger: Ledger) -> None:
    await project(ledger, *(applied("p1", "documents", "rename", f"d{i}") for i in range(3)),
                  applied("p2", "documents", "create", "d9"))
    wanted = [("p2", 5, None), ("unknown", 5, None), ("p1", 2, None), ("p1", 2, 2)]
    pages = await ledger.steps_pages(wanted)
    assert pages[1] is None  # a run the ledger has not seen
    assert [p if p is None else ([s["step_id"] for s in p[0]], p[1]) for p in pages] == [
        ([1], None), None, ([3, 2], 2), ([1], None)]
    assert pages[2] == await ledger.steps_page("p1", 2)


async def test_rejections_count_as_results_not_steps(ledger: Ledger) -> None:
    spec = CATALOGUE.by_command_type("documents.archive")
    rejected = Envelope(message_id=uuid.uuid4(), type=spec.event_type("rejected"), run_id="r3", actor=AGENT,
                        entity=EntityRef(service="documents", type="document", id="d9"), occurred_at=T0,
                        payload={"reason": "archived", "code": "DOCUMENT_ARCHIVED"})
    await project(ledger, rejected, rejected, applied("r3", "documents", "rename", "d1"))
    counts = await ledger.counts("r3")
    assert (counts.steps, counts.rejected, counts.results) == (1, 1, 2)
    assert (await ledger.rejections("r3"))[0]["code"] == "DOCUMENT_ARCHIVED"


async def test_compensation_outcomes_settle_steps_once(ledger: Ledger) -> None:
    a, b = applied("r4", "documents", "rename", "d1"), applied("r4", "documents", "edit", "d2")
    await project(ledger, a, b)
    async with ledger.engine.begin() as conn:
        await ledger.claim(conn, "r4", [1, 2], "pass-1", T0)
    cursor = await ledger.settle_cursor("r4")
    await project(ledger, outcome(a, "compensated"), outcome(a, "compensated"))
    await project(ledger, outcome(b, "compensation_failed", attempt=1, reason="changed since"))
    settled, cursor = await ledger.settled_since("r4", cursor)
    assert [(s.step_id, s.status) for s in settled] == [(1, "compensated"), (2, "compensation_failed")]
    # The answer to an older attempt does not override the current one's.
    async with ledger.engine.begin() as conn:
        claimed = await ledger.claim(conn, "r4", [2], "pass-2", T0)
    assert [c.attempt for c in claimed] == [2]
    await project(ledger, outcome(b, "compensation_failed", attempt=1, reason="stale"))
    assert (await ledger.settled_since("r4", cursor))[0] == []
    await project(ledger, outcome(b, "compensated", attempt=2))
    await project(ledger, outcome(b, "compensation_failed", attempt=2, reason="late"))
    counts = await ledger.counts("r4")
    assert counts.compensated == 2 and counts.unsettled == 0


async def test_a_claim_keeps_its_attempt_within_a_pass_and_skips_settled_steps(ledger: Ledger) -> None:
    a, b = applied("r5", "links", "link", "l1"), applied("r5", "links", "unlink", "l2")
    await project(ledger, a, b)
    async with ledger.engine.begin() as conn:
        first = await ledger.claim(conn, "r5", [1, 2], "p1", T0)
    async with ledger.engine.begin() as conn:
        again = await ledger.claim(conn, "r5", [1, 2], "p1", T0)  # a retried activity of the same pass
    assert [c.attempt for c in first] == [1, 1] and [c.attempt for c in again] == [1, 1]
    await project(ledger, outcome(a, "compensated"))
    async with ledger.engine.begin() as conn:
        later = await ledger.claim(conn, "r5", [1, 2], "p2", T0)
    assert [(c.step_id, c.attempt) for c in later] == [(2, 2)]


async def test_a_compensation_seen_before_its_forward_event_settles_the_step(ledger: Ledger) -> None:
    forward = applied("r6", "documents", "archive", "d1")
    await project(ledger, outcome(forward, "compensated"))
    await project(ledger, forward)
    counts = await ledger.counts("r6")
    assert counts.steps == 1 and counts.compensated == 1 and counts.results == 1


async def test_run_facts_build_the_index_and_ask_for_reverts(ledger: Ledger) -> None:
    started = fact("r7", RunEventKind.STARTED, {"agent_id": "agent-1", "entry_point": "chat",
                                               "started_at": T0.isoformat()})
    requested = fact("r7", RunEventKind.REVERT_REQUESTED, {"reason": "bad", "requested_by": "op",
                                                          "published_count": 12}, T0 + timedelta(minutes=2))
    late_finish = fact("r7", RunEventKind.FINISHED, {"published_count": 10}, T0 + timedelta(minutes=3))
    assert await project(ledger, started) == []
    triggers = await project(ledger, requested, late_finish)
    assert [(t.run_id, t.published_count, t.reason) for t in triggers] == [("r7", 12, "bad")]
    # Redelivered: nothing changes, the trigger is reported again (starting a revert is idempotent).
    assert len(await project(ledger, requested)) == 1
    summary = await ledger.summary("r7")
    assert summary is not None
    assert (summary.status, summary.agent_id, summary.final_count, summary.published_count) == \
        ("REVERTING", "agent-1", 12, 12)
    assert [f["type"] for f in await ledger.run_facts("r7")] == ["run.started", "run.revert_requested",
                                                                "run.finished"]


async def test_a_trip_alone_asks_for_no_revert_the_doorbells_request_does(ledger: Ledger) -> None:
    on = fact("r8", RunEventKind.TRIPPED, {"reason": "writes", "published_count": 5, "auto_revert": True})
    off = fact("r9", RunEventKind.TRIPPED, {"reason": "writes", "published_count": 5, "auto_revert": False})
    assert await project(ledger, on, off) == []
    assert (await ledger.summary("r8")).status == "TRIPPED"  # type: ignore[union-attr]
    # With auto-revert the gateway's doorbell records the request in the trip's own transaction.
    rung = fact("r8", RunEventKind.REVERT_REQUESTED, {"reason": "automatic revert after a trip: writes",
                                                     "requested_by": "gateway", "published_count": 5})
    assert [(t.source, t.requested_by) for t in await project(ledger, rung)] == [("revert_requested",
                                                                                   "gateway")]
    assert (await ledger.summary("r8")).status == "REVERTING"  # type: ignore[union-attr]


async def test_search_by_agent_entry_point_status_and_time(ledger: Ledger) -> None:
    for i, (agent, entry) in enumerate([("a", "chat"), ("a", "batch"), ("b", "chat"), ("a", "chat")]):
        await project(ledger, fact(f"s{i}", RunEventKind.STARTED, {
            "agent_id": agent, "entry_point": entry, "started_at": (T0 + timedelta(hours=i)).isoformat()}))
    await project(ledger, fact("s3", RunEventKind.FINISHED, {"published_count": 0}))
    found, _ = await ledger.search_runs(agent_id="a")
    assert [s.run_id for s in found] == ["s3", "s1", "s0"]  # newest first
    found, _ = await ledger.search_runs(entry_point="chat", status="RUNNING")
    assert [s.run_id for s in found] == ["s2", "s0"]
    page1, cursor = await ledger.search_runs(limit=2)
    page2, end = await ledger.search_runs(limit=2, after=cursor)
    assert [s.run_id for s in page1 + page2] == ["s3", "s2", "s1", "s0"] and end is None
    found, _ = await ledger.search_runs(started_after=T0 + timedelta(minutes=30),
                                        started_before=T0 + timedelta(hours=2, minutes=30))
    assert [s.run_id for s in found] == ["s2", "s1"]


async def test_http_api_serves_summaries_steps_and_search(ledger: Ledger) -> None:
    await project(ledger, fact("h1", RunEventKind.STARTED, {"agent_id": "a", "entry_point": "chat",
                                                           "started_at": T0.isoformat()}),
                  *[applied("h1", "documents", "rename", f"d{i}") for i in range(5)])
    transport = httpx.ASGITransport(app=ledger_app(ledger))
    async with httpx.AsyncClient(transport=transport, base_url="http://coordinator") as http:
        summary = (await http.get("/runs/h1")).json()
        assert summary["agent_id"] == "a" and summary["counts"]["steps"] == 5
        page = (await http.get("/runs/h1/steps", params={"limit": 2})).json()
        assert [s["step_id"] for s in page["steps"]] == [5, 4] and page["next_before"] == 4
        page = (await http.get("/runs/h1/steps", params={"limit": 10, "before": 4})).json()
        assert [s["step_id"] for s in page["steps"]] == [3, 2, 1] and page["next_before"] is None
        runs = (await http.get("/runs", params={"agent_id": "a",
                                                "started_after": "2025-01-01T00:00:00Z"})).json()
        assert [r["run_id"] for r in runs["runs"]] == ["h1"]
        missing = await http.get("/runs/nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "RUN_NOT_FOUND"
        for bad in ({"after": "not-a-cursor"}, {"limit": 0}, {"status": "DANCING"},
                    {"started_after": "2025-01-01T00:00:00"}):
            response = await http.get("/runs", params=bad)
            assert response.status_code == 422 and response.json()["error"]["code"] == "VALIDATION", bad
        # Reads only: a revert starts at the gateway's doorbell, never at a side door here.
        body = {"selector": {"agent_id": "a"}, "reason": "side door"}
        assert (await http.post("/reverts", json=body)).status_code == 404
        assert (await http.post("/runs/h1/revert", json=body)).status_code == 405


async def test_reads_see_committed_rows_while_a_write_holds_the_lock_and_one_snapshot_per_read(
        ledger: Ledger) -> None:
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    await project(ledger, applied(run_id, "documents", "create", "doc-1"))
    async with ledger.engine.begin() as conn:
        # A projection in progress: on SQLite it holds the database's only write lock until it commits.
        await LedgerProjector().project_batch(conn, [applied(run_id, "documents", "create", "doc-2")])
        counts = await asyncio.wait_for(ledger.counts(run_id), 10)
        assert counts.steps == 1  # the committed step only, without waiting for the write
    assert (await ledger.counts(run_id)).steps == 2
    if ledger.reader is not ledger.engine:  # SQLite: a reader of its own that cannot write
        with pytest.raises(OperationalError, match="readonly"):
            async with ledger.reader.begin() as conn:
                await conn.execute(text("DELETE FROM ledger_steps"))
        async with ledger.reader.connect() as conn:
            # On the kernel's driver, and the statements of one read see one snapshot.
            raw = await conn.get_raw_connection()
            assert isinstance(raw.dbapi_connection, sqlite_driver.OneHopConnection)
            assert (await ledger.counts(run_id, conn)).steps == 2
            await project(ledger, applied(run_id, "documents", "create", "doc-3"))
            assert (await ledger.counts(run_id, conn)).steps == 2
        assert (await ledger.counts(run_id)).steps == 3
