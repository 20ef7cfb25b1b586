"""The idempotent Kafka producer every component publishes through (the outbox relay first of all).

`AsyncProducer` wraps confluent-kafka's Producer (`enable.idempotence=true`, `acks=all`) for asyncio: a
background thread serves librdkafka's delivery reports and the last report of a batch wakes its sender,
so `await send(...)` returns only once the broker has acknowledged the write.

Fatal errors. With idempotence on, librdkafka can raise a fatal error (e.g. an unrecoverable sequence
gap); the instance is then unusable. The producer is rebuilt before the next send. What happens to sends
around the fatal error:

* a send whose message librdkafka had not accepted yet (produce() itself failed with the fatal error)
  is retried once on the rebuilt producer if it is the first item of its batch: the broker never saw
  it, so retrying cannot duplicate it. A later item of a batch, and every item after it, fails "not
  sent" instead (`_produce`);
* a send whose message was already queued or in flight fails with `PublishError`: the broker may or
  may not hold it, so the caller (the outbox relay, which keeps the row unpublished) retries, and the
  consumer's inbox absorbs a duplicate. The producer never retries those itself, because replaying them
  here could reorder them behind later sends for the same key. What the failed instance still holds
  unsent is purged at once (`_PURGE_QUEUE`), not left to time out.

A message the broker refuses for a reason of its own (too large for its topic) is such a fatal error,
because the producer keeps librdkafka's gapless guarantee (see `_PINNED`). So it costs more than its own
send: every message of the process's producer still queued then, of any topic, fails unsent and must be
sent again, and the producer is rebuilt. A batch being produced when it happens stops there: its later
items are not sent (`_produce`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from kinshasa.topics.discovery import client_config

log = logging.getLogger(__name__)


class _NotTheGaplessNotice(logging.Filter):
    """Drops librdkafka's notice, at each producer's start, that `enable.gapless.guarantee` is
    experimental: Kinshasa sets it on purpose (see `_PINNED`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "enable.gapless.guarantee is experimental" not in record.getMessage()


# librdkafka's own log lines of every producer (connection failures, retries, the cause of a fatal
# error), through Python's logging.
librdkafka_log = logging.getLogger("kinshasa.topics.librdkafka")
librdkafka_log.addFilter(_NotTheGaplessNotice())

# Why the items of a batch after the producer failed are not produced (the relay reads "not sent" as no
# attempt): an item produced on its replacement could be acknowledged while an earlier one of its key,
# left in the failed instance, is not.
_FAILED_MIDWAY = "not sent: the producer failed while its batch was being produced"


def _fatal_error(exc: KafkaException) -> KafkaError | None:
    """The fatal error `exc` carries, if it is one (confluent-kafka raises them from produce, poll and
    flush rather than passing them to the error callback)."""
    error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    return error if error is not None and should_rebuild(error) else None

Headers = Mapping[str, str | bytes] | Sequence[tuple[str, str | bytes]] | None

# Keys the caller may not override: the outbox's exactly-once story rests on the first two, its per-key
# order on the third. Without `enable.gapless.guarantee`, a message the broker refuses for a reason of its
# own (too large for its topic) leaves a gap that librdkafka closes by renumbering the partition's later
# messages, so a later message of its key can be acknowledged without it. With it, librdkafka raises a
# fatal error instead: nothing after the refused message in its partition is acknowledged by that
# producer, the rest of a batch being produced then is not handed to its replacement either, and the
# producer is rebuilt before the next send (see "Fatal errors" above). Not covered: a message that fails
# by timing out (`message.timeout.ms`) while a later one of its partition is acknowledged.
_PINNED = {"enable.idempotence": True, "acks": "all", "enable.gapless.guarantee": True}
_ACCEPTED = {"enable.idempotence": {"true"}, "acks": {"all", "-1"}, "enable.gapless.guarantee": {"true"}}


class EnvelopeLike(Protocol):
    """What the producer needs of `kinshasa.schemas.envelope.Envelope`."""

    @property
    def message_id(self) -> UUID: ...
    @property
    def type(self) -> str: ...
    @property
    def traceparent(self) -> str | None: ...
    def kafka_key(self) -> bytes: ...
    def to_bytes(self) -> bytes: ...


@dataclass(frozen=True)
class Outgoing:
    """One message to publish."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Headers = None


@dataclass(frozen=True)
class Delivered:
    """Where the broker wrote a message."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class FailedSend:
    """One message of a batch that was not written (or whose fate is unknown)."""

    index: int
    item: Outgoing
    error: str
    fatal: bool = False


class PublishError(RuntimeError):
    """Some messages were not acknowledged by the broker; `failures` says which, `delivered` the rest.

    `delivered[i]` is the Delivered of item i, or None if item i failed. Retry the failed items (their
    message ids make a duplicate harmless); the delivered ones are durable.
    """

    def __init__(self, failures: list[FailedSend], delivered: list[Delivered | None]) -> None:
        self.failures = failures
        self.delivered = delivered
        first = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        super().__init__(
            f"{len(failures)} of {len(delivered)} messages not delivered; first: item {first.index} to "
            f"{first.item.topic}: {first.error}{more}. Retry the failed items; check the broker is up "
            "(`kinshasa infra status`) and the topic exists (`kinshasa topics ensure`)."
        )


class _DeliveryFailed(Exception):
    def __init__(self, error: KafkaError | str) -> None:
        self.error = error
        self.fatal = isinstance(error, KafkaError) and should_rebuild(error)
        super().__init__(str(error))


def should_rebuild(error: KafkaError | None) -> bool:
    """True when `error` leaves the producer instance unusable, so it must be replaced."""
    return error is not None and (error.fatal() or error.code() == KafkaError._FATAL)


def producer_config(
    bootstrap: str, client_id: str, extra_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The librdkafka configuration of an AsyncProducer (without its error callback)."""
    extra = dict(extra_config or {})
    for key, required in _PINNED.items():
        if key in extra and str(extra[key]).lower() not in _ACCEPTED[key]:
            raise ValueError(
                f"producer setting {key}={extra[key]!r} is refused: Kinshasa publishes only with "
                f"{key}={required} so that a retried publish cannot duplicate or lose a message, nor a "
                "refused one be overtaken by a later one of its key; drop it from extra_config"
            )
    return {
        **client_config(bootstrap),
        "client.id": client_id,
        # No linger: a lone write goes out at once, and under load what queues while a request is in flight
        # goes out in the next one, so batching needs no wait. (A 5 ms linger cost each Kafka hop of a lone
        # write about 6 ms at p50 in `bench_latency` at 50/s.) Per-key order does not rest on rows sharing a
        # request: see `enable.gapless.guarantee` above.
        "linger.ms": 0,
        "compression.type": "lz4",
        "logger": librdkafka_log,
        **extra,
        **_PINNED,
    }


def _headers(headers: Headers) -> list[tuple[str, str | bytes | None]] | None:
    if headers is None:
        return None
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(k), v) for k, v in pairs]


def envelope_message(topic: str, envelope: EnvelopeLike) -> Outgoing:
    """An envelope as a Kafka message: keyed by entity (or run), with type and id also in headers.

    The headers let a DLQ viewer or a router read what a message is without parsing its body.
    """
    headers: list[tuple[str, str | bytes]] = [
        ("type", envelope.type), ("message_id", str(envelope.message_id))]
    if envelope.traceparent:
        headers.append(("traceparent", envelope.traceparent))
    return Outgoing(topic, envelope.kafka_key(), envelope.to_bytes(), headers)


class _Deliveries:
    """The delivery reports of one `send_batch`, collected where librdkafka serves them.

    Each report is stored by item index; only the last one wakes the event loop, so a batch of N
    messages costs the loop one wakeup instead of N (a thread-safe call each).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._reported = 0
        self._expected: int | None = None
        self.results: list[Delivered | _DeliveryFailed | None] = [None] * count
        self.done: asyncio.Future[None] = loop.create_future()

    def callback(self, index: int) -> Any:
        # A report's error is the message's own (too large, purged, timed out), never the producer's
        # fatal error: that one is raised from produce, poll or flush (`_fatal_error`).
        def report(error: KafkaError | None, msg: Message) -> None:
            result: Delivered | _DeliveryFailed = (
                _DeliveryFailed(error) if error is not None
                else Delivered(str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0))
            )
            with self._lock:
                self.results[index] = result
                self._reported += 1
                complete = self._reported == self._expected
            if complete:
                self._wake()
        return report

    def expect(self, produced: int) -> None:
        """Called once every item was handed to librdkafka (or one could not be): wait for that many."""
        with self._lock:
            self._expected = produced
            complete = self._reported == produced
        if complete:
            self._settle()

    def fail_unreported(self, error: str) -> None:
        """Give every item still without a report this error, and release the waiting sender."""
        with self._lock:
            for index in range(self._expected or 0):
                if self.results[index] is None:
                    self.results[index] = _DeliveryFailed(error)
        self._settle()

    def _wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._settle)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting for these reports any more

    def _settle(self) -> None:
        if not self.done.done():  # the awaiting send may have been cancelled
            self.done.set_result(None)


