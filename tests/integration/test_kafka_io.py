"""Producer and consumer against the real broker: ordered delivery, offsets only after handling, lag."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from kinshasa.infra.kafka import KafkaBroker
from kinshasa.schemas.envelope import Actor, EntityRef, Envelope, new_id, utcnow
from kinshasa.topics import producer as producer_module
from kinshasa.topics.admin import ensure_topics
from kinshasa.topics.catalogue import TopicSpec
from kinshasa.topics.consumer import AsyncConsumer, Record
from kinshasa.topics.producer import AsyncProducer, Outgoing, PublishError, should_rebuild
from tests.integration.test_relay import read_topic

# Turns of a race between a refused message and its key's next one.
MAX_TURNS = 40
# Short polls keep stop latency low; the session timeout only matters if a member vanishes unclosed.
CONSUMER_OPTS = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


@pytest.fixture
def topic(kafka: KafkaBroker, unique: str) -> str:
    name = f"test.io.{unique}"
    ensure_topics(kafka.bootstrap, [TopicSpec(name, 3)])
    return name


@pytest.fixture
async def producer(kafka: KafkaBroker, unique: str) -> AsyncIterator[AsyncProducer]:
    p = AsyncProducer(kafka.bootstrap, client_id=f"test-{unique}")
    try:
        yield p
    finally:
        await p.close()


def consumer(kafka: KafkaBroker, group: str, topic: str, failure_backoff: float = 0.5) -> AsyncConsumer:
    return AsyncConsumer(kafka.bootstrap, group, [topic], extra_config=CONSUMER_OPTS,
                         poll_timeout=0.2, failure_backoff=failure_backoff)


async def run_until(c: AsyncConsumer, handler: Callable[[Record, asyncio.Event], Awaitable[None]],
                    limit: float = 30.0) -> None:
    """Run `c` with a handler that gets the stop event too; fail the test if it does not stop in time."""
    stop = asyncio.Event()

    async def wrapped(record: Record) -> None:
        await handler(record, stop)

    await asyncio.wait_for(c.run(wrapped, stop), limit)


async def handled_until_first(kafka: KafkaBroker, group: str, topic: str) -> list[Record]:
    """Run a consumer of `group` that stops at its first record; what its handler got (that one alone)."""
    got: list[Record] = []

    async def handle(record: Record, stop: asyncio.Event) -> None:
        got.append(record)
        stop.set()

    await run_until(consumer(kafka, group, topic), handle)
    return got


async def test_send_batch_then_consume_all_in_order_per_key(
    kafka: KafkaBroker, topic: str, producer: AsyncProducer, unique: str
) -> None:
    items = [Outgoing(topic, f"entity-{i % 10}".encode(), f"{i % 10}:{i // 10}".encode(),
                      {"seq": str(i)}) for i in range(200)]
    delivered = await producer.send_batch(items)
    assert len(delivered) == 200
    # One key, one partition, increasing offsets.
    by_key: dict[bytes | None, set[int]] = defaultdict(set)
    for item, where in zip(items, delivered, strict=True):
        by_key[item.key].add(where.partition)
    assert all(len(parts) == 1 for parts in by_key.values())

    seen: dict[bytes | None, list[int]] = defaultdict(list)
    count = 0

    async def handle(record: Record, stop: asyncio.Event) -> None:
        nonlocal count
        seen[record.key].append(int(record.value.split(b":")[1]))
        assert record.header("seq") is not None
        count += 1
        if count == 200:
            stop.set()

    await run_until(consumer(kafka, f"test.group.{unique}", topic), handle)
    assert count == 200
    assert len(seen) == 10
    assert all(seqs == list(range(20)) for seqs in seen.values())


async def test_producer_really_is_idempotent_acks_all(kafka: KafkaBroker, topic: str, unique: str) -> None:
    p = AsyncProducer(kafka.bootstrap, client_id=f"cfg-{unique}", extra_config={"linger.ms": 1})
    try:
        config = p.config
        assert config["enable.idempotence"] is True
        assert config["acks"] == "all"
        assert config["linger.ms"] == 1
        assert config["bootstrap.servers"] == kafka.bootstrap
        where = await p.send(topic, b"k", b"v")
        assert where.topic == topic and where.offset >= 0
    finally:
        await p.close()
    with pytest.raises(ValueError, match=r"enable\.idempotence"):
        AsyncProducer(kafka.bootstrap, client_id="weak", extra_config={"enable.idempotence": False})


async def test_full_local_queue_is_waited_out_not_dropped(
    kafka: KafkaBroker, topic: str, unique: str
) -> None:
    p = AsyncProducer(kafka.bootstrap, client_id=f"small-{unique}",
                      extra_config={"queue.buffering.max.messages": 5})
    try:
        delivered = await p.send_batch([Outgoing(topic, b"k", str(i).encode()) for i in range(100)])
    finally:
        await p.close()
    offsets = [d.offset for d in delivered]
    assert offsets == sorted(offsets) and len(set(offsets)) == 100


async def test_failed_crash_before_store_is_redelivered_to_the_next_member(
    kafka: KafkaBroker, topic: str, producer: AsyncProducer, unique: str
) -> None:
    group = f"test.group.{unique}"
    await producer.send(topic, b"doc-1", b"archive doc-1")
    attempts: list[Record] = []

    async def crash(record: Record, stop: asyncio.Event) -> None:
        attempts.append(record)
        stop.set()  # the process dies right after: the handler's transaction never committed
        raise RuntimeError("database went away before commit")

    await run_until(consumer(kafka, group, topic), crash)
    assert [r.value for r in attempts] == [b"archive doc-1"]

    received = await handled_until_first(kafka, group, topic)
    assert [(r.value, r.offset) for r in received] == [(b"archive doc-1", attempts[0].offset)]


async def test_cancelled_mid_handler_is_redelivered_to_the_next_member(
    kafka: KafkaBroker, topic: str, producer: AsyncProducer, unique: str
) -> None:
    group = f"test.group.{unique}"
    await producer.send(topic, b"doc-2", b"edit doc-2")
    entered = asyncio.Event()

    async def hang(record: Record, stop: asyncio.Event) -> None:
        entered.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(run_until(consumer(kafka, group, topic), hang))
    await asyncio.wait_for(entered.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    received = await handled_until_first(kafka, group, topic)
    assert [r.value for r in received] == [b"edit doc-2"]


async def test_handled_messages_are_not_seen_again_by_the_next_member(
    kafka: KafkaBroker, topic: str, producer: AsyncProducer, unique: str
) -> None:
    group = f"test.group.{unique}"
    await producer.send_batch([Outgoing(topic, f"k{i}".encode(), f"first-{i}".encode()) for i in range(3)])
    first: list[bytes] = []

    async def handle_first(record: Record, stop: asyncio.Event) -> None:
        first.append(record.value)
        if len(first) == 3:
            stop.set()

    await run_until(consumer(kafka, group, topic), handle_first)
    assert sorted(first) == [b"first-0", b"first-1", b"first-2"]

    await producer.send(topic, b"k0", b"marker")
    second: list[bytes] = []

    async def handle_second(record: Record, stop: asyncio.Event) -> None:
        second.append(record.value)
        if record.value == b"marker":
            stop.set()

    await run_until(consumer(kafka, group, topic), handle_second)
    assert second == [b"marker"]


async def test_handler_error_redelivers_the_same_message_in_the_same_run(
    kafka: KafkaBroker, topic: str, producer: AsyncProducer, unique: str
) -> None:
    await producer.send_batch([Outgoing(topic, b"same-key", f"m{i}".encode()) for i in range(3)])
    attempts: list[tuple[bytes, int]] = []
    handled: list[bytes] = []

    async def flaky(record: Record, stop: asyncio.Event) -> None:
        attempts.append((record.value, record.offset))
        if record.value == b"m1" and attempts.count((record.value, record.offset)) < 3:
            raise RuntimeError("transient failure")
        handled.append(record.value)
        if len(handled) == 3:
            stop.set()

    await run_until(consumer(kafka, f"test.group.{unique}", topic, failure_backoff=0.05), flaky)
    # m1 failed twice and came back each time before m2: nothing skipped, order kept.
    assert [value for value, _ in attempts] == [b"m0", b"m1", b"m1", b"m1", b"m2"]
    assert handled == [b"m0", b"m1", b"m2"]
    assert len({offset for value, offset in attempts if value == b"m1"}) == 1


async def test_lag_reports_the_backlog(kafka: KafkaBroker, unique: str, producer: AsyncProducer) -> None:
    topic = f"test.lag.{unique}"
    ensure_topics(kafka.bootstrap, [TopicSpec(topic, 1)])
    await producer.send_batch([Outgoing(topic, b"k", str(i).encode()) for i in range(10)])
    c = consumer(kafka, f"test.group.{unique}", topic)
    lags: list[dict[tuple[str, int], int]] = []
    handled = 0

    async def handle(record: Record, stop: asyncio.Event) -> None:
        nonlocal handled
        if record.offset == 0:
            assert c.assignment() == [(topic, 0)]
            lags.append(await c.lag())  # nothing committed yet: the whole log is backlog
        if record.offset == 4:
            await c.commit()  # offsets 0-3 are stored
            lags.append(await c.lag())
            stop.set()
        handled += 1

    await run_until(c, handle)
    assert lags == [{(topic, 0): 10}, {(topic, 0): 6}]
    assert c.assignment() == []
    with pytest.raises(RuntimeError, match="closed"):
        await c.lag()


async def test_lag_is_answered_while_the_consumer_thread_is_busy(
    kafka: KafkaBroker, unique: str, producer: AsyncProducer
) -> None:
    """`lag` asks through a client of its own: a consumer thread stuck in a long poll or a slow request
    does not hold the answer up, and the answer does not hold up consuming (it used to queue there)."""
    topic = f"test.lag.busy.{unique}"
    ensure_topics(kafka.bootstrap, [TopicSpec(topic, 3)])
    await producer.send_batch([Outgoing(topic, f"k{i}".encode(), str(i).encode()) for i in range(12)])
    c = consumer(kafka, f"test.group.{unique}", topic)
    answers: list[tuple[dict[tuple[str, int], int], bool]] = []

    async def handle(record: Record, stop: asyncio.Event) -> None:
        release = threading.Event()
        busy = c._executor.submit(release.wait, 60)  # the consumer's own thread, taken until released
        try:
            lag = await asyncio.wait_for(c.lag(), 30)
            answers.append((lag, busy.done()))
        finally:
            release.set()
        stop.set()

    await run_until(c, handle)
    [(lag, consumer_thread_was_free)] = answers
    assert not consumer_thread_was_free
    # Nothing committed yet on any of the three partitions: all twelve messages are backlog.
    assert set(lag) == {(topic, p) for p in range(3)}
    assert sum(lag.values()) == 12
    assert c._probe is not None
    with pytest.raises(RuntimeError, match="closed"):
        c._probe._client.assignment()  # closed with the consumer


async def test_lag_without_a_commit_counts_from_the_log_start(
    kafka: KafkaBroker, unique: str, producer: AsyncProducer
) -> None:
    topic = f"test.lag.start.{unique}"
    ensure_topics(kafka.bootstrap, [TopicSpec(topic, 1)])
    await producer.send_batch([Outgoing(topic, b"k", str(i).encode()) for i in range(10)])
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    for deleted in admin.delete_records([TopicPartition(topic, 0, 4)]).values():
        deleted.result(30)  # the log now starts at offset 4
    c = consumer(kafka, f"test.group.{unique}", topic)
    seen: list[tuple[int, dict[tuple[str, int], int]]] = []

    async def handle(record: Record, stop: asyncio.Event) -> None:
        seen.append((record.offset, await c.lag()))
        stop.set()

    await run_until(c, handle)
    assert seen == [(4, {(topic, 0): 6})]


async def test_envelope_round_trip(
    kafka: KafkaBroker, topic: str, producer: AsyncProducer, unique: str
) -> None:
    envelope = Envelope(
        message_id=new_id(), type="documents.archive", run_id=f"run-{unique}",
        actor=Actor(kind="agent", id="agent-1"),
        entity=EntityRef(service="documents", type="document", id="doc-9"),
        occurred_at=utcnow(), payload={"reason": "stale"},
    )
    await producer.send_envelope(topic, envelope)
    got = await handled_until_first(kafka, f"test.group.{unique}", topic)
    assert got[0].key == b"documents:doc-9"
    assert got[0].envelope() == envelope
    assert got[0].header("type") == b"documents.archive"
    assert got[0].header("message_id") == str(envelope.message_id).encode()


async def test_batch_failures_name_the_items(kafka: KafkaBroker, topic: str, unique: str) -> None:
    p = AsyncProducer(kafka.bootstrap, client_id=f"fail-{unique}",
                      extra_config={"topic.metadata.propagation.max.ms": 500, "message.timeout.ms": 5000})
    try:
        # Delivery fails for the missing topic only; the others are durable.
        with pytest.raises(PublishError) as failed:
            await p.send_batch([Outgoing(topic, b"a", b"ok"),
                                Outgoing(f"test.absent.{unique}", b"b", b"lost"),
                                Outgoing(topic, b"c", b"ok too")])
        assert [f.index for f in failed.value.failures] == [1]
        assert failed.value.delivered[0] is not None and failed.value.delivered[2] is not None
        assert failed.value.delivered[1] is None

        # A message librdkafka refuses outright stops the batch there, so no later message overtakes it.
        with pytest.raises(PublishError) as refused:
            await p.send_batch([Outgoing(topic, b"a", b"fine"), Outgoing(topic, b"a", b"x" * 2_000_000),
                                Outgoing(topic, b"a", b"after")])
        assert [f.index for f in refused.value.failures] == [1, 2]
        assert "not sent" in refused.value.failures[1].error
        assert refused.value.delivered[0] is not None
    finally:
        await p.close()


async def test_no_message_is_acknowledged_after_an_earlier_one_of_its_partition_was_refused(
        kafka: KafkaBroker, unique: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker refuses a message too large for its topic. The next message of its key, in the same
    batch, goes out in the same request or, the producer not lingering, in a later one: it must fail
    either way, and soon (not at `message.timeout.ms`), or its key would be seen out of order."""
    reported: list[KafkaError] = []  # what librdkafka's error callback was given
    monkeypatch.setattr(producer_module, "_on_error", reported.append)
    name = f"test.io.small.{unique}"
    ensure_topics(kafka.bootstrap, [TopicSpec(name, 1, configs={"max.message.bytes": "4096"})])
    producer = AsyncProducer(kafka.bootstrap, client_id=f"refused-{unique}",
                             extra_config={"message.timeout.ms": 20_000})
    apart = 0
    try:
        # Which request a message joins is a matter of timing: race until one did not share the refused
        # message's request.
        for turn in range(MAX_TURNS):
            # A warm producer (each refusal replaces it): the first message goes out as soon as produced.
            await producer.send(name, b"warm", b"warm")
            key = f"K{turn}".encode()
            started = time.monotonic()
            with pytest.raises(PublishError) as failed:
                await producer.send_batch([Outgoing(name, key, os.urandom(20_000)),  # lz4 cannot shrink it
                                           Outgoing(name, key, b"behind")])
            assert time.monotonic() - started < 10, "a failure waited for the message timeout"
            large, behind = failed.value.failures  # both failed: nothing of the key was acknowledged
            assert "TOO_LARGE" in large.error
            if "TOO_LARGE" not in behind.error:  # it did not share the refused request
                apart += 1
                break
        await producer.send(name, b"marker", b"marker")
    finally:
        await producer.close()
    assert apart, f"in {MAX_TURNS} turns the message behind always shared the refused request"
    values = [m.value for m in read_topic(kafka.bootstrap, name)]
    assert b"behind" not in values and values[-1] == b"marker"
    # Each refusal's fatal error was raised from a call, which replaced the producer; none came to the
    # error callback, which only logs.
    assert producer.rebuilds == turn + 1
    assert not [error for error in reported if should_rebuild(error)]


