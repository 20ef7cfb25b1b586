"""The outbox relay against a real Kafka broker and real SQLite / PostgreSQL databases."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.infra.kafka import KafkaBroker
from kinshasa.infra.process import free_port
from kinshasa.kernel.dlq import DeadLetterQueue, OutboxDeadLetters, SqlDeadLetterStore
from kinshasa.kernel.outbox import (
    DEAD,
    PENDING,
    PUBLISHED,
    ClaimedRow,
    SqlOutboxStore,
    append,
    dead_rows,
    outbox,
)
from kinshasa.kernel.relay import OutboxRelay, RelayStats
from kinshasa.kernel.unit_of_work import UnitOfWork
from kinshasa.schemas.envelope import Actor, EntityRef, Envelope, utcnow
from kinshasa.topics.admin import ensure_topics
from kinshasa.topics.catalogue import TopicSpec
from kinshasa.topics.consumer import to_record
from kinshasa.topics.producer import AsyncProducer


@dataclass(frozen=True)
class Consumed:
    key: bytes | None
    value: bytes
    partition: int
    headers: dict[str, bytes]


def create_topic(bootstrap: str, name: str, partitions: int = 3) -> str:
    report = ensure_topics(bootstrap, [TopicSpec(name, partitions)])
    assert name in report.created
    return name


def read_topic(bootstrap: str, topic: str, timeout: float = 30.0) -> list[Consumed]:
    """Every message on `topic`, up to each partition's high watermark, partition by partition in order."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    try:
        meta = consumer.list_topics(topic, timeout=timeout)
        partitions = sorted(meta.topics[topic].partitions)
        highs = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1]
                 for p in partitions}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        remaining = {p: high for p, high in highs.items() if high > 0}
        out: list[Consumed] = []
        deadline = time.monotonic() + timeout
        while remaining and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=1000, timeout=0.5):
                if msg.error():
                    raise AssertionError(f"consume error: {msg.error()}")
                record = to_record(msg)
                out.append(Consumed(record.key, record.value, record.partition, dict(record.headers)))
                if record.offset + 1 >= remaining.get(record.partition, 0):
                    remaining.pop(record.partition, None)
        assert not remaining, f"did not reach the end of partitions {sorted(remaining)} of {topic}"
        return out
    finally:
        consumer.close()


def check_per_key_order(messages: list[Consumed], expected: dict[bytes, list[bytes]]) -> None:
    """Each key's messages arrive exactly once, on one partition, in the order they were appended."""
    seen: dict[bytes, list[bytes]] = defaultdict(list)
    partitions: dict[bytes, set[int]] = defaultdict(set)
    for m in messages:
        assert m.key is not None
        seen[m.key].append(m.value)
        partitions[m.key].add(m.partition)
    assert dict(seen) == expected
    assert all(len(p) == 1 for p in partitions.values())


@pytest.fixture
async def producer(kafka: KafkaBroker, unique: str) -> AsyncIterator[AsyncProducer]:
    producer = AsyncProducer(kafka.bootstrap, client_id=f"relay-test-{unique}",
                             extra_config={"message.timeout.ms": 5000})
    try:
        yield producer
    finally:
        await producer.close(5)


async def statuses(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(outbox.c.status, func.count()).group_by(outbox.c.status))
        return {status: int(n) for status, n in rows}


async def wait_until_nothing_pending(engine: AsyncEngine, seconds: float = 60.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if (await statuses(engine)).get(PENDING, 0) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"rows still pending after {seconds}s: {await statuses(engine)}")


async def drain(relay: OutboxRelay, max_cycles: int = 100) -> RelayStats:
    total = RelayStats()
    for _ in range(max_cycles):
        stats = await relay.run_once()
        total.add(stats)
        if stats.claimed == 0:
            return total
    raise AssertionError("the relay never ran out of work")


