"""Idempotent writes: a retry with the same key gets the first answer and creates nothing, on any replica,
even when the gateway that took the first request was killed between its commit and its answer."""

from __future__ import annotations

import asyncio
import signal
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from kinshasa.gateway.idempotency import prune
from kinshasa.gateway.store import commands, idempotency_keys, runs
from kinshasa.kernel import sqlite_driver
from kinshasa.kernel.database import create_engine
from kinshasa.kernel.outbox import outbox
from kinshasa.schemas.envelope import Envelope, utcnow
from kinshasa.services.documents import document_versions, documents
from kinshasa.topics.catalogue import commands_topic
from tests.integration.gateway.conftest import (
    AGENT_KEY,
    OPERATOR_KEY,
    OTHER_AGENT_KEY,
    PRINCIPALS,
    Harness,
    TopicReader,
)
from tests.integration.gateway.replicas import gateway_replicas, post
from tests.integration.services.helpers import dispatchers

START = "mutation($e: String!, $k: String) { startRun(entryPoint: $e, idempotencyKey: $k) { id } }"
CREATE = (
    "mutation($r: ID!, $t: String!, $k: String) { createDocument(runId: $r, input: {title: $t}, "
    "idempotencyKey: $k) { commandId runId operation mutation entityId status releaseAt acceptedAt } }"
)
_DAY = timedelta(hours=24, seconds=1)
RENAME = (
    'mutation($r: ID!, $d: ID!, $k: String) { renameDocument(runId: $r, documentId: $d, title: "n", '
    "idempotencyKey: $k) { commandId status } }"
)


async def _command_count(harness: Harness, run_id: str) -> int:
    async with harness.gateway.engine.connect() as conn:
        query = select(func.count()).select_from(commands).where(commands.c.run_id == run_id)
        return int((await conn.execute(query)).scalar_one())


async def test_a_retried_write_gets_the_first_receipt_and_creates_nothing(harness: Harness) -> None:
    c = harness.client
    run_id = await c.start_run()
    first = (await c.data(CREATE, {"r": run_id, "t": "report", "k": "write-1"}))["createDocument"]
    again = (await c.data(CREATE, {"r": run_id, "t": "report", "k": "write-1"}))["createDocument"]
    # Same command id, same new entity id, same status at acceptance: the very same receipt.
    assert again == first
    assert await _command_count(harness, run_id) == 1

    # The key names one intended write: a different request under it is refused, and creates nothing.
    reused = await c.error(CREATE, {"r": run_id, "t": "other title", "k": "write-1"})
    assert reused["extensions"]["code"] == "VALIDATION"
    assert "idempotency key reused with a different request" in reused["message"]
    other_mutation = await c.error(RENAME, {"r": run_id, "d": first["entityId"], "k": "write-1"})
    assert other_mutation["extensions"]["code"] == "VALIDATION"
    assert await _command_count(harness, run_id) == 1

    # Keys are per principal: another agent's "write-1" is its own.
    theirs = await c.start_run(key=OTHER_AGENT_KEY)
    body = await c.gql(CREATE, {"r": theirs, "t": "report", "k": "write-1"}, key=OTHER_AGENT_KEY)
    assert body["data"]["createDocument"]["commandId"] != first["commandId"]

    # A retry after the run finished still gets its answer (not RUN_CLOSED): it was taken.
    await c.data("mutation($r: ID!) { finishRun(runId: $r) { status } }", {"r": run_id})
    late = (await c.data(CREATE, {"r": run_id, "t": "report", "k": "write-1"}))["createDocument"]
    assert late == first
    # ... while a new key on a finished run is refused as ever.
    closed = await c.error(CREATE, {"r": run_id, "t": "report", "k": "write-2"})
    assert closed["extensions"]["code"] == "RUN_CLOSED"

    too_long = await c.error(CREATE, {"r": run_id, "t": "report", "k": "k" * 256})
    assert too_long["extensions"]["code"] == "VALIDATION" and "idempotencyKey" in too_long["message"]
    empty = await c.error(CREATE, {"r": run_id, "t": "report", "k": ""})
    assert empty["extensions"]["code"] == "VALIDATION"