async def test_fatal_error_rebuilds_the_producer(kafka: KafkaBroker, topic: str, unique: str) -> None:
    p = AsyncProducer(kafka.bootstrap, client_id=f"fatal-{unique}")
    try:
        await p.send(topic, b"k", b"before")
        # What poll raises, and the poll thread notes, when an idempotent producer is fenced or loses
        # sequence.
        p._note_fatal(KafkaError(KafkaError._FATAL, "simulated fatal idempotence error", fatal=True),
                      p._producer)
        after = await p.send(topic, b"k", b"after")
        assert p.rebuilds == 1
        assert after.offset >= 0
        assert p.config["enable.idempotence"] is True
    finally:
        await p.close()


async def test_after_a_fatal_error_mid_batch_the_rest_of_the_batch_is_not_sent(
        kafka: KafkaBroker, topic: str, unique: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sent on the replacement, a later item could be acknowledged while an earlier one of its key, left
    in the failed instance, is not: the rest of the batch waits for the next send instead."""
    p = AsyncProducer(kafka.bootstrap, client_id=f"midway-{unique}")
    produce = p._produce

    async def failing_after_the_first(item: Outgoing, on_delivery: object, into: Producer | None) -> Producer:
        went_to = await produce(item, on_delivery, into)
        if into is None:  # what poll raises when the instance turns fatal while the batch is being produced
            p._note_fatal(KafkaError(KafkaError._FATAL, "simulated", fatal=True), went_to)
        return went_to

    monkeypatch.setattr(p, "_produce", failing_after_the_first)
    try:
        with pytest.raises(PublishError) as failed:
            await p.send_batch([Outgoing(topic, b"k", b"one"), Outgoing(topic, b"k", b"two"),
                                Outgoing(topic, b"k", b"three")])
        # The first item went to the failed instance (it may or may not be acknowledged); the others
        # were never handed to it, nor to a replacement.
        assert p.rebuilds == 0
        later = [f for f in failed.value.failures if f.index > 0]
        assert [f.index for f in later] == [1, 2] and all(f.error.startswith("not sent") for f in later)
        monkeypatch.undo()
        again = await p.send_batch([Outgoing(topic, b"k", b"two"), Outgoing(topic, b"k", b"three")])
        assert p.rebuilds == 1 and len(again) == 2
    finally:
        await p.close()


async def test_close_is_idempotent_and_final(kafka: KafkaBroker, topic: str, unique: str) -> None:
    p = AsyncProducer(kafka.bootstrap, client_id=f"close-{unique}")
    await p.send(topic, b"k", b"v")
    await p.close()
    await p.close()
    with pytest.raises(RuntimeError, match="closed"):
        await p.send(topic, b"k", b"v")
    c = consumer(kafka, f"test.group.{unique}", topic)
    await c.close()
    await c.close()


def _committed(bootstrap: str, group: str, topic: str, partitions: list[int]) -> dict[int, int]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    request = [ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in partitions])]
    result = admin.list_consumer_group_offsets(request)[group].result(timeout=10)
    return {tp.partition: tp.offset for tp in result.topic_partitions}


async def test_revoke_commits_handled_offsets_before_the_partition_moves(
    kafka: KafkaBroker, unique: str, producer: AsyncProducer
) -> None:
    topic, group = f"test.revoke.{unique}", f"test.group.{unique}"
    ensure_topics(kafka.bootstrap, [TopicSpec(topic, 2)])
    delivered = await producer.send_batch([Outgoing(topic, f"k{i}".encode(), b"x") for i in range(20)])
    ends = {p: max(d.offset for d in delivered if d.partition == p) + 1 for p in (0, 1)}
    # Auto-commit off (librdkafka's own commit-on-rebalance with it), so only our revoke hook can commit.
    lazy = {**CONSUMER_OPTS, "enable.auto.commit": False}
    first = AsyncConsumer(kafka.bootstrap, group, [topic], extra_config=lazy, poll_timeout=0.2)
    second = AsyncConsumer(kafka.bootstrap, group, [topic], extra_config=lazy, poll_timeout=0.2)
    handled_by_first: list[Record] = []
    handled_by_second: list[Record] = []
    done = asyncio.Event()
    stop_first, stop_second = asyncio.Event(), asyncio.Event()

    async def handle_first(record: Record) -> None:
        handled_by_first.append(record)
        if len(handled_by_first) == 20:
            done.set()

    async def handle_second(record: Record) -> None:
        handled_by_second.append(record)

    runs = [asyncio.create_task(first.run(handle_first, stop_first))]
    try:
        await asyncio.wait_for(done.wait(), 30)
        before = await asyncio.to_thread(_committed, kafka.bootstrap, group, topic, [0, 1])
        assert set(before.values()) == {-1001}  # nothing committed yet
        runs.append(asyncio.create_task(second.run(handle_second, stop_second)))
        for _ in range(200):
            moved = [p for t, p in second.assignment()]
            if moved:
                break
            await asyncio.sleep(0.1)
        assert moved, "the second member never got a partition"
        committed = await asyncio.to_thread(_committed, kafka.bootstrap, group, topic, moved)
        assert committed == {p: ends[p] for p in moved}
        # A marker on each moved partition (a key that went there before goes there again): once the
        # second member has handled them, it has read past everything before them, and handled only them.
        key_to = {d.partition: f"k{i}".encode() for i, d in enumerate(delivered)}
        markers = [Outgoing(topic, key_to[p], f"marker-{p}".encode()) for p in moved]
        await producer.send_batch(markers)
        for _ in range(300):
            if len(handled_by_second) >= len(markers):
                break
            await asyncio.sleep(0.1)
        assert sorted(r.value for r in handled_by_second) == sorted(m.value for m in markers)
    finally:
        stop_first.set()
        stop_second.set()
        await asyncio.wait_for(asyncio.gather(*runs), 30)
        await first.close()
        await second.close()


async def test_batches_go_to_the_batch_handler_and_a_refused_batch_record_by_record(
    kafka: KafkaBroker, unique: str, producer: AsyncProducer
) -> None:
    topic = f"test.batch.{unique}"
    ensure_topics(kafka.bootstrap, [TopicSpec(topic, 1)])
    await producer.send_batch([Outgoing(topic, b"k", f"m{i}".encode()) for i in range(40)])
    group = f"test.group.{unique}"
    batches: list[list[bytes]] = []
    singles: list[bytes] = []
    stop = asyncio.Event()

    async def whole(records: list[Record]) -> None:
        values = [r.value for r in records]
        batches.append(values)
        if b"m7" in values:
            raise RuntimeError("refused as a whole")  # committed nothing, by contract
        if b"m39" in values:
            stop.set()

    async def single(record: Record) -> None:
        singles.append(record.value)
        if record.value == b"m39":
            stop.set()

    c = AsyncConsumer(kafka.bootstrap, group, [topic], extra_config=CONSUMER_OPTS, poll_timeout=0.2,
                      batch_size=10)
    await asyncio.wait_for(c.run(single, stop, batch_handler=whole), 30)
    accepted = [v for batch in batches if b"m7" not in batch for v in batch]
    refused = next(batch for batch in batches if b"m7" in batch)
    # Each message was handled exactly once: in an accepted batch, or one by one after a refusal.
    assert sorted(accepted + singles, key=lambda v: int(v[1:])) == [f"m{i}".encode() for i in range(40)]
    assert singles[:len(refused)] == refused
    assert any(len(batch) > 1 for batch in batches)

    # Every offset was stored: the next member of the group starts after m39.
    await producer.send(topic, b"k", b"marker")
    after = await handled_until_first(kafka, group, topic)
    assert [r.value for r in after] == [b"marker"]