async def drain_while_pending(relay: OutboxRelay, engine: AsyncEngine, seconds: float = 30.0) -> None:
    """Run the relay until no row is pending (rows in backoff included), or fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while (await statuses(engine)).get(PENDING, 0):
        assert time.monotonic() < deadline, f"rows still pending after {seconds}s: {await statuses(engine)}"
        await drain(relay)
        await asyncio.sleep(0.1)


async def append_interleaved(engine: AsyncEngine, topic: str, keys: int, per_key: int,
                             prefix: str = "", start: int = 0) -> dict[bytes, list[bytes]]:
    """Rows for `keys` keys, interleaved (k0#0, k1#0, ..., k0#1, ...), in small transactions."""
    expected: dict[bytes, list[bytes]] = defaultdict(list)
    for i in range(start, start + per_key):
        async with engine.begin() as conn:
            for k in range(keys):
                key = f"documents:{prefix}{k}".encode()
                value = f"{prefix}{k}#{i:04d}".encode()
                await append(conn, topic, key, value, uuid.uuid4())
                expected[key].append(value)
    return dict(expected)


async def test_relay_publishes_every_row_once_in_per_key_order(
        kafka: KafkaBroker, unique: str, engine: AsyncEngine, producer: AsyncProducer) -> None:
    topic = create_topic(kafka.bootstrap, f"relay.order.{unique}")
    expected = await append_interleaved(engine, topic, keys=12, per_key=25)
    relay = OutboxRelay(engine, producer, batch_size=64, relay_id="relay-a")
    total = await drain(relay)
    assert (total.claimed, total.published, total.retrying, total.dead) == (300, 300, 0, 0)
    assert await statuses(engine) == {PUBLISHED: 300}
    check_per_key_order(read_topic(kafka.bootstrap, topic), expected)
    async with engine.connect() as conn:
        backlog = await SqlOutboxStore().backlog(conn)
    assert (backlog.pending, backlog.oldest_age_s) == (0, None)


async def test_unit_of_work_envelopes_arrive_as_sent(
        kafka: KafkaBroker, unique: str, engine: AsyncEngine, producer: AsyncProducer) -> None:
    topic = create_topic(kafka.bootstrap, f"relay.envelopes.{unique}", partitions=1)
    sent = []
    relay = OutboxRelay(engine, producer, relay_id="relay-uow")
    for title in ("a", "b", "c"):
        env = Envelope(message_id=uuid.uuid4(), type="documents.rename.applied", run_id="run-7",
                       actor=Actor(kind="service", id="documents"),
                       entity=EntityRef(service="documents", type="document", id="d42"),
                       occurred_at=utcnow(), payload={"new_title": title})
        async with UnitOfWork(engine, on_commit=relay.wake) as uow:
            uow.emit(topic, env)
            await uow.commit()
        sent.append(env)
    await drain(relay)
    got = read_topic(kafka.bootstrap, topic)
    assert [Envelope.from_bytes(m.value) for m in got] == sent
    assert all(m.key == b"documents:d42" for m in got)
    assert [m.headers["message_id"].decode() for m in got] == [str(e.message_id) for e in sent]


async def test_missing_topic_backs_off_then_dies_and_holds_its_key_until_requeued(
        kafka: KafkaBroker, unique: str, engine: AsyncEngine) -> None:
    good = create_topic(kafka.bootstrap, f"relay.good.{unique}", partitions=1)
    missing = f"relay.missing.{unique}"  # not created yet; the broker does not auto-create topics
    producer = missing_topic_producer(kafka.bootstrap, f"relay-missing-{unique}")
    poison, behind, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    async with engine.begin() as conn:
        await append(conn, missing, b"documents:K", b"poison", poison)
        await append(conn, good, b"documents:K", b"behind-poison", behind)
        await append(conn, good, b"documents:J", b"other-key", other)
    store = SqlOutboxStore()
    relay = OutboxRelay(engine, producer, max_attempts=3, base_backoff_s=0.05, max_backoff_s=0.2, jitter=0,
                        relay_id="relay-f")
    try:
        first = await relay.run_once()
        assert (first.claimed, first.published, first.retrying, first.dead) == (2, 1, 1, 0)
        async with engine.connect() as conn:
            row = await store.get(conn, poison)
            waiting = await store.get(conn, behind)
        assert row is not None and (row.status, row.attempts) == (PENDING, 1)
        assert row.last_error and "relay-f" == row.relay_id
        assert row.next_attempt_at > row.created_at
        assert waiting is not None and waiting.status == PENDING and waiting.attempts == 0

        dead_seen = 0
        deadline = time.monotonic() + 60
        while dead_seen == 0 and time.monotonic() < deadline:
            stats = await relay.run_once()
            dead_seen += stats.dead
            if stats.claimed == 0:
                await asyncio.sleep(0.05)
        async with engine.connect() as conn:
            dead = await dead_rows(conn)
        assert [(r.message_id, r.status, r.attempts) for r in dead] == [(poison, DEAD, 3)]
        assert "dlq_reprocess" in (dead[0].last_error or "") and missing in (dead[0].last_error or "")

        # The dead row holds its key: the row behind it stays pending however often the relay runs.
        for _ in range(3):
            assert (await relay.run_once()).claimed == 0
        assert await statuses(engine) == {DEAD: 1, PENDING: 1, PUBLISHED: 1}
        assert [m.value for m in read_topic(kafka.bootstrap, good)] == [b"other-key"]

        # The operator creates the topic and requeues: the dead row goes first, then the one behind it.
        create_topic(kafka.bootstrap, missing, partitions=1)
        # A fresh producer: the old one learns of a topic it saw missing only at its next metadata refresh.
        await producer.close(5)
        producer = AsyncProducer(kafka.bootstrap, client_id=f"relay-created-{unique}")
        relay.publisher = producer
        async with engine.begin() as conn:
            assert await store.requeue_dead(conn, [poison]) == 1
        await drain_while_pending(relay, engine)
        assert await statuses(engine) == {PUBLISHED: 3}
        assert [m.value for m in read_topic(kafka.bootstrap, missing)] == [b"poison"]
        assert [m.value for m in read_topic(kafka.bootstrap, good)] == [b"other-key", b"behind-poison"]
    finally:
        await producer.close(5)


async def test_an_unreachable_broker_never_kills_a_row_and_order_holds_once_it_is_back(
        kafka: KafkaBroker, unique: str, engine: AsyncEngine, producer: AsyncProducer) -> None:
    topic = create_topic(kafka.bootstrap, f"relay.down.{unique}", partitions=2)
    expected = await append_interleaved(engine, topic, keys=3, per_key=4)
    down = AsyncProducer(f"127.0.0.1:{free_port()}", client_id=f"relay-down-{unique}",
                         extra_config={"message.timeout.ms": 300, "reconnect.backoff.max.ms": 100})
    failures: list[tuple[str, int]] = []
    relay = OutboxRelay(engine, down, max_attempts=2, base_backoff_s=0.01, max_backoff_s=0.02, jitter=0,
                        on_publish_failure=lambda topic, n: failures.append((topic, n)))
    try:
        # Far more failed attempts than max_attempts allows for a failure of the row's own.
        attempts = 0
        while attempts < 5:
            stats = await relay.run_once()
            assert stats.dead == 0 and stats.published == 0
            if stats.retrying:
                attempts += 1
            else:
                await asyncio.sleep(0.02)
        async with engine.connect() as conn:
            rows = list(await conn.execute(select(outbox.c.status, outbox.c.attempts, outbox.c.last_error)))
        assert {status for status, _, _ in rows} == {PENDING}
        # Each key's head was attempted every time; the rows behind it waited.
        assert max(n for _, n, _ in rows) == 5
        assert all("timed out" in (error or "").lower() for _, n, error in rows if n), rows
        assert failures and {t for t, _ in failures} == {topic}
    finally:
        await down.close(1)
    # The broker is reachable again: every row goes out, once, in per-key order.
    relay.publisher = producer
    await drain(relay)
    assert await statuses(engine) == {PUBLISHED: 12}
    check_per_key_order(read_topic(kafka.bootstrap, topic), expected)


async def test_a_row_too_large_for_the_broker_dies_with_its_size_and_holds_its_key_while_others_flow(
        kafka: KafkaBroker, unique: str, engine: AsyncEngine, producer: AsyncProducer) -> None:
    topic = f"relay.large.{unique}"
    report = ensure_topics(kafka.bootstrap, [TopicSpec(topic, 1, configs={"max.message.bytes": "4096"})])
    assert topic in report.created
    large, behind, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    payload = os.urandom(20_000)  # random, so lz4 cannot shrink it under the topic's limit
    async with engine.begin() as conn:
        await append(conn, topic, b"documents:K", payload, large)
        await append(conn, topic, b"documents:K", b"behind-large", behind)
        await append(conn, topic, b"documents:J", b"other-key", other)
    relay = OutboxRelay(engine, producer, max_attempts=2, base_backoff_s=0.01, max_backoff_s=0.02, jitter=0)
    dead_seen = 0
    deadline = time.monotonic() + 60
    while dead_seen == 0 and time.monotonic() < deadline:
        dead_seen += (await relay.run_once()).dead
        await asyncio.sleep(0.02)
    async with engine.connect() as conn:
        [dead] = await dead_rows(conn)
    assert dead.message_id == large and dead.attempts == 2
    reason = dead.last_error or ""
    assert f"message of {len(payload) + len(b'documents:K')} bytes" in reason
    assert "MSG_SIZE_TOO_LARGE" in reason
    # Other keys flow; the key's later row waits behind the dead one.
    await drain(relay)
    assert [m.value for m in read_topic(kafka.bootstrap, topic)] == [b"other-key"]
    assert await statuses(engine) == {DEAD: 1, PENDING: 1, PUBLISHED: 1}

    # The operator raises the topic's limit and reprocesses it through the DLQ: it goes first.
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    change = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
        ConfigEntry("max.message.bytes", "1048588", incremental_operation=AlterConfigOpType.SET)])
    for future in admin.incremental_alter_configs([change]).values():
        future.result(30)
    queue = DeadLetterQueue("documents", SqlDeadLetterStore(engine), outbox=OutboxDeadLetters(engine))
    [outcome] = await queue.dlq_reprocess([str(large)])
    assert outcome.outcome == "requeued"
    await drain_while_pending(relay, engine)  # the broker may take a moment to apply the new limit
    assert await statuses(engine) == {PUBLISHED: 3}
    values = [m.value for m in read_topic(kafka.bootstrap, topic)]
    assert values == [b"other-key", payload, b"behind-large"]


