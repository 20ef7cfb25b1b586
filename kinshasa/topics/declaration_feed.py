"""Service declarations on `kinshasa.catalogue`: a service publishes its own, the gateway follows them all.

The topic is compacted and keyed by service name, with one partition, so a reader that starts from the
beginning sees every service's newest declaration (and, until compaction, the older ones) in the order
they were published. Readers use an assigned consumer without a group: every gateway replica reads the
whole topic, and nothing is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition

from kinshasa.schemas.declaration import ServiceDeclaration
from kinshasa.topics.catalogue import CATALOGUE
from kinshasa.topics.discovery import client_config
from kinshasa.topics.producer import AsyncProducer

log = logging.getLogger(__name__)

# A consume() waits out its whole timeout unless it fills its batch, so the wait sets how late a follower
# hears a new record and how long a stop takes: 0.2 s, against about 5 wake-ups a second when idle.
POLL_S = 0.2
# Reading the records present at start, a short wait: the catalogue is a handful of records that never fill
# a batch, and three full waits (0.5 s each before this) held every gateway start for 1.5 s. For at most
# CATCH_UP_S, so a follower of a topic that never reports its end does not spin for ever.
CATCH_UP_POLL_S = 0.02
CATCH_UP_S = 30.0
# The topic's bounds are asked for before reading: the follower then starts at the first offset the topic
# holds and is caught up once it handled the last one present. Measured on a local broker, a consumer
# assigned at OFFSET_BEGINNING got its first record 0.5 s later than one assigned at an explicit offset,
# and the end was only known from an empty fetch, which the broker holds for `fetch.wait.max.ms` (0.5 s):
# about 1 s of every gateway start, against about 0.05 s. Bounds that cannot be read within this long (no
# broker, no topic yet) leave the follower to the old way: from the beginning, caught up at its end.
BOUNDS_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class PublishedDeclaration:
    """One record of the catalogue topic: the key (service name) and the raw JSON value, with its offset."""

    offset: int
    key: str
    value: bytes


async def publish_declaration(producer: AsyncProducer, declaration: ServiceDeclaration,
                              topic: str = CATALOGUE) -> None:
    """Publish (acks=all) and wait for the broker: once this returns, every reader will see it."""
    await producer.send(topic, declaration.service.encode(), declaration.to_json())
    log.info("published declaration of %s version %d (%s) on %s", declaration.service, declaration.version,
             declaration.digest, topic)


def _consumer(bootstrap: str) -> Consumer:
    return Consumer({
        **client_config(bootstrap),
        # A group id is required by the client even though nothing joins or commits.
        "group.id": f"kinshasa.catalogue-reader.{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": True,
    })


class DeclarationFollower:
    """Reads the catalogue topic from the beginning, then follows it; each record goes to `on_record`."""

    def __init__(self, bootstrap: str, on_record: Callable[[PublishedDeclaration], Awaitable[Any]],
                 topic: str = CATALOGUE) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.on_record = on_record
        self.caught_up = asyncio.Event()
        self._consumer: Consumer | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`: `caught_up` is set once every record present at start was handled."""
        opening = asyncio.ensure_future(asyncio.to_thread(self._open))
        try:
            consumer, start, end = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # Stopped while the thread opens the client: it opens it all the same, so close it.
            with contextlib.suppress(Exception):
                await asyncio.to_thread((await opening)[0].close)
            raise
        if end is not None and end <= start:
            self.caught_up.set()  # nothing was there to read
        catch_up_until = time.monotonic() + CATCH_UP_S
        polling: asyncio.Future[list[Message]] | None = None
        try:
            while not stop.is_set():
                catching_up = not self.caught_up.is_set() and time.monotonic() < catch_up_until
                wait_s = CATCH_UP_POLL_S if catching_up else POLL_S
                polling = asyncio.ensure_future(asyncio.to_thread(consumer.consume, 100, wait_s))
                batch = await asyncio.shield(polling)
                for msg in batch:
                    error = msg.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            self.caught_up.set()
                        elif error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                            log.warning("catalogue topic %s: %s", self.topic, error)
                        continue
                    key = (msg.key() or b"").decode(errors="replace")
                    record = PublishedDeclaration(int(msg.offset() or 0), key, msg.value() or b"")
                    try:
                        await self.on_record(record)
                    except Exception:
                        # Anyone may publish here: one record that breaks its handler must not stop the
                        # gateway from hearing every service declared after it.
                        log.exception("catalogue record %s at offset %d could not be handled; skipped",
                                      record.key, record.offset)
                    if end is not None and record.offset + 1 >= end:
                        # The last record present at start. The end-of-partition event sets it too, e.g.
                        # when that record was compacted away before it was read.
                        self.caught_up.set()
        finally:
            # A consume() still running in its thread (this task was cancelled) ends within its wait;
            # closing the client under it would pull it from under librdkafka.
            if polling is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.wait([polling])
            with contextlib.suppress(Exception):
                await asyncio.to_thread(consumer.close)

    def _open(self) -> tuple[Consumer, int, int | None]:
        """The consumer, assigned where the topic starts; that offset, and the one after its last record
        (None when the topic's bounds could not be read: it is then read from its beginning, and caught up
        at its end)."""
        consumer = _consumer(self.bootstrap)
        try:
            start, end = self._bounds(consumer)
            consumer.assign([TopicPartition(self.topic, 0, start)])
        except KafkaException:
            consumer.close()
            raise
        return consumer, start, end

    def _bounds(self, consumer: Consumer) -> tuple[int, int | None]:
        try:
            low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, 0),
                                                       timeout=BOUNDS_TIMEOUT_S, cached=False)
        except KafkaException as error:
            log.warning("catalogue topic %s: its bounds could not be read (%s); reading it from its "
                        "beginning", self.topic, error)
            return OFFSET_BEGINNING, None
        if low < 0 or high < low:
            return OFFSET_BEGINNING, None
        return int(low), int(high)
