"""Through real Kafka: each command delivered twice, then the topic replayed from 0, changes state once.

The documents service runs in-process (`ServiceRuntime`: consumer, inbox, DLQ guard, relay, HTTP) on
an isolated copy of its topics. The commands are published twice each, and after the service has
handled them its consumer group is rewound to offset 0 and the service restarted; domain state, the
outbox and the events on Kafka must be exactly what single delivery produced.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.infra.kafka import KafkaBroker
from kinshasa.kernel.inbox import inbox
from kinshasa.kernel.outbox import SqlOutboxStore, outbox
from kinshasa.kernel.receipts import ReceiptChain
from kinshasa.schemas.envelope import Envelope
from kinshasa.services import documents
from kinshasa.services.kit.runtime import ServiceRuntime, ServiceTopics
from kinshasa.topics.producer import AsyncProducer, envelope_message
from tests.integration.services.helpers import (
    Running,
    command,
    group_caught_up,
    make_runtime,
    new_entity_id,
    read_topic,
    rewind_group,
    wait_for,
)

TOKEN = "delivery-test-token"


def stream(n_docs: int = 12) -> list[Envelope]:
    """Creates, renames, edits, archives and some commands the invariants reject."""
    out: list[Envelope] = []
    for i in range(n_docs):
        doc = new_entity_id()
        out.append(command("documents", "create", {"title": f"doc {i}", "body": "v1"}, doc))
        out.append(command("documents", "rename", {"document_id": doc, "title": f"doc {i} v2"}, doc))
        out.append(command("documents", "edit", {"document_id": doc, "body": f"body {i}"}, doc))
        if i % 3 == 0:
            out.append(command("documents", "archive", {"document_id": doc}, doc))
            out.append(command("documents", "rename", {"document_id": doc, "title": "refused"}, doc))
    return out


def runtime(kafka: KafkaBroker, database_url: str, data_dir: Path, topics: ServiceTopics) -> ServiceRuntime:
    # Dynamic membership: a closed consumer leaves the group at once, so its offsets can be rewound.
    return make_runtime(documents.documents, kafka, database_url, data_dir, topics, token=TOKEN)


async def _count(engine: AsyncEngine, table: Any) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def _pending(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return (await SqlOutboxStore().backlog(conn)).pending


# An empty database: the service under test installs its own tables.
pytestmark = pytest.mark.schema()


async def test_duplicates_and_replay_from_zero_change_nothing(
    kafka: KafkaBroker, database_url: str, engine: AsyncEngine, tmp_path: Path, unique: str
) -> None:
    topics = ServiceTopics.for_service("documents", f"t{unique}")
    commands = stream()
    first = Running(runtime(kafka, database_url, tmp_path, topics))
    await first.started()
    async with AsyncProducer(kafka.bootstrap, client_id=f"test-{unique}") as producer:
        # Each command twice: once straight after itself, and again after the whole stream.
        doubled = [c for cmd in commands for c in (cmd, cmd)] + commands
        await producer.send_batch([envelope_message(topics.commands, c) for c in doubled])

    async def settled() -> bool:
        return await _count(engine, inbox) == len(commands) and await _pending(engine) == 0

    await wait_for(settled, 60, "every command handled and its event published")
    await wait_for(
        lambda: asyncio.to_thread(group_caught_up, kafka.bootstrap, topics.group, topics.commands),
        30,
        "offsets",
    )

    # One connection at a time: on SQLite every transaction, reads included, takes the write lock.
    async with engine.connect() as conn:
        state = await documents.domain_state(conn)
        report = await ReceiptChain("documents").verify(conn)
    versions = await _count(engine, documents.document_versions)
    assert report.ok and report.checked == len(commands)
    events = await asyncio.to_thread(read_topic, kafka.bootstrap, topics.events)
    ids = Counter(headers["message_id"] for _, _, headers in events)
    outcomes = Counter(headers["type"].decode().rsplit(".", 1)[1] for _, _, headers in events)
    assert len(ids) == len(commands) and set(ids.values()) == {1}
    rejected = sum(1 for c in commands if c.payload.get("title") == "refused")
    assert outcomes == {"applied": len(commands) - rejected, "rejected": rejected}
    assert versions == len(commands) - rejected

    async with httpx.AsyncClient(base_url=first.runtime.admin_url or "") as client:
        doc_id = commands[0].entity.id if commands[0].entity else ""
        body = (await client.get(f"/entities/document/{doc_id}")).json()
        assert body["status"] == "archived" and body["title"] == "doc 0 v2"
        metrics = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert "kinshasa_handler_latency_seconds" in metrics.text
    await first.shutdown()

    # Replay: the same group from offset 0, against the same database.
    await asyncio.to_thread(rewind_group, kafka.bootstrap, topics.group, topics.commands)
    assert not await asyncio.to_thread(group_caught_up, kafka.bootstrap, topics.group, topics.commands)
    second = Running(runtime(kafka, database_url, tmp_path, topics))
    await second.started()
    await wait_for(
        lambda: asyncio.to_thread(group_caught_up, kafka.bootstrap, topics.group, topics.commands),
        60,
        "the replay to finish",
    )
    await second.shutdown()

    async with engine.connect() as conn:
        assert await documents.domain_state(conn) == state
    assert await _count(engine, documents.document_versions) == versions
    assert await _count(engine, inbox) == len(commands)
    assert await _count(engine, outbox) == len(commands)
    replayed = await asyncio.to_thread(read_topic, kafka.bootstrap, topics.events)
    assert len(replayed) == len(events)