async def test_run_pipelines_batches_while_rows_keep_arriving_and_stops_cleanly(
        kafka: KafkaBroker, unique: str, engine: AsyncEngine, producer: AsyncProducer) -> None:
    topic = create_topic(kafka.bootstrap, f"relay.run.{unique}")
    expected = await append_interleaved(engine, topic, keys=40, per_key=10)
    relay = OutboxRelay(engine, producer, batch_size=50, pipeline_depth=2, relay_id="relay-run")
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop, idle_sleep_s=0.02))
    await asyncio.sleep(0.01)
    # Drains on the same relay while run() has batches in flight (as a shutdown path does) must not
    # claim what those batches hold, nor rows of their keys.
    drains = asyncio.gather(*(relay.run_once() for _ in range(3)))
    late = await append_interleaved(engine, topic, keys=40, per_key=5, start=10)
    for key, values in late.items():
        expected[key] = expected[key] + values
    await drains
    await wait_until_nothing_pending(engine)
    stop.set()
    totals = await asyncio.wait_for(running, 30)
    assert totals.published == 600 and totals.retrying == totals.dead == 0
    assert await statuses(engine) == {PUBLISHED: 600}
    check_per_key_order(read_topic(kafka.bootstrap, topic), expected)


async def test_run_publishes_without_its_poll_what_commits_and_exclusions_left_behind(
        kafka: KafkaBroker, unique: str, engine: AsyncEngine, producer: AsyncProducer) -> None:
    """On SQLite the relay claims again only when it may find something: after a full batch, after a
    claim that left in-flight keys out, or when woken (on PostgreSQL after every batch). Either way,
    rows committed meanwhile and rows left out must go out with the poll an hour away."""
    topic = create_topic(kafka.bootstrap, f"relay.nopoll.{unique}")
    # 5 keys x 40 rows, batches of 30: every full batch holds all 5 keys, so the pipelined claim beside
    # it finds only rows of in-flight keys and takes nothing.
    expected = await append_interleaved(engine, topic, keys=5, per_key=40)
    relay = OutboxRelay(engine, producer, batch_size=30, pipeline_depth=2, relay_id="relay-nopoll")
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop, idle_sleep_s=3600))
    for start in range(40, 60, 4):
        # Committed while batches are in flight or the relay idles; the committer wakes it.
        late = await append_interleaved(engine, topic, keys=5, per_key=4, start=start)
        relay.wake()
        for key, values in late.items():
            expected[key] = expected[key] + values
        await asyncio.sleep(0.02)
    await wait_until_nothing_pending(engine, seconds=20)
    stop.set()
    totals = await asyncio.wait_for(running, 30)
    assert totals.published == 300 and totals.retrying == totals.dead == 0
    check_per_key_order(read_topic(kafka.bootstrap, topic), expected)


