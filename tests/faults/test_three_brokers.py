"""Fault 3: one node of a three-broker KRaft cluster (replication factor 3, min.insync.replicas 2, the
kernel producer's acks=all) SIGKILLed while a relay publishes from a SQLite outbox. Every row acknowledged
before or after the kill is on the topic, every row is published, per-key order holds, and the node comes
back into every partition's ISR when restarted."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.infra.kafka import KafkaCluster
from kinshasa.kernel.outbox import PUBLISHED, outbox
from kinshasa.kernel.relay import OutboxRelay
from kinshasa.topics.admin import describe_topics, ensure_topics
from kinshasa.topics.catalogue import TopicSpec
from kinshasa.topics.producer import AsyncProducer
from tests.faults.brokers import own_cluster
from tests.integration.test_relay import append_interleaved, read_topic, statuses

KEYS, PER_KEY, PARTITIONS = 50, 100, 6


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[KafkaCluster]:
    with own_cluster(tmp_path / "kafka") as own:
        yield own


async def _published(engine: AsyncEngine) -> set[bytes]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(outbox.c.value).where(outbox.c.status == PUBLISHED))
        return {bytes(value) for (value,) in rows}


def _partitions(admin: AdminClient, topic: str) -> dict[int, tuple[int, frozenset[int]]]:
    """Each partition's leader and in-sync replicas, as the cluster's metadata says now."""
    meta = admin.list_topics(topic, timeout=10)
    return {p.id: (p.leader, frozenset(p.isrs)) for p in meta.topics[topic].partitions.values()}


async def _until(what: str, check: Callable[[], Awaitable[bool]], deadline: float,
                 running: asyncio.Task[object]) -> None:
    """Poll `check` until it holds; fail if the relay dies or the deadline passes first."""
    while not await check():
        assert not running.done(), f"the relay stopped while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_a_node_of_three_killed_mid_publish_loses_no_acknowledged_row_and_keeps_key_order(
        cluster: KafkaCluster, store: AsyncEngine) -> None:
    topic = f"fault.cluster.{uuid.uuid4().hex[:8]}"
    report = await asyncio.to_thread(ensure_topics, cluster.bootstrap, [TopicSpec(topic, PARTITIONS)],
                                     replication_factor=3)
    assert report.created == [topic]
    # The cluster's own defaults, not the test's: min.insync.replicas 2 comes from the broker config.
    state = (await asyncio.to_thread(describe_topics, cluster.bootstrap, [topic]))[topic]
    assert (state.replication_factor, state.configs.get("min.insync.replicas")) == (3, "2")

    admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
    # The node to kill, chosen before the relay starts (no leader moves before the kill): asked once a
    # fifth of the rows was out, the metadata call could let the relay finish before the kill.
    leaders = Counter(leader for leader, _ in (await asyncio.to_thread(_partitions, admin, topic)).values())
    victim = leaders.most_common(1)[0][0]
    expected = await append_interleaved(store, topic, keys=KEYS, per_key=PER_KEY)
    total = KEYS * PER_KEY
    producer = AsyncProducer(cluster.bootstrap, client_id="fault-cluster-relay",
                             extra_config={"message.timeout.ms": 5000})
    relay = OutboxRelay(store, producer, batch_size=100, relay_id="fault-cluster-relay", max_attempts=3,
                        base_backoff_s=0.05, max_backoff_s=0.5)
    stop = asyncio.Event()
    running: asyncio.Task[object] = asyncio.create_task(relay.run(stop, idle_sleep_s=0.02))
    deadline = time.monotonic() + 180
    try:
        async def some_published() -> bool:
            return len(await _published(store)) >= total // 5

        await _until("the first fifth of the rows", some_published, deadline, running)
        cluster.kill(victim)
        # Every row marked PUBLISHED by now was acknowledged by the cluster before or as the node died.
        acknowledged_before_kill = await _published(store)
        assert len(acknowledged_before_kill) < total, "the relay finished before the kill: publish more rows"

        async def led_elsewhere() -> bool:
            partitions = await asyncio.to_thread(_partitions, admin, topic)
            return all(leader not in (victim, -1) and victim not in isr
                       for leader, isr in partitions.values())

        await _until(f"the partitions led by node {victim} to move", led_elsewhere, deadline, running)

        async def all_published() -> bool:
            return len(await _published(store)) == total

        await _until("every row to be published on two nodes", all_published, deadline, running)
    finally:
        stop.set()
        await asyncio.wait_for(running, 60)
        await producer.close(5)
    assert await statuses(store) == {PUBLISHED: total}  # none DEAD, none left pending

    # Read from the two survivors: nothing acknowledged lived only on the dead node.
    messages = await asyncio.to_thread(read_topic, cluster.bootstrap, topic, 60)
    on_topic = {m.value for m in messages}
    assert acknowledged_before_kill <= on_topic
    assert await _published(store) <= on_topic
    # Per key, in append order; a row sent again around the kill (its acknowledgement lost) is the same
    # message under the same key, which a consumer's inbox applies once.
    firsts: dict[bytes, list[bytes]] = defaultdict(list)
    seen: set[bytes] = set()
    for message in messages:
        assert message.key is not None
        if message.value not in seen:
            seen.add(message.value)
            firsts[message.key].append(message.value)
    assert dict(firsts) == expected

    # The killed node comes back on its own data and catches up into every partition's ISR.
    await asyncio.to_thread(cluster.restart, victim)
    rejoin_deadline = time.monotonic() + 60
    while not all(isr == {1, 2, 3} for _, isr in
                  (await asyncio.to_thread(_partitions, admin, topic)).values()):
        assert time.monotonic() < rejoin_deadline, f"node {victim} did not rejoin every ISR within 60 s"
        await asyncio.sleep(0.2)
