"""Fault 1: the broker SIGKILLed and restarted while a relay publishes 10,000 rows over 50 keys. Every row
reaches Kafka, per-key order holds, and a row sent twice around the crash carries one message id (the
consumer's inbox applies it once); no row goes DEAD for the outage."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections import defaultdict

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.infra.kafka import KafkaBroker
from kinshasa.kernel.outbox import PENDING, PUBLISHED, outbox
from kinshasa.kernel.relay import OutboxRelay
from kinshasa.topics.producer import AsyncProducer
from tests.faults.brokers import broker_pid
from tests.integration.test_relay import append_interleaved, create_topic, read_topic, statuses

KEYS, PER_KEY = 50, 200


async def _published(engine: AsyncEngine) -> int:
    return (await statuses(engine)).get(PUBLISHED, 0)


async def _tried_while_down(engine: AsyncEngine) -> int:
    """Rows still pending that have failed an attempt: the relay met the outage."""
    async with engine.connect() as conn:
        return int((await conn.execute(
            select(func.count()).where(outbox.c.status == PENDING, outbox.c.attempts > 0))).scalar_one())


async def test_a_broker_killed_mid_publish_loses_and_reorders_nothing(
        broker: KafkaBroker, store: AsyncEngine) -> None:
    topic = create_topic(broker.bootstrap, f"fault.broker.{uuid.uuid4().hex[:8]}", partitions=6)
    expected = await append_interleaved(store, topic, keys=KEYS, per_key=PER_KEY)
    producer = AsyncProducer(broker.bootstrap, client_id="fault-relay",
                             extra_config={"message.timeout.ms": 3000})
    relay = OutboxRelay(store, producer, batch_size=200, relay_id="fault-relay", max_attempts=3,
                        base_backoff_s=0.05, max_backoff_s=0.5)
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop, idle_sleep_s=0.02))
    try:
        deadline = time.monotonic() + 120
        while await _published(store) < 1000:
            assert time.monotonic() < deadline and not running.done(), await statuses(store)
            await asyncio.sleep(0.01)
        os.kill(broker_pid(broker), signal.SIGKILL)
        killed_at = await _published(store)
        # The relay meets the outage (a positive signal that it tried while the broker was down).
        while not await _tried_while_down(store):
            assert time.monotonic() < deadline and not running.done()
            await asyncio.sleep(0.05)
        await asyncio.to_thread(broker.start, True)
        while await _published(store) < KEYS * PER_KEY:
            assert time.monotonic() < deadline + 120 and not running.done(), await statuses(store)
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(running, 60)
        await producer.close(5)
    assert killed_at < KEYS * PER_KEY
    assert await statuses(store) == {PUBLISHED: KEYS * PER_KEY}  # none DEAD, none left behind

    # Each key's rows in order, once each; a row sent again around the crash (its acknowledgement lost)
    # is the same message under the same key, which a consumer's inbox applies once.
    firsts: dict[bytes, list[bytes]] = defaultdict(list)
    keys: dict[bytes, bytes] = {}
    for message in read_topic(broker.bootstrap, topic, timeout=60):
        assert message.key is not None
        if message.value in keys:
            assert keys[message.value] == message.key
            continue
        keys[message.value] = message.key
        firsts[message.key].append(message.value)
    assert dict(firsts) == expected