def missing_topic_producer(bootstrap: str, client_id: str) -> AsyncProducer:
    """A producer that learns quickly that a topic does not exist, so a publish to it fails fast."""
    return AsyncProducer(bootstrap, client_id=client_id,
                         extra_config={"message.timeout.ms": 3000, "topic.metadata.propagation.max.ms": 100})


async def append_behind_a_poison(engine: AsyncEngine, good: str, missing: str,
                                 per_key_after: int) -> tuple[uuid.UUID, dict[bytes, list[bytes]]]:
    """Key K's head for the `missing` topic, then rows of 4 other keys for `good`, with K's next row among
    them: in batches of 6 the first is the poison and 5 other rows (full, so the next is claimed while it
    publishes), and the second holds the row behind the poison. Returns the poison's id and what the
    other keys should deliver."""
    poison = uuid.uuid4()
    async with engine.begin() as conn:
        await append(conn, missing, b"documents:K", b"poison", poison)
    expected = await append_interleaved(engine, good, keys=4, per_key=2)
    async with engine.begin() as conn:
        await append(conn, good, b"documents:K", b"behind-poison", uuid.uuid4())
    later = await append_interleaved(engine, good, keys=4, per_key=per_key_after, start=2)
    return poison, {key: values + later[key] for key, values in expected.items()}


