"""The DLQ on a real broker and databases: poison messages leave the partition and are reprocessed once."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, MetaData, String, Table, event, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.infra.kafka import KafkaBroker
from kinshasa.kernel.dlq import (
    DeadLetter,
    DeadLetterPolicy,
    DeadLetterQueue,
    DeadOutboxMessage,
    OutboxDeadLetters,
    SqlDeadLetterStore,
    dead_letters,
    guarded_handler,
)
from kinshasa.kernel.metrics import DLQ_RECORDED, HANDLER_LATENCY, ComponentMetrics
from kinshasa.kernel.outbox import FailedAttempt, SqlOutboxStore, outbox
from kinshasa.schemas.envelope import Actor, EntityRef, Envelope, utcnow
from kinshasa.topics.admin import ensure_topics
from kinshasa.topics.catalogue import TopicSpec, dlq_topic, group_id
from kinshasa.topics.consumer import AsyncConsumer, Record
from kinshasa.topics.producer import AsyncProducer, Outgoing, envelope_message
from tests.databases import prepared_engine

# The handler's own effect table: its primary key on message_id is the inbox that makes a second
# delivery of one message a no-op.
test_metadata = MetaData()
effects = Table("dlq_test_effects", test_metadata, Column("message_id", String(64), primary_key=True),
                Column("type", String(200), nullable=False))


SCHEMA = (dead_letters, outbox, test_metadata)
pytestmark = pytest.mark.schema(*SCHEMA)


class DocumentsHandler:
    """A handler with a real effect and an inbox; `broken` makes `documents.explode` fail every time."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.broken = True
        self.calls: dict[str, int] = {}

    async def __call__(self, record: Record) -> None:
        envelope = record.envelope()  # raises InvalidMessage for a message that does not parse
        mid = str(envelope.message_id)
        self.calls[mid] = self.calls.get(mid, 0) + 1
        if envelope.type == "documents.explode" and self.broken:
            raise RuntimeError("documents store refused the write: disk quota exceeded")
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(effects).values(message_id=mid, type=envelope.type))
        except IntegrityError:
            return  # already applied: the inbox absorbs the redelivery

    async def applied(self, message_id: uuid.UUID) -> int:
        async with self.engine.connect() as conn:
            return int(await conn.scalar(select(func.count()).select_from(effects)
                                         .where(effects.c.message_id == str(message_id))) or 0)


def _envelope(kind: str) -> Envelope:
    return Envelope(message_id=uuid.uuid4(), type=kind, run_id="run-1",
                    actor=Actor(kind="agent", id="agent-1"),
                    entity=EntityRef(service="documents", type="document", id="doc-1"),
                    occurred_at=utcnow(), payload={"note": kind})


