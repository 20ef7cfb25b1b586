"""The projector's Kafka consumer: whole batches in one transaction, offsets stored only after it commits.

Why not `kinshasa.topics.AsyncConsumer`: its handler takes one record, so each event would be its own
database transaction, and its `consume(batch, timeout)` waits the whole timeout whenever fewer than
`batch` messages are available. The ledger sees every event of every service; it needs one commit per
batch, and a revert's ack latency is bounded by how quickly the projector notices an event. This loop
polls for the first message (returning as soon as one is there), drains what is already fetched
without waiting, and hands the batch over. Delivery rules are the same as AsyncConsumer's: offsets are
stored only for records whose effect committed; a batch that fails is handled again record by record
through the DLQ-guarded handler, so one poison message is dead-lettered instead of blocking the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from kinshasa.topics.consumer import ConsumerError, Record, consumer_config, to_record

log = logging.getLogger(__name__)

T = TypeVar("T")
BatchHandler = Callable[[list[Record]], Awaitable[None]]
RecordHandler = Callable[[Record], Awaitable[None]]


class BatchConsumer:
    """A consumer-group member that hands over batches; `run` it once, it closes itself on the way out."""

    def __init__(self, bootstrap: str, group_id: str, topics: Iterable[str], *,
                 extra_config: Mapping[str, Any] | None = None, batch_size: int = 500,
                 poll_timeout: float = 0.5, failure_backoff: float = 0.5) -> None:
        self.group_id = group_id
        self.topics = list(topics)
        if not self.topics:
            raise ValueError("BatchConsumer needs at least one topic")
        self._config = consumer_config(bootstrap, group_id, extra_config)
        self._batch_size = batch_size
        self._poll_timeout = poll_timeout
        self._failure_backoff = failure_backoff
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kafka-batch-{group_id}")
        self._consumer = Consumer(self._config)
        self._consumer.subscribe(self.topics, on_revoke=self._on_revoke)
        self._closed = False
        # Offsets of handled records, stored by the consumer thread before its next poll.
        self._pending: list[TopicPartition] = []

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The next owner starts after our last committed effect, not after the last auto-commit.
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if not (isinstance(error, KafkaError) and error.code() == KafkaError._NO_OFFSET):
                log.warning("%s: commit on revoke failed (%s); the next owner may redeliver",
                            self.group_id, exc)
        except Exception:
            log.exception("%s: commit on revoke failed", self.group_id)

    def _fetch(self, to_store: list[TopicPartition]) -> list[Message]:
        # Every call into the Consumer happens on this one thread: librdkafka's store_offsets blocks while
        # another thread is inside poll(), which would stall the event loop for the whole poll timeout.
        if to_store:
            try:
                self._consumer.store_offsets(offsets=to_store)
            except KafkaException as exc:
                # The partition moved to another member: it redelivers, and the projection is idempotent.
                log.warning("%s: could not store offsets: %s", self.group_id, exc)
        first = self._consumer.poll(self._poll_timeout)
        if first is None:
            return []
        # Only what is already fetched: a zero timeout never waits for a batch to fill.
        return [first, *self._consumer.consume(self._batch_size - 1, 0)]

    async def run(self, handle_batch: BatchHandler, handle_one: RecordHandler, stop: asyncio.Event) -> None:
        """Hand every batch to `handle_batch` until `stop` is set; `handle_one` (DLQ-guarded) is the
        fallback for a batch that failed."""
        try:
            while not stop.is_set():
                pending, self._pending = self._pending, []
                messages = await self._call(self._fetch, pending)
                records: list[tuple[Message, Record]] = []
                for msg in messages:
                    error = msg.error()
                    if error is None:
                        records.append((msg, to_record(msg)))
                    elif error.fatal():
                        raise ConsumerError(f"{self.group_id}: fatal Kafka consumer error {error}; "
                                            "restart the coordinator")
                    elif error.code() != KafkaError._PARTITION_EOF:
                        log.warning("%s: consumer error (librdkafka retries): %s", self.group_id, error)
                if not records:
                    continue
                if not await self._handle(records, handle_batch, handle_one):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self._failure_backoff)
        finally:
            await self.close()

    async def _handle(self, records: list[tuple[Message, Record]], handle_batch: BatchHandler,
                      handle_one: RecordHandler) -> bool:
        try:
            await handle_batch([r for _, r in records])
        except Exception:
            log.exception("%s: batch of %d failed; handling it record by record", self.group_id, len(records))
        else:
            self._store(m for m, _ in records)
            return True
        stuck: set[tuple[str, int]] = set()
        for msg, record in records:
            where = (record.topic, record.partition)
            if where in stuck:
                continue
            try:
                await handle_one(record)
            except Exception:
                # Not even dead-lettered: leave it (and what follows on its partition) for redelivery.
                log.exception("%s: %s[%d]@%d could not be handled or dead-lettered; it will come again",
                              self.group_id, record.topic, record.partition, record.offset)
                stuck.add(where)
                await self._rewind(record)
                continue
            self._store([msg])
        return not stuck

    def _store(self, messages: Iterable[Message]) -> None:
        """Queue the offsets after `messages` for storing (by the consumer thread, before its next poll)."""
        highest: dict[tuple[str, int], int] = {}
        for msg in messages:
            key = (str(msg.topic()), int(msg.partition() or 0))
            highest[key] = max(highest.get(key, -1), int(msg.offset() or 0))
        self._pending.extend(TopicPartition(t, p, o + 1) for (t, p), o in highest.items())

    async def _rewind(self, record: Record) -> None:
        try:
            await self._call(self._consumer.seek,
                             TopicPartition(record.topic, record.partition, record.offset))
        except KafkaException as exc:
            raise ConsumerError(f"could not seek {record.topic}[{record.partition}] back to {record.offset} "
                                f"({exc}); stopping so the message is not skipped: restart the coordinator") \
                from exc

    def _close_blocking(self) -> None:
        try:
            if self._pending:
                self._consumer.store_offsets(offsets=self._pending)
            self._consumer.commit(asynchronous=False)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if not (isinstance(error, KafkaError) and error.code() == KafkaError._NO_OFFSET):
                log.warning("%s: final commit failed (%s); uncommitted messages come again",
                            self.group_id, exc)
        finally:
            self._consumer.close()

    async def close(self) -> None:
        """Commit stored offsets, leave the group and stop the consumer thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close_blocking)
        finally:
            self._executor.shutdown(wait=False)