async def run_until(relay: OutboxRelay, engine: AsyncEngine, wanted: dict[str, int]) -> None:
    """Run the relay until the outbox's row counts by status are `wanted` (within 60 s), then stop it."""
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop, idle_sleep_s=0.02))
    try:
        deadline = time.monotonic() + 60
        while (await statuses(engine)) != wanted:
            assert time.monotonic() < deadline, await statuses(engine)
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)


class RecordingWaitsForAClaim(SqlOutboxStore):
    """The outbox, noting what every claim returned, except that the first recording of failed publishes
    waits (up to 10 s) until a claim that left `failed_key` out has returned. The relay leaves a key out
    only while a batch that failed to deliver it is settled and not yet recorded, so such a claim ran in
    the window in which the SQLite relay claims beside a batch whose outcome is not recorded yet; the
    wait holds that window open until one has. (A flag set when the recording starts would miss claims
    that began between the failure and the recording's first statement, which on a busy machine can be
    all of them: the batches claimed then fill the pipeline until the failure is recorded.)"""

    def __init__(self, failed_key: bytes) -> None:
        self.failed_key = failed_key
        self.claimed: list[list[bytes]] = []
        # For each claim that left `failed_key` out: the keys it left out, and those of the rows it returned.
        self.claimed_leaving_it_out: list[tuple[set[bytes], list[bytes | None]]] = []
        self.held = False
        self._left_out = asyncio.Event()

    async def claim(self, conn: Any, **kwargs: Any) -> list[ClaimedRow]:
        rows = await super().claim(conn, **kwargs)
        self.claimed.append([r.value for r in rows])
        if self.failed_key in kwargs["exclude_keys"]:
            self.claimed_leaving_it_out.append((set(kwargs["exclude_keys"]), [r.key for r in rows]))
            self._left_out.set()
        return rows

    async def record_failures(self, conn: Any, failures: Any, *, relay_id: str) -> None:
        if failures and not self.held:
            self.held = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._left_out.wait(), 10)
        await super().record_failures(conn, failures, relay_id=relay_id)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_run_claims_beside_publishing_and_recording_batches_but_never_past_a_key_that_failed(
        kafka: KafkaBroker, unique: str, engine: AsyncEngine) -> None:
    """On SQLite the relay claims the next batch while one waits for the broker, keys and all: that batch
    publishes after it, without the rows of a key it failed to deliver. Once the broker has answered, the
    next claim runs while the outcome is recorded and leaves out the keys that failed. Either way a
    failed key's later rows wait behind it (here until it is dead), never overtaking it."""
    good = create_topic(kafka.bootstrap, f"relay.settle.{unique}", partitions=1)
    missing = f"relay.settle.missing.{unique}"  # never created: every publish to it fails
    producer = missing_topic_producer(kafka.bootstrap, f"relay-settle-{unique}")
    _, expected = await append_behind_a_poison(engine, good, missing, per_key_after=10)
    store = RecordingWaitsForAClaim(b"documents:K")
    relay = OutboxRelay(engine, producer, batch_size=6, pipeline_depth=2, max_attempts=2,
                        base_backoff_s=0.05, max_backoff_s=0.1, jitter=0, store=store)
    try:
        await run_until(relay, engine, {DEAD: 1, PENDING: 1, PUBLISHED: 48})
    finally:
        await producer.close(5)
    # Both windows were open: the second batch held the row behind the poison (claimed while the poison
    # was publishing, then dropped from it), and a claim ran while the poison's failure waited to be
    # recorded, when the row behind it was pending and due.
    assert store.claimed[0][0] == b"poison" and len(store.claimed[0]) == 6
    assert b"behind-poison" in store.claimed[1]
    # The claims that ran while the poison's failure was not recorded yet left its key out and took none
    # of the keys they left out, but took other keys' rows.
    assert store.claimed_leaving_it_out
    for left_out, keys in store.claimed_leaving_it_out:
        assert not left_out & set(keys)
    assert any(keys for _, keys in store.claimed_leaving_it_out)
    got = read_topic(kafka.bootstrap, good)
    assert b"behind-poison" not in [m.value for m in got]
    check_per_key_order(got, expected)