# What confluent-kafka's Producer raises from every call once its client is closed.
_CLOSED_HANDLE = "Producer has been closed"


def _on_error(error: KafkaError) -> None:
    """librdkafka's error callback. Its errors are transient (broker down, connection reset): librdkafka
    reconnects and retries on its own. A fatal error never comes here: confluent-kafka raises it from
    produce, poll or flush instead (`_fatal_error`)."""
    log.warning("kafka producer: %s", error)


def _close_handles(producers: list[Producer]) -> None:
    for producer in producers:
        producer.close()


class AsyncProducer:
    """An idempotent, acks=all producer for asyncio code; one per process is plenty."""

    def __init__(
        self,
        bootstrap: str,
        *,
        client_id: str,
        extra_config: Mapping[str, Any] | None = None,
        poll_interval: float = 0.1,
        queue_full_timeout: float = 30.0,
    ) -> None:
        self._base_config = producer_config(bootstrap, client_id, extra_config)
        self._poll_interval = poll_interval
        self._queue_full_timeout = queue_full_timeout
        self._fatal: KafkaError | None = None
        self._fatal_source: Producer | None = None  # the instance that raised it
        self._fatal_lock = threading.Lock()
        # Producers replaced after a fatal error, still polled until their in-flight reports arrive, then
        # closed by the poll thread (taken off this list under the lock first, so flush and close never
        # touch a handle it is closing).
        self._retired: list[Producer] = []
        self._retired_lock = threading.Lock()
        self._pending: set[_Deliveries] = set()
        self._closed = False
        self.rebuilds = 0
        self._producer = self._build()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_loop, name=f"kafka-producer-{client_id}",
                                        daemon=True)
        self._thread.start()

    @property
    def config(self) -> dict[str, Any]:
        """A copy of the configuration dict passed to confluent-kafka's Producer."""
        return dict(self._passed_config)

    def _build(self) -> Producer:
        self._passed_config = {**self._base_config, "error_cb": _on_error}
        return Producer(self._passed_config)

    # --- librdkafka threads -------------------------------------------------------------------------

    def _note_fatal(self, error: KafkaError, source: Producer) -> None:
        """Mark the producer in use failed, so it is replaced; `source` is the instance that raised it."""
        with self._fatal_lock:
            if source is not self._producer:
                # A late report from an instance already replaced: the one in use is not at fault.
                log.info("kafka producer: a replaced instance reported %s", error)
                return
            if self._fatal is None:
                self._fatal_source = source
                log.error("kafka producer hit a fatal error; it is rebuilt before the next send: %s", error)
                self._fatal = error

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                polled = self._producer
                try:
                    polled.poll(self._poll_interval)
                except KafkaException as exc:
                    error = _fatal_error(exc)
                    if error is None:
                        raise
                    self._note_fatal(error, polled)
                self._serve_retired()
            except Exception as exc:
                if isinstance(exc, RuntimeError) and str(exc) == _CLOSED_HANDLE:
                    # Its librdkafka handle was closed under it (a test session's end closing what leaked):
                    # no report can come any more, and polling it again would fail again at once.
                    log.error("kafka producer: its client was closed before the producer; polling stops")
                    return
                # Dying here would leave every later send waiting forever for its delivery report.
                log.exception("kafka producer: delivery report handling failed; polling goes on")
                self._stop.wait(self._poll_interval)  # not a busy loop if it fails every time

    def _serve_retired(self) -> None:
        """Serve the retired producers' reports, and close each once it has nothing left in flight.

        A producer in a fatal state never sends again. librdkafka purges its queues when the error is
        raised, but the messages of a later request that the broker then answers out of sequence are put
        back to be sent again, and would wait there for `message.timeout.ms` (5 minutes by default).
        They are purged too, so their senders learn it now.
        """
        with self._fatal_lock:
            # Fatal but not yet replaced, for want of a send: its queues are just as dead. `_note_fatal`
            # names only the instance in use, and a replacement clears it.
            doomed = self._fatal_source if self._fatal is not None else None
        if doomed is not None:
            doomed.purge(in_queue=True, in_flight=False, blocking=False)
        drained: list[Producer] = []
        with self._retired_lock:
            for old in list(self._retired):
                old.purge(in_queue=True, in_flight=False, blocking=False)
                try:
                    old.poll(0)
                except KafkaException as exc:
                    if _fatal_error(exc) is None:
                        raise
                    # Its fatal error, noticed first by a send that replaced it: nothing more to do.
                if len(old) == 0:
                    self._retired.remove(old)
                    drained.append(old)
        for old in drained:  # outside the lock: a close can take a while, and the event loop takes it
            old.close()  # or its librdkafka handle lives on, connected, until collected

    def _flush_current(self, max_wait: float) -> int:
        producer = self._producer
        try:
            return int(producer.flush(max_wait))
        except KafkaException as exc:
            error = _fatal_error(exc)
            if error is None:
                raise
            self._note_fatal(error, producer)
            return len(producer)

    def _flush_retired(self) -> int:
        remaining = 0
        with self._retired_lock:
            for old in self._retired:
                try:
                    remaining += old.flush(0)
                except KafkaException as exc:
                    if _fatal_error(exc) is None:
                        raise
                    remaining += len(old)
        return remaining

    # --- event loop side ----------------------------------------------------------------------------

    def _failed(self) -> bool:
        with self._fatal_lock:
            return self._fatal is not None

    def _rebuild_if_fatal(self) -> None:
        with self._fatal_lock:
            error = self._fatal
        if error is None:
            return
        fresh = self._build()
        with self._fatal_lock:  # so a late report of the old instance is seen as one (`_note_fatal`)
            old, self._producer = self._producer, fresh
            self._fatal = self._fatal_source = None
        with self._retired_lock:
            self._retired.append(old)
        self.rebuilds += 1
        log.warning("kafka producer rebuilt after fatal error %s (rebuild #%d)", error, self.rebuilds)

    async def _produce(self, item: Outgoing, on_delivery: Any, into: Producer | None) -> Producer:
        """Hand one item to librdkafka; the instance it went to.

        A batch's first item (`into` None) may go to a producer built to replace a failed one. A later item
        must go `into` the instance its batch's first item went to: if that one failed or was replaced
        meanwhile (while this item waited for room in a full queue, say), it fails with `_FAILED_MIDWAY`.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._queue_full_timeout
        retried_fatal = False
        delay = 0.005
        while True:
            if into is None:
                self._rebuild_if_fatal()
            elif self._failed() or self._producer is not into:
                raise _DeliveryFailed(_FAILED_MIDWAY)
            producer = self._producer
            try:
                producer.produce(item.topic, value=item.value, key=item.key, headers=_headers(item.headers),
                                 on_delivery=on_delivery)
                return producer
            except BufferError:
                # Local queue full: serve reports so it drains, then try again rather than drop the send.
                if loop.time() >= deadline:
                    raise _DeliveryFailed(
                        f"local producer queue still full after {self._queue_full_timeout}s; the broker is "
                        "not keeping up or is unreachable") from None
                try:
                    producer.poll(0)
                except KafkaException as exc:
                    fatal = _fatal_error(exc)
                    if fatal is None:
                        raise
                    self._note_fatal(fatal, producer)  # the loop's next turn replaces it or gives up
                    continue
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)
            except KafkaException as exc:
                fatal = _fatal_error(exc)
                if fatal is not None:
                    self._note_fatal(fatal, producer)
                    if into is not None:
                        raise _DeliveryFailed(_FAILED_MIDWAY) from exc
                    if not retried_fatal:
                        # The message never entered the old producer, so one retry cannot duplicate it.
                        retried_fatal = True
                        continue
                error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                raise _DeliveryFailed(error if error is not None else str(exc)) from exc

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("AsyncProducer is closed: create a new one to publish again")

    async def send(self, topic: str, key: bytes | None, value: bytes, headers: Headers = None) -> Delivered:
        """Publish one message and wait for the broker's acknowledgement; PublishError if it failed."""
        return (await self.send_batch([Outgoing(topic, key, value, headers)]))[0]

    async def send_batch(self, items: Sequence[Outgoing]) -> list[Delivered]:
        """Publish all items in order, then wait for every acknowledgement.

        If an item cannot even be queued, the items after it are not produced (so a retry cannot land an
        earlier message after a later one of the same key) and are reported as failed too. So are the
        items after the producer failed (see `_produce`).
        """
        self._check_open()
        deliveries = _Deliveries(asyncio.get_running_loop(), len(items))
        failures: list[FailedSend] = []
        produced = 0
        into: Producer | None = None  # the instance the batch's first item went to
        self._pending.add(deliveries)
        try:
            for index, item in enumerate(items):
                try:
                    into = await self._produce(item, deliveries.callback(index), into)
                except _DeliveryFailed as exc:
                    failures.append(FailedSend(index, item, str(exc.error), exc.fatal))
                    failures.extend(FailedSend(i, it, f"not sent: item {index} before it failed")
                                    for i, it in enumerate(items[index + 1:], start=index + 1))
                    break
                produced += 1
            deliveries.expect(produced)
            await deliveries.done
        finally:
            self._pending.discard(deliveries)
        delivered: list[Delivered | None] = [None] * len(items)
        for index, result in enumerate(deliveries.results[:produced]):
            if isinstance(result, Delivered):
                delivered[index] = result
            elif isinstance(result, _DeliveryFailed):
                failures.append(FailedSend(index, items[index], str(result.error), result.fatal))
            else:
                failures.append(FailedSend(index, items[index], "no delivery report"))
        if failures:
            failures.sort(key=lambda f: f.index)
            raise PublishError(failures, delivered)
        return [d for d in delivered if d is not None]

    async def send_envelope(self, topic: str, envelope: EnvelopeLike) -> Delivered:
        """Publish one envelope keyed by its entity (or run id); see `envelope_message`."""
        return (await self.send_batch([envelope_message(topic, envelope)]))[0]

    async def flush(self, max_wait: float = 30.0) -> int:
        """Wait until every queued message is acknowledged or failed; returns how many are still queued."""
        if self._closed and not self._thread.is_alive():
            return 0  # closed: nothing is queued any more
        remaining = await asyncio.to_thread(self._flush_current, max_wait)
        remaining += await asyncio.to_thread(self._flush_retired)
        if remaining:
            log.warning("kafka producer: %d messages undelivered after a %.1fs flush", remaining, max_wait)
        return remaining

    async def close(self, max_wait: float = 30.0) -> None:
        """Flush, stop the poll thread and fail any send still waiting. Calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            remaining = await self.flush(max_wait)
            if remaining:
                # Fail what is left so its senders raise now instead of waiting for a report never served.
                with self._retired_lock:
                    for producer in [self._producer, *self._retired]:
                        producer.purge()
                        with contextlib.suppress(KafkaException):  # its fatal error: closing anyway
                            producer.poll(0)
        finally:
            self._stop.set()
            await asyncio.to_thread(self._thread.join)
            await asyncio.sleep(0)  # let the reports just scheduled settle their futures
            for deliveries in list(self._pending):
                deliveries.fail_unreported("producer closed before the broker acknowledged")
            # Destroys the librdkafka handles now: one left to the garbage collector keeps reconnecting
            # (and logging) for as long as anything still refers to this object.
            handles, self._retired = [self._producer, *self._retired], []
            await asyncio.to_thread(_close_handles, handles)

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