async def test_concurrent_retries_of_one_write_make_one_command(harness: Harness) -> None:
    c = harness.client
    run_id = await c.start_run()
    # Sent at once, they land in one group commit or in several: either way one command.
    bodies = await asyncio.gather(*(c.data(CREATE, {"r": run_id, "t": "t", "k": "burst"}) for _ in range(12)))
    assert len({b["createDocument"]["commandId"] for b in bodies}) == 1
    assert await _command_count(harness, run_id) == 1
    # startRuns are one transaction each: on PostgreSQL the losers of the race on the key retry and find it.
    started = await asyncio.gather(*(c.data(START, {"e": "burst", "k": "burst-start"}) for _ in range(6)))
    assert len({b["startRun"]["id"] for b in started}) == 1
    listed = await c.data('{ runs(filter: {entryPoint: "burst"}) { nodes { id } } }', key=OPERATOR_KEY)
    assert len(listed["runs"]["nodes"]) == 1


async def test_a_retried_start_run_gets_the_same_run(harness: Harness) -> None:
    c = harness.client
    first = (await c.data(START, {"e": "support-bot", "k": "start-1"}))["startRun"]["id"]
    assert (await c.data(START, {"e": "support-bot", "k": "start-1"}))["startRun"]["id"] == first
    reused = await c.error(START, {"e": "elsewhere", "k": "start-1"})
    assert reused["extensions"]["code"] == "VALIDATION" and "reused" in reused["message"]
    # One key space per principal across operations: a startRun key is not a write's.
    crossed = await c.error(CREATE, {"r": first, "t": "t", "k": "start-1"})
    assert crossed["extensions"]["code"] == "VALIDATION"
    # A retry is answered even once the agent's run budget is spent: that run was started.
    await c.set_policy({"maxRunsPerHour": 1}, scope="AGENT", subject="agent-1")
    assert (await c.data(START, {"e": "support-bot", "k": "start-1"}))["startRun"]["id"] == first
    refused = await c.error(START, {"e": "support-bot", "k": "start-2"})
    assert refused["extensions"]["code"] == "AGENT_BUDGET_EXCEEDED"
    listed = await c.data('{ runs(filter: {agentId: "agent-1"}) { nodes { id } } }', key=OPERATOR_KEY)
    assert listed["runs"]["nodes"] == [{"id": first}]


async def test_keys_older_than_a_day_are_forgotten(harness: Harness) -> None:
    c = harness.client
    run_id = await c.start_run()
    first = (await c.data(CREATE, {"r": run_id, "t": "t", "k": "old"}))["createDocument"]
    async with harness.gateway.engine.begin() as conn:
        # Age the key by a day: what the clock would do.
        await conn.execute(idempotency_keys.update().values(created_at=utcnow() - _DAY))
    second = (await c.data(CREATE, {"r": run_id, "t": "t", "k": "old"}))["createDocument"]
    assert second["commandId"] != first["commandId"]
    assert await _command_count(harness, run_id) == 2
    # The housekeeper's pruning deletes what expired: the first use, and only it.
    assert await prune(harness.gateway.engine, utcnow()) == 0
    assert await prune(harness.gateway.engine, utcnow() + _DAY) == 1