async def _wait_for(predicate: Callable[[], Awaitable[bool]], within_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not reached within {within_s}s")
        await asyncio.sleep(0.2)


async def test_poison_messages_go_to_the_dlq_and_are_reprocessed_once(
        engine: AsyncEngine, kafka: KafkaBroker, unique: str) -> None:
    service = f"t{unique}"
    topic = f"kinshasa.commands.{service}"
    group = group_id(service)
    dlq = dlq_topic(group)
    await asyncio.to_thread(ensure_topics, kafka.bootstrap, [TopicSpec(topic, 1), TopicSpec(dlq, 1)])

    store = SqlDeadLetterStore(engine)
    handler = DocumentsHandler(engine)
    metrics = ComponentMetrics("documents")
    first, poison, last = (_envelope("documents.rename"), _envelope("documents.explode"),
                           _envelope("documents.archive"))
    async with AsyncProducer(kafka.bootstrap, client_id=f"test-{unique}") as producer:
        # All four on one key, so one partition: the poison and the garbage sit between good messages.
        sent = await producer.send_batch([
            envelope_message(topic, first),
            envelope_message(topic, poison),
            Outgoing(topic, first.kafka_key(), b"{not json at all", [("type", "documents.rename")]),
            envelope_message(topic, last),
        ])
        assert {d.partition for d in sent} == {0}
        garbage_offset = sent[2].offset

        guarded = guarded_handler(handler, store=store, producer=producer, group=group, max_attempts=3,
                                  backoff=0.01, metrics=metrics)
        stop = asyncio.Event()
        consumer = AsyncConsumer(kafka.bootstrap, group, [topic])
        run = asyncio.create_task(consumer.run(guarded, stop))
        try:
            async def last_applied() -> bool:
                return await handler.applied(last.message_id) == 1
            await _wait_for(last_applied)
        finally:
            stop.set()
            await run

    # The partition moved on: the messages around the poison ones were applied.
    assert await handler.applied(first.message_id) == 1
    assert await handler.applied(poison.message_id) == 0

    # Both poison messages are stored with payload, error and attempt count.
    assert await store.count() == 2
    entries = {e.message_id: e for e in await store.inspect(10)}
    failing = entries[str(poison.message_id)]
    assert failing.reason == "handler_failed" and failing.attempts == 3
    assert "disk quota exceeded" in failing.error and "RuntimeError" in failing.error
    assert failing.value == poison.to_bytes() and failing.key == b"documents:doc-1"
    assert (failing.topic, failing.partition, failing.offset) == (topic, 0, sent[1].offset)
    assert handler.calls[str(poison.message_id)] == 3
    garbage = entries[f"{topic}:0:{garbage_offset}"]
    assert garbage.reason == "invalid" and garbage.attempts == 1
    assert "InvalidMessage" in garbage.error and "malformed JSON" in garbage.error
    assert garbage.value == b"{not json at all"
    assert metrics.registry.get_sample_value(
        DLQ_RECORDED, {"component": "documents", "group": group, "reason": "invalid"}) == 1

    # The same two messages are on the group's .dlq topic, with the error in headers.
    seen: list[Record] = []
    reader_stop = asyncio.Event()

    async def collect(record: Record) -> None:
        seen.append(record)
        if len(seen) >= 2:
            reader_stop.set()

    reader = AsyncConsumer(kafka.bootstrap, group_id(service, "reader"), [dlq])
    await asyncio.wait_for(reader.run(collect, reader_stop), 60)
    assert [r.value for r in seen] == [poison.to_bytes(), b"{not json at all"]
    assert seen[0].key == b"documents:doc-1"
    assert b"disk quota exceeded" in (seen[0].header("kinshasa.dlq.error") or b"")
    assert seen[0].header("kinshasa.dlq.attempts") == b"3"
    assert seen[0].header("kinshasa.dlq.source_offset") == str(sent[1].offset).encode()
    assert seen[0].header("message_id") == str(poison.message_id).encode()
    assert seen[1].header("kinshasa.dlq.reason") == b"invalid"

    # The cause is fixed; reprocessing applies the message once, however often it is asked.
    handler.broken = False
    queue = DeadLetterQueue("documents", store, handlers={group: handler}, metrics=metrics)
    assert await queue.dlq_count() == 2
    [outcome] = await queue.dlq_reprocess([str(poison.message_id)])
    assert outcome.outcome == "reprocessed", outcome
    assert await handler.applied(poison.message_id) == 1
    [again] = await queue.dlq_reprocess([str(poison.message_id)])
    assert again.outcome == "already_reprocessed"
    # Even a stray redelivery of the original record changes nothing: the handler's inbox absorbs it.
    await handler(failing.as_record())
    assert await handler.applied(poison.message_id) == 1

    # The unparseable one still fails: it stays open, with one more attempt counted.
    [bad] = await queue.dlq_reprocess([f"{topic}:0:{garbage_offset}"])
    assert bad.outcome == "failed" and "malformed JSON" in (bad.error or "")
    assert await queue.dlq_count() == 1
    [still] = await queue.dlq_inspect(10)
    assert isinstance(still, DeadLetter) and still.attempts == 2 and still.status == "open"
    [missing] = await queue.dlq_reprocess(["no-such-message"])
    assert missing.outcome == "not_found" and "dlq_inspect" in (missing.error or "")


async def test_recording_the_same_source_twice_keeps_one_row(engine: AsyncEngine) -> None:
    store = SqlDeadLetterStore(engine)
    record = Record(topic="kinshasa.commands.documents", partition=2, offset=41, key=b"documents:d",
                    value=b"\xff\xfe binary", headers=(("type", b"documents.archive"), ("raw", b"\x00\x01")))
    first = await store.record(group="kinshasa.svc.documents", record=record, message_id="m-1",
                               error="RuntimeError: one", attempts=3, reason="handler_failed")
    second = await store.record(group="kinshasa.svc.documents", record=record, message_id="m-1",
                                error="RuntimeError: two", attempts=3, reason="handler_failed")
    assert second.id == first.id and second.attempts == 6 and second.error == "RuntimeError: two"
    assert second.last_failed_at >= first.last_failed_at
    assert await store.count() == 1
    # A different group consuming the same record has its own row.
    await store.record(group="kinshasa.coordinator", record=record, message_id="m-1",
                       error="x", attempts=1, reason="invalid")
    assert await store.count() == 2
    row = (await store.find(["m-1"]))[0]
    assert row.as_record() == Record(topic=record.topic, partition=2, offset=41, key=b"documents:d",
                                     value=b"\xff\xfe binary", headers=record.headers)
    view = row.to_json()
    assert view["value"] == {"base64": "//4gYmluYXJ5"} and view["headers"][0] == ["type", "documents.archive"]
    assert await store.mark_discarded([row.id]) == 1
    assert await store.count() == 1 and await store.count("discarded") == 1


async def test_dead_outbox_rows_are_listed_and_requeued(engine: AsyncEngine) -> None:
    outbox_store = SqlOutboxStore()
    envelope = _envelope("documents.archive.applied")
    async with engine.begin() as conn:
        await outbox_store.append(conn, "kinshasa.events.documents", envelope.kafka_key(),
                                  envelope.to_bytes(), envelope.message_id, [("type", envelope.type)])
        row = await outbox_store.get(conn, envelope.message_id)
        assert row is not None
        await outbox_store.record_failures(conn, [FailedAttempt(
            seq=row.seq, attempts=8, next_attempt_at=utcnow() + timedelta(seconds=1),
            error="KafkaError: topic authorization failed", dead=True)], relay_id="test")

    queue = DeadLetterQueue("documents", SqlDeadLetterStore(engine), outbox=OutboxDeadLetters(engine))
    assert await queue.dlq_count() == 1
    [entry] = await queue.dlq_inspect(10)
    assert isinstance(entry, DeadOutboxMessage)
    view = entry.to_json()
    assert view["kind"] == "outbox" and view["attempts"] == 8 and "authorization" in view["error"]
    [outcome] = await queue.dlq_reprocess([str(envelope.message_id)])
    assert outcome.outcome == "requeued"
    async with engine.connect() as conn:
        requeued = await outbox_store.get(conn, envelope.message_id)
    assert requeued is not None and requeued.status == "pending"
    assert await queue.dlq_count() == 0
    [again] = await queue.dlq_reprocess([str(envelope.message_id)])
    assert again.outcome == "already_reprocessed"


async def test_a_locked_sqlite_database_makes_messages_wait_in_order_never_dead_lettered(
        kafka: KafkaBroker, unique: str, tmp_path: Path) -> None:
    path = tmp_path / "locked.sqlite3"
    engine = await prepared_engine(f"sqlite+aiosqlite:///{path}", *SCHEMA)

    @event.listens_for(engine.sync_engine, "connect")
    def _short_busy_timeout(dbapi_connection: Any, _record: Any) -> None:
        # After create_engine's own pragmas: a write gives up after 100 ms instead of 30 s.
        dbapi_connection.execute("PRAGMA busy_timeout=100")

    await engine.dispose()  # connections made before the listener keep the long timeout
    service = f"t{unique}"
    topic = f"kinshasa.commands.{service}"
    group = group_id(service)
    await asyncio.to_thread(ensure_topics, kafka.bootstrap, [TopicSpec(topic, 1),
                                                             TopicSpec(dlq_topic(group), 1)])
    store = SqlDeadLetterStore(engine)
    metrics = ComponentMetrics("documents")
    handler = DocumentsHandler(engine)
    applied: list[str] = []

    async def service_handler(record: Record) -> None:
        await handler(record)
        applied.append(str(record.envelope().message_id))

    first, second = _envelope("documents.rename"), _envelope("documents.archive")
    # Another process holds the write lock: every write of the handler fails with "database is locked".
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    locked = True
    try:
        async with AsyncProducer(kafka.bootstrap, client_id=f"test-{unique}") as producer:
            await producer.send_batch([envelope_message(topic, first), envelope_message(topic, second)])
            # Poison retries would dead-letter after 3 attempts (about 0.03 s); a short hand-back makes the
            # consumer poll and redeliver during the wait too.
            policy = DeadLetterPolicy(max_attempts=3, backoff_s=0.01, unavailable_max_backoff_s=0.2,
                                      hand_back_s=0.5)
            guarded = guarded_handler(service_handler, store=store, producer=producer, group=group,
                                      backoff=policy, metrics=metrics)
            stop = asyncio.Event()
            consumer = AsyncConsumer(kafka.bootstrap, group, [topic])
            run = asyncio.create_task(consumer.run(guarded, stop))
            try:
                # Far past what the poison rule allows, and across several hand-backs to the consumer.
                async def retried_many_times() -> bool:
                    return handler.calls.get(str(first.message_id), 0) >= 10
                await _wait_for(retried_many_times)
                assert applied == [] and str(second.message_id) not in handler.calls
                holder.execute("ROLLBACK")
                locked = False

                async def second_applied() -> bool:
                    return await handler.applied(second.message_id) == 1
                await _wait_for(second_applied)
            finally:
                stop.set()
                await run
        # Applied once each, in order; the later message of the key never overtook the waiting one.
        assert applied == [str(first.message_id), str(second.message_id)]
        assert await handler.applied(first.message_id) == 1
        assert await store.count() == 0 and await store.count("reprocessed") == 0
        retried = metrics.registry.get_sample_value(
            f"{HANDLER_LATENCY}_count",
            {"component": "documents", "operation": "documents.rename", "outcome": "retrying"})
        # Every call but the last met the lock, and each was counted as a retry, not an error.
        assert retried == handler.calls[str(first.message_id)] - 1 >= 9
    finally:
        if locked:
            holder.execute("ROLLBACK")
        holder.close()
        await engine.dispose()
