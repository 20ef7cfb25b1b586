"""The quarantine window on Kafka: nothing before it elapses, all after; a tripped run's holds stay held."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from sqlalchemy import select

from kinshasa.gateway.quarantine import ReleaseStats
from kinshasa.gateway.releaser import Releaser
from kinshasa.gateway.store import runs
from kinshasa.schemas.envelope import utcnow
from kinshasa.topics.catalogue import commands_topic
from tests.integration.gateway.conftest import Harness, TopicReader, outbox_drained


async def test_held_command_reaches_kafka_only_after_its_window(
    harness: Harness, reader: TopicReader
) -> None:
    c = harness.client
    # A window long enough that the early read is done well inside it on a loaded machine.
    await c.set_policy({"quarantineWindowS": 6.0, "operationWindows": {"documents.archive": 0}})
    run_id = await c.start_run(entry_point="window")
    started = time.monotonic()
    held = (await c.create_document(run_id))["data"]["createDocument"]
    immediate = (
        await c.data(
            f'mutation {{ archiveDocument(runId: "{run_id}", documentId: "d") {{ commandId status }} }}'
        )
    )["archiveDocument"]
    assert held["status"] == "HELD" and immediate["status"] == "PUBLISHED"  # per-operation window 0
    topic = commands_topic("documents")
    early = await reader.wait_for([topic], run_id, 1)

    async def status_of_held() -> str:
        found = await c.data(f'{{ command(id: "{held["commandId"]}") {{ status }} }}')
        return str(found["command"]["status"])

    # Still held after the read, so it was held (and off Kafka) when the read ran: inside the window.
    assert await status_of_held() == "HELD"
    assert [str(e.message_id) for e in early] == [immediate["commandId"]]
    late = await reader.wait_for([topic], run_id, 2, within_s=30)
    assert {str(e.message_id) for e in late} == {held["commandId"], immediate["commandId"]}
    assert time.monotonic() - started >= 6.0
    assert await status_of_held() == "PUBLISHED"


async def test_tripped_runs_held_commands_stay_held(harness: Harness, reader: TopicReader) -> None:
    c = harness.client
    # Auto-revert off: with it, the trip rings the revert doorbell, which discards the held commands. A long
    # window, so no write is released before the trip however slow the writes are; the releaser passes
    # below run an hour later, long past it.
    await c.set_policy({"quarantineWindowS": 60.0, "maxWrites": 2, "holdTimeoutS": None,
                        "autoRevert": False})
    run_id = await c.start_run(entry_point="trip-hold")
    held = [(await c.create_document(run_id))["data"]["createDocument"] for _ in range(2)]
    assert [r["status"] for r in held] == ["HELD", "HELD"]
    assert (await c.create_document(run_id))["errors"][0]["extensions"]["code"] == "BREAKER_OPEN"
    # A releaser pass an hour later, long past their window, releases nothing of a tripped run.
    later = Releaser(harness.gateway.engine, interval_s=1.0, batch=100,
                     clock=lambda: utcnow() + timedelta(hours=1))
    assert (await later.run_once()).released == 0
    assert await reader.envelopes([commands_topic("documents")], run_id) == []
    listed = await c.data(
        f'{{ run(id: "{run_id}") {{ commands {{ status }} counts {{ held published }} }} }}'
    )
    assert listed["run"]["counts"] == {"held": 2, "published": 0}
    # Closing the breaker does not release them either: only releaseRun does.
    await c.data(
        f'mutation {{ setBreaker(runId: "{run_id}", state: CLOSED) {{ id }} }}',
        key="test-operator-key-" + "c" * 40,
    )
    assert (await later.run_once()).released == 0
    assert await reader.envelopes([commands_topic("documents")], run_id) == []
    listed = await c.data(f'{{ run(id: "{run_id}") {{ counts {{ held published }} }} }}')
    assert listed["run"]["counts"] == {"held": 2, "published": 0}


async def test_hold_timeout_discards_never_releases(harness: Harness, reader: TopicReader) -> None:
    c = harness.client
    # The window is long, so the write is still held when the trip comes; the discard is timed from the trip.
    await c.set_policy({"quarantineWindowS": 60.0, "maxWrites": 1, "holdTimeoutS": 1.0,
                        "autoRevert": False})
    run_id = await c.start_run(entry_point="timeout")
    await c.create_document(run_id)
    assert (await c.create_document(run_id))["errors"][0]["extensions"]["code"] == "BREAKER_OPEN"
    for _ in range(50):
        counts = (await c.data(f'{{ run(id: "{run_id}") {{ counts {{ held discarded }} }} }}'))["run"][
            "counts"
        ]
        if counts["discarded"] == 1:
            break
        await asyncio.sleep(0.2)
    assert counts == {"held": 0, "discarded": 1}
    await outbox_drained(harness.gateway.engine)
    assert await reader.envelopes([commands_topic("documents")], run_id) == []


async def test_a_releaser_pass_with_nothing_due_takes_no_lock(harness: Harness) -> None:
    """Most passes find nothing due. They must not wait for (or hold) what agent writes need: SQLite's
    write lock, PostgreSQL's run rows. Here another transaction holds both while a pass runs."""
    c = harness.client
    await c.set_policy({"quarantineWindowS": 60.0})
    run_id = await c.start_run(entry_point="idle-pass")
    held = (await c.create_document(run_id))["data"]["createDocument"]
    assert held["status"] == "HELD"
    engine = harness.gateway.engine
    releaser = Releaser(engine, interval_s=60, batch=10)
    async with engine.begin() as conn:  # BEGIN IMMEDIATE on SQLite; the run rows locked on PostgreSQL
        await conn.execute(select(runs.c.run_id).with_for_update())
        stats = await asyncio.wait_for(releaser.run_once(), 5)
    assert stats == ReleaseStats()
    status = (await c.data(f'{{ command(id: "{held["commandId"]}") {{ status }} }}'))["command"]["status"]
    assert status == "HELD"