@pytest.mark.postgres
async def test_a_write_committed_by_a_killed_gateway_is_answered_by_another(
    postgres: Any, kafka: Any, tmp_path: Path, examples_catalogue: str
) -> None:
    start_key, write_key = f"start-{uuid.uuid4()}", f"write-{uuid.uuid4()}"
    # Replica 0 dies right after committing the startRun keyed start_key, replica 1 after the write keyed
    # write_key (the test-only hook); replica 2 takes every retry.
    hooks = [
        {"KINSHASA_GATEWAY_TEST_KILL_AFTER_COMMIT_KEY": start_key},
        {"KINSHASA_GATEWAY_TEST_KILL_AFTER_COMMIT_KEY": write_key},
        {},
    ]
    async with gateway_replicas(
        postgres, kafka.bootstrap, tmp_path, examples_catalogue, PRINCIPALS, hooks
    ) as gw:
        doomed_start, doomed_write, survivor = gw.gateways
        async with httpx.AsyncClient(timeout=60) as client:
            policy = await post(
                client,
                survivor.url,
                OPERATOR_KEY,
                'mutation { setPolicy(scope: DEFAULT, reason: "publish at once", settings: '
                "{quarantineWindowS: 0}) { version } }",
            )
            assert not policy.get("errors"), policy

            # The first answer never comes: the gateway committed, then died.
            with pytest.raises(httpx.TransportError):
                await post(client, doomed_start.url, AGENT_KEY, START, {"e": "killed", "k": start_key})
            assert await asyncio.to_thread(doomed_start.process.wait, 30) == -signal.SIGKILL
            run_id = (await post(client, survivor.url, AGENT_KEY, START, {"e": "killed", "k": start_key}))[
                "data"
            ]["startRun"]["id"]

            variables = {"r": run_id, "t": "survives", "k": write_key}
            with pytest.raises(httpx.TransportError):
                await post(client, doomed_write.url, AGENT_KEY, CREATE, variables)
            assert await asyncio.to_thread(doomed_write.process.wait, 30) == -signal.SIGKILL
            retried = await post(client, survivor.url, AGENT_KEY, CREATE, variables)
            receipt = retried["data"]["createDocument"]
            assert receipt["runId"] == run_id and receipt["status"] == "PUBLISHED"

        engine = create_engine(gw.database_url)
        try:
            async with engine.connect() as conn:
                started = (await conn.execute(select(runs.c.run_id))).scalars().all()
                stored = (await conn.execute(select(commands.c.command_id))).scalars().all()
            assert started == [run_id]
            assert stored == [receipt["commandId"]]

            # The surviving relay publishes what the dead gateway committed: wait until the outbox
            # row of the command is marked published, then Kafka holds every message there will be.
            async def published() -> bool:
                async with engine.connect() as conn:
                    message_id = uuid.UUID(receipt["commandId"])
                    query = select(outbox.c.published_at).where(outbox.c.message_id == message_id)
                    return (await conn.execute(query)).scalar_one_or_none() is not None

            for _ in range(200):
                if await published():
                    break
                await asyncio.sleep(0.1)
            assert await published()
        finally:
            await engine.dispose()

    on_kafka = await TopicReader(kafka.bootstrap).envelopes([commands_topic("documents")], run_id)
    assert [str(e.message_id) for e in on_kafka] == [receipt["commandId"]]
    # One effect: the documents service applies what is on the topic (twice over, as a redelivery would).
    assert await _applied_versions(tmp_path, on_kafka * 2, receipt["entityId"]) == 1


async def _applied_versions(tmp: Path, envelopes: list[Envelope], document_id: str) -> int:
    async with dispatchers(f"sqlite+aiosqlite:///{tmp / 'documents.sqlite3'}") as make:
        dispatcher = await make(documents)
        for envelope in envelopes:
            await dispatcher.handle(envelope)
        async with dispatcher.engine.connect() as conn:
            query = (
                select(func.count())
                .select_from(document_versions)
                .where(document_versions.c.document_id == document_id)
            )
            return int((await conn.execute(query)).scalar_one())


async def test_pruning_keeps_its_statements_off_the_event_loop(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # A chunk's DELETE can run long; on SQLite a write transaction's later statements otherwise run on the
    # loop's thread (kinshasa/kernel/sqlite_driver.py), which would stall every request meanwhile.
    on_loop: list[object] = []
    at_once = sqlite_driver.OneHopConnection.call_at_once

    def counted(work: Any) -> Any:
        on_loop.append(work)
        return at_once(work)

    monkeypatch.setattr(sqlite_driver.OneHopConnection, "call_at_once", staticmethod(counted))
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'keys.sqlite3'}")
    try:
        async with engine.begin() as conn:
            await conn.run_sync(idempotency_keys.metadata.create_all)
        on_loop.clear()
        async with engine.begin() as conn:
            await conn.execute(idempotency_keys.insert(), [
                {"principal_id": "agent-1", "key": f"k{i}", "request_digest": "d", "answer": "{}",
                 "created_at": utcnow() - _DAY} for i in range(5)])
            await conn.execute(select(func.count()).select_from(idempotency_keys))
        assert len(on_loop) == 1  # the write's second statement ran on the loop: the count sees it
        on_loop.clear()
        assert await prune(engine, utcnow(), chunk=2) == 5
        assert on_loop == []
    finally:
        await engine.dispose()
