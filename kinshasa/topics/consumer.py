"""The at-least-once Kafka consumer every component reads through: offsets advance only after the handler.

Delivery contract of `AsyncConsumer.run`:

* a message's offset is stored only after its handler returned normally, so the handler's database
  commit (effect + inbox row) always happens before Kafka may forget the message;
* stored offsets are committed by auto-commit (which commits only stored offsets), synchronously when
  partitions are revoked, and once more before close (offsets are stored by the consumer's own thread
  before its next poll, so a revoke during that poll commits every handled message);
* if the handler raises, nothing is stored and the consumer seeks back to that message, so it comes
  again, in order, before any later message of its partition. The consumer itself never skips a message:
  giving up (retry budget, DLQ) is the job of the kernel layer that wraps handlers.

With a `batch_handler`, a fetched batch is first offered whole: if it returns normally every offset
of the batch is stored (the handler committed all of them together); if it raises, the batch is
handled again one record at a time through `handler`, with the per-record contract above, so a
batch handler that raises must have committed nothing or have idempotent effects.

Redelivery is therefore normal (after a crash, a rebalance or a handler error); handlers are made
idempotent by the inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from kinshasa.topics.discovery import client_config

if TYPE_CHECKING:
    from kinshasa.schemas.envelope import Envelope

log = logging.getLogger(__name__)

T = TypeVar("T")

# The session timeout of every component's consumer group: well under librdkafka's 45 s default, so the
# partitions of a member that vanished without leaving (a process killed) go to the others sooner, and a
# rebalance (a replica joining, a new topic matching a pattern) does not wait 45 s for it.
SESSION_TIMEOUT_MS = 10_000


class ConsumerError(RuntimeError):
    """The consumer cannot go on (fatal client error, failed seek); restart it, nothing was skipped."""


class Redeliver(RuntimeError):
    """Raised by a handler that is not failing but waiting (its infrastructure is down): the consumer
    seeks back and delivers the message again after a poll, and logs it without alarm."""


@dataclass(frozen=True)
class Record:
    """One consumed message, detached from librdkafka so handlers can keep it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp: datetime | None = None

    def header(self, name: str) -> bytes | None:
        """The last value of header `name`, or None."""
        for key, value in reversed(self.headers):
            if key == name:
                return value
        return None

    def envelope(self) -> Envelope:
        """The value parsed as an Envelope; raises InvalidMessage (a ValueError) naming each bad field."""
        # Imported here so the log layer does not depend on the contracts at import time.
        from kinshasa.schemas.envelope import continued, parse_envelope

        # The Kafka header names the relay's publish span: handling continues the trace from there.
        return continued(parse_envelope(self.value), self.header("traceparent"))


Handler = Callable[[Record], Awaitable[None]]
# All records or none: returns once every record's effect is committed; raising hands them to the
# per-record handler, so it must have committed nothing (or be idempotent).
BatchHandler = Callable[[list[Record]], Awaitable[None]]


def to_record(msg: Message) -> Record:
    """Copy a librdkafka message into a Record."""
    kind, millis = msg.timestamp()
    when = None if kind == TIMESTAMP_NOT_AVAILABLE else datetime.fromtimestamp(millis / 1000, UTC)
    raw = msg.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    headers = tuple((k, v if isinstance(v, bytes) else (v or "").encode()) for k, v in pairs)
    return Record(
        topic=str(msg.topic()),
        partition=int(msg.partition() or 0),
        offset=int(msg.offset() or 0),
        key=msg.key(),
        value=msg.value() or b"",
        headers=headers,
        timestamp=when,
    )