class ClaimReturnsAfterTheFailureIsRecorded(SqlOutboxStore):
    """The outbox, except that a claim that read the row behind the poison returns only once the poison's
    failed attempt is committed (and its batch, moments later, gone from the relay): the claim read while
    the poison's batch still published, and returns after it was recorded and released."""

    def __init__(self, engine: AsyncEngine, poison: uuid.UUID) -> None:
        self.engine, self.poison = engine, poison
        self.held = False

    async def claim(self, conn: Any, **kwargs: Any) -> list[ClaimedRow]:
        rows = await super().claim(conn, **kwargs)
        if not self.held and any(r.value == b"behind-poison" for r in rows):
            self.held = True
            for _ in range(400):
                async with self.engine.connect() as other:
                    row = await self.get(other, self.poison)
                if row is not None and row.attempts >= 1:
                    break
                await asyncio.sleep(0.025)
            await asyncio.sleep(0.1)  # the batch's release follows its record's commit in the same task
        return rows


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_batch_claimed_while_an_earlier_one_published_goes_after_it_even_if_it_ended_meanwhile(
        kafka: KafkaBroker, unique: str, engine: AsyncEngine) -> None:
    """The batches a SQLite claim must go after are those in flight when its read began: one that failed a
    key and was recorded and released while the claim was still returning is still gone after, and its
    failed key's rows dropped."""
    good = create_topic(kafka.bootstrap, f"relay.ended.{unique}", partitions=1)
    missing = f"relay.ended.missing.{unique}"
    producer = missing_topic_producer(kafka.bootstrap, f"relay-ended-{unique}")
    poison, expected = await append_behind_a_poison(engine, good, missing, per_key_after=4)
    store = ClaimReturnsAfterTheFailureIsRecorded(engine, poison)
    relay = OutboxRelay(engine, producer, batch_size=6, pipeline_depth=2, max_attempts=2,
                        base_backoff_s=0.05, max_backoff_s=0.1, jitter=0, store=store)
    try:
        await run_until(relay, engine, {DEAD: 1, PENDING: 1, PUBLISHED: 24})
    finally:
        await producer.close(5)
    assert store.held
    got = read_topic(kafka.bootstrap, good)
    assert b"behind-poison" not in [m.value for m in got]
    check_per_key_order(got, expected)