def consumer_config(
    bootstrap: str, group_id: str, extra_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The librdkafka configuration of an AsyncConsumer (without its callbacks)."""
    extra = dict(extra_config or {})
    if str(extra.get("enable.auto.offset.store", "false")).lower() != "false":
        raise ValueError(
            "consumer setting enable.auto.offset.store=true is refused: it would let Kafka advance past "
            "a message before its handler committed; drop it from extra_config"
        )
    return {
        **client_config(bootstrap),
        "group.id": group_id,
        "auto.offset.reset": "earliest",
        # Auto-commit commits only what we stored, i.e. handled messages; a short interval keeps the
        # redelivery window after a crash small.
        "enable.auto.commit": True,
        "auto.commit.interval.ms": 1000,
        **extra,
        "enable.auto.offset.store": False,
    }


class _LagProbe:
    """Asks the brokers for a group's committed offsets and the partitions' ends, on a client of its own.

    The member's own client fetches with long polls; a request queued behind them on its connections,
    on its one thread, stalled consuming for seconds at a time under load (a 6-partition topic took
    7 round trips). This client never joins the group, commits nothing and answers in two requests
    (plus one for partitions without a committed offset), on a thread of its own.
    """

    def __init__(self, config: Mapping[str, Any], group_id: str, request_timeout: float) -> None:
        # Never a member: no static membership id to share with the member it measures, nothing to commit.
        settings = {k: v for k, v in config.items() if k != "group.instance.id"}
        self._client = Consumer({**settings, "enable.auto.commit": False})
        self._timeout = request_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kafka-lag-{group_id}")

    async def lag(self, owned: list[TopicPartition]) -> dict[tuple[str, int], int]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._lag_blocking, owned)

    def _lag_blocking(self, owned: list[TopicPartition]) -> dict[tuple[str, int], int]:
        committed = {}
        for tp in self._client.committed(owned, timeout=self._timeout):
            if tp.error is not None:
                raise KafkaException(tp.error)
            committed[(tp.topic, tp.partition)] = tp.offset
        ends = self._offsets(owned, OFFSET_END)
        # Nothing committed yet: auto.offset.reset=earliest means the whole retained log is backlog.
        unstarted = [tp for tp in owned if committed.get((tp.topic, tp.partition), -1) < 0]
        starts = self._offsets(unstarted, OFFSET_BEGINNING) if unstarted else {}
        lags = {}
        for tp in owned:
            key = (tp.topic, tp.partition)
            start = committed[key] if committed.get(key, -1) >= 0 else starts[key]
            lags[key] = max(0, ends[key] - start)
        return lags

    def _offsets(self, partitions: list[TopicPartition], which: int) -> dict[tuple[str, int], int]:
        """The end (OFFSET_END) or start (OFFSET_BEGINNING) of each partition, one request per leader."""
        asked = [TopicPartition(tp.topic, tp.partition, which) for tp in partitions]
        answered = self._client.offsets_for_times(asked, timeout=self._timeout)
        for tp in answered:
            if tp.error is not None:
                raise KafkaException(tp.error)
        return {(tp.topic, tp.partition): tp.offset for tp in answered}

    async def close(self) -> None:
        # Queued behind a lag request still running, so the client is never closed under it; and it
        # runs even if this wait is cancelled (a stop that timed out), so the client is never left open.
        closing = self._executor.submit(self._client.close)
        self._executor.shutdown(wait=False)
        await asyncio.shield(asyncio.wrap_future(closing))


def _is_no_offset(exc: KafkaException) -> bool:
    error = exc.args[0] if exc.args else None
    return isinstance(error, KafkaError) and error.code() == KafkaError._NO_OFFSET


class AsyncConsumer:
    """A consumer-group member for asyncio code: `run` it once; it joins then, and closes on the way out.

    Every blocking librdkafka call runs on one private thread, in order, so the event loop never waits
    on a poll and `close` can never race a `consume` still in progress. `lag` alone asks through a
    client of its own (`_LagProbe`), so measuring the backlog never holds up consuming it.
    """

    def __init__(
        self,
        bootstrap: str,
        group_id: str,
        topics: Iterable[str],
        *,
        extra_config: Mapping[str, Any] | None = None,
        batch_size: int = 100,
        poll_timeout: float = 0.5,
        failure_backoff: float = 0.5,
        request_timeout: float = 10.0,
    ) -> None:
        self.group_id = group_id
        self.topics = list(topics)
        if not self.topics:
            raise ValueError("AsyncConsumer needs at least one topic: pass names from "
                             "kinshasa.topics.catalogue")
        self._config = consumer_config(bootstrap, group_id, extra_config)
        self._batch_size = batch_size
        self._poll_timeout = poll_timeout
        self._failure_backoff = failure_backoff
        self._request_timeout = request_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kafka-consumer-{group_id}")
        # Built now so a bad setting fails here; the group is joined only when `run` subscribes, so a
        # consumer that is built but never run holds no partitions.
        self._consumer = Consumer({**self._config, "on_commit": self._on_commit})
        self._probe: _LagProbe | None = None  # built by the first `lag`
        self._ran = False
        self._closed = False
        # Offsets after handled messages, stored by the consumer thread before its next call: librdkafka's
        # store_offsets blocks while another thread is inside poll() or a broker request.
        self._pending: list[TopicPartition] = []

    @property
    def config(self) -> dict[str, Any]:
        """A copy of the configuration passed to confluent-kafka's Consumer (callbacks left out)."""
        return dict(self._config)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RuntimeError(f"consumer of group {self.group_id} is closed: create a new AsyncConsumer")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    # --- librdkafka callbacks: they run on the consumer thread, inside consume() or close() ----------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("%s assigned %s", self.group_id, [(p.topic, p.partition) for p in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Commit now: the next owner starts from our last handled message, not from the last auto-commit.
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if not _is_no_offset(exc):
                log.warning("%s: commit on revoke failed (%s); the next owner may redeliver",
                            self.group_id, exc)
        except Exception:  # an exception escaping a callback would surface from an unrelated consume()
            log.exception("%s: commit on revoke failed", self.group_id)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Lost, not revoked: another member may already own them, so committing could move its offsets.
        log.warning("%s lost partitions %s without a clean revoke; their uncommitted messages will be "
                    "redelivered", self.group_id, [(p.topic, p.partition) for p in partitions])

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if error is not None and error.code() != KafkaError._NO_OFFSET:
            log.warning("%s: offset commit failed: %s", self.group_id, error)

    # --- the loop -----------------------------------------------------------------------------------

    async def run(self, handler: Handler, stop: asyncio.Event,
                  batch_handler: BatchHandler | None = None) -> None:
        """Hand every message to `handler` until `stop` is set; closes the consumer when it returns.

        A handler exception is logged, the message is not acknowledged and comes again (after
        `failure_backoff` seconds) in the same run; cancellation or ConsumerError end the run.
        With `batch_handler`, each fetched batch of two or more records goes to it first (see the
        module docstring); `handler` takes over for a batch it refused.
        """
        if self._ran:
            raise RuntimeError("AsyncConsumer.run was already called: create a new AsyncConsumer "
                               "to run again")
        self._ran = True
        try:
            await self._call(self._consumer.subscribe, self.topics, self._on_assign, self._on_revoke,
                             self._on_lost)
            while not stop.is_set():
                messages = await self._call(self._fetch)
                if batch_handler is not None and len(messages) > 1:
                    messages = await self._offer_batch(messages, batch_handler)
                if await self._handle_batch(messages, handler, stop):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self._failure_backoff)
        finally:
            await self.close()

    def _store_pending(self) -> None:
        """Store the queued offsets (consumer thread only)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            self._consumer.store_offsets(offsets=pending)
        except KafkaException as exc:
            # A partition moved to another member: it will redeliver, the inbox dedupes.
            log.warning("%s: could not store offsets %s: %s", self.group_id,
                        [(p.topic, p.partition, p.offset) for p in pending], exc)

    def _fetch(self) -> list[Message]:
        # Stored before polling, so a revoke inside this poll commits everything handled so far.
        self._store_pending()
        # consume(n, timeout) waits for n messages or the whole timeout, adding up to poll_timeout of
        # latency per hop; poll() returns on the first message, then take only what is already fetched.
        first = self._consumer.poll(self._poll_timeout)
        if first is None:
            return []
        if self._batch_size == 1:
            return [first]
        return [first, *self._consumer.consume(self._batch_size - 1, 0)]

    async def _offer_batch(self, messages: list[Message], batch_handler: BatchHandler) -> list[Message]:
        """Give the batch handler every good record; returns the messages left for per-record handling."""
        good = []
        for msg in messages:
            error = msg.error()
            if error is not None:
                self._client_error(error)
            else:
                good.append(msg)
        if len(good) < 2:
            return good
        try:
            await batch_handler([to_record(msg) for msg in good])
        except Exception as exc:
            log.info("%s: batch of %d refused as a whole (%s: %s); handling its records one by one",
                     self.group_id, len(good), type(exc).__name__, exc)
            return good
        for msg in good:
            self._store(msg)
        return []

    def _store(self, msg: Message) -> None:
        """Queue the offset after `msg` (its handler committed) for the consumer thread to store."""
        self._pending.append(TopicPartition(str(msg.topic()), int(msg.partition() or 0),
                                            int(msg.offset() or 0) + 1))

    async def _handle_batch(self, messages: list[Message], handler: Handler, stop: asyncio.Event) -> bool:
        """Handle a batch in order; returns True if some handler failed."""
        # Once a partition's message fails, its later messages in this batch wait for the redelivery.
        failed: set[tuple[str | None, int | None]] = set()
        for msg in messages:
            if stop.is_set():
                break  # unhandled messages are not stored, so they come again
            error = msg.error()
            if error is not None:
                self._client_error(error)
                continue
            partition = (msg.topic(), msg.partition())
            if partition in failed:
                continue
            record = to_record(msg)
            try:
                await handler(record)
            except Redeliver as waiting:
                log.info("%s: %s[%d]@%d handed back, it will be redelivered: %s", self.group_id,
                         record.topic, record.partition, record.offset, waiting)
                failed.add(partition)
                await self._rewind(record)
                continue
            except Exception:
                log.exception("%s: handler failed on %s[%d]@%d; it will be redelivered", self.group_id,
                              record.topic, record.partition, record.offset)
                failed.add(partition)
                await self._rewind(record)
                continue
            self._store(msg)
        return bool(failed)

    async def _rewind(self, record: Record) -> None:
        try:
            where = TopicPartition(record.topic, record.partition, record.offset)
            await self._call(self._consumer.seek, where)
        except KafkaException as exc:
            # Going on without the seek would skip the message; stopping leaves it uncommitted instead.
            raise ConsumerError(
                f"could not seek {record.topic}[{record.partition}] back to {record.offset} after a handler "
                f"failure ({exc}); the consumer stops so the message is not skipped: restart it"
            ) from exc

    def _client_error(self, error: KafkaError) -> None:
        if error.fatal():
            raise ConsumerError(f"{self.group_id}: fatal Kafka consumer error {error}; restart the consumer")
        if error.code() == KafkaError._PARTITION_EOF:
            return
        if error.code() in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
            log.warning("%s: %s; create the catalogue topics with `kinshasa topics ensure`",
                        self.group_id, error)
            return
        log.warning("%s: consumer error (librdkafka will retry): %s", self.group_id, error)

    # --- offsets and lag ----------------------------------------------------------------------------

    def _commit_stored(self) -> None:
        self._store_pending()
        try:
            self._consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if not _is_no_offset(exc):
                raise

    async def commit(self) -> None:
        """Synchronously commit the stored offsets (those of handled messages); no-op if none are new."""
        await self._call(self._commit_stored)

    def assignment(self) -> list[tuple[str, int]]:
        """The (topic, partition) pairs this member currently owns."""
        if self._closed:
            return []
        return sorted((p.topic, p.partition) for p in self._consumer.assignment())

    async def lag(self) -> dict[tuple[str, int], int]:
        """Messages not yet committed, per owned partition: high watermark minus committed offset."""
        if self._closed:
            raise RuntimeError(f"consumer of group {self.group_id} is closed: create a new AsyncConsumer")
        owned = [TopicPartition(topic, partition) for topic, partition in self.assignment()]
        if not owned:
            return {}
        if self._probe is None:
            self._probe = _LagProbe(self._config, self.group_id, self._request_timeout)
        return await self._probe.lag(owned)

    # --- shutdown -----------------------------------------------------------------------------------

    def _close_blocking(self) -> None:
        try:
            self._commit_stored()
        except KafkaException as exc:
            log.warning("%s: final commit failed (%s); uncommitted messages will be redelivered",
                        self.group_id, exc)
        finally:
            self._consumer.close()

    async def close(self) -> None:
        """Commit stored offsets, leave the group, stop the consumer thread. Calling it again does nothing."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        self._closed = True
        try:
            # Queued behind any consume() still running, so the two never overlap.
            closing: list[Awaitable[None]] = [loop.run_in_executor(self._executor, self._close_blocking)]
            if self._probe is not None:
                closing.append(self._probe.close())
            await asyncio.gather(*closing)
        finally:
            self._executor.shutdown(wait=False)

    async def __aenter__(self) -> AsyncConsumer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