class FirstMarkFails(SqlOutboxStore):
    """The outbox, except that the first attempt to mark rows published fails as a lost database would."""

    def __init__(self) -> None:
        self.failed = False
        self.marked: list[list[int]] = []

    async def mark_published(self, conn: Any, seqs: Any, *, now: Any, relay_id: str) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("the database went away")
        await super().mark_published(conn, seqs, now=now, relay_id=relay_id)
        self.marked.append(sorted(seqs))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_outcomes_are_recorded_in_claim_order_or_not_at_all(
        kafka: KafkaBroker, unique: str, engine: AsyncEngine, producer: AsyncProducer) -> None:
    """A SQLite batch published after an earlier one records its outcome only if the earlier one's was
    recorded: when that failed, the later rows stay pending too and go out again after the earlier ones,
    so the outbox never holds a published row of a key behind a pending one."""
    topic = create_topic(kafka.bootstrap, f"relay.order.rec.{unique}", partitions=1)
    expected = await append_interleaved(engine, topic, keys=3, per_key=8)
    store = FirstMarkFails()
    relay = OutboxRelay(engine, producer, batch_size=6, pipeline_depth=2, store=store)
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop, idle_sleep_s=0.02))
    try:
        await wait_until_nothing_pending(engine, seconds=30)
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
    assert store.failed and store.marked[0][0] == 1, store.marked
    assert sorted(seq for batch in store.marked for seq in batch) == list(range(1, 25))
    # Delivered at least once: the first batch (and any batch after it) went out again, in order.
    firsts: dict[bytes, list[bytes]] = defaultdict(list)
    for m in read_topic(kafka.bootstrap, topic):
        assert m.key is not None
        if m.value not in firsts[m.key]:
            firsts[m.key].append(m.value)
    assert dict(firsts) == expected


class CountingClaims(SqlOutboxStore):
    def __init__(self) -> None:
        self.claims: list[int] = []

    async def claim(self, conn: Any, **kwargs: Any) -> list[ClaimedRow]:
        rows = await super().claim(conn, **kwargs)
        self.claims.append(len(rows))
        return rows


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_run_claims_once_per_lone_write(
        kafka: KafkaBroker, unique: str, engine: AsyncEngine, producer: AsyncProducer) -> None:
    """At a trickle each committed write costs the SQLite relay one claim: a batch that settles or ends
    starts no claim of its own unless the claim before it was full or left keys out."""
    topic = create_topic(kafka.bootstrap, f"relay.trickle.{unique}")
    store = CountingClaims()
    relay = OutboxRelay(engine, producer, store=store)
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop, idle_sleep_s=3600))
    try:
        for i in range(10):
            async with engine.begin() as conn:
                await append(conn, topic, f"documents:{i % 3}".encode(), f"w{i}".encode(), uuid.uuid4())
            relay.wake()
            await wait_until_nothing_pending(engine, seconds=20)
            # Published means marked, not yet counted: wait for the batch to end.
            for _ in range(2000):
                if relay.totals.published > i:
                    break
                await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
    # One claim took each write; at most the start and a wake that came while a batch was in flight
    # (the relay's first claim may race the first write) found nothing. It was 30 claims for 10 writes.
    assert store.claims.count(1) == 10 and store.claims.count(0) <= 2, store.claims


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_two_relays_on_one_postgres_database_publish_each_row_once_in_order(
        database_url: str, kafka: KafkaBroker, unique: str, engine: AsyncEngine,
        producer: AsyncProducer) -> None:
    topic = create_topic(kafka.bootstrap, f"relay.pair.{unique}", partitions=4)
    expected = await append_interleaved(engine, topic, keys=150, per_key=8, prefix="a")
    second_producer = AsyncProducer(kafka.bootstrap, client_id=f"relay-b-{unique}")
    relays = [OutboxRelay(engine, producer, batch_size=40, relay_id="relay-1"),
              OutboxRelay(engine, second_producer, batch_size=40, relay_id="relay-2")]
    stop = asyncio.Event()
    runs = [asyncio.create_task(r.run(stop, idle_sleep_s=0.02)) for r in relays]
    try:
        # Keep appending while both relays run, so claims race with new rows of the same keys.
        late = await append_interleaved(engine, topic, keys=150, per_key=4, prefix="a", start=8)
        for key, values in late.items():
            expected[key] = expected[key] + values
        await wait_until_nothing_pending(engine)
    finally:
        stop.set()
        await asyncio.gather(*runs)
        await second_producer.close(5)
    total = sum(len(v) for v in expected.values())
    assert await statuses(engine) == {PUBLISHED: total}
    check_per_key_order(read_topic(kafka.bootstrap, topic), expected)
    async with engine.connect() as conn:
        by_relay: dict[str | None, int] = dict((await conn.execute(
            select(outbox.c.relay_id, func.count()).group_by(outbox.c.relay_id))).all())
    assert set(by_relay) == {"relay-1", "relay-2"}, by_relay
    assert sum(r.totals.published for r in relays) == total
