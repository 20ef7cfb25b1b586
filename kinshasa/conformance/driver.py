"""The conformance kit's I/O: the catalogue read, commands out, the service's events in, its read API.

Events are read by an assigned consumer (no consumer group, nothing committed) from the end offsets
of the events topic noted before the first command, and kept only when they carry this run's id (or
answer one of its commands), so a check never sees the service's other traffic and never disturbs
another reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import UUID

import httpx
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

from kinshasa.conformance.errors import CheckFailed, SetupError
from kinshasa.conformance.subject import ServiceUnderTest
from kinshasa.schemas.envelope import Envelope, InvalidMessage, parse_envelope
from kinshasa.topics.catalogue import commands_topic, events_topic
from kinshasa.topics.discovery import client_config
from kinshasa.topics.producer import AsyncProducer, envelope_message

log = logging.getLogger(__name__)
T = TypeVar("T")
_HTTP_TIMEOUT_S = 10.0


def _throwaway_config(bootstrap: str) -> dict[str, Any]:
    # A group id librdkafka insists on; with assign() and no commits the group is never joined.
    return {**client_config(bootstrap), "group.id": f"kinshasa.conformance.{uuid.uuid4().hex}",
            "enable.auto.commit": False, "auto.offset.reset": "earliest",
            # Critical lines only: an unreachable broker becomes one SetupError saying what to do,
            # which librdkafka's line per reconnect attempt (20 a second) would bury.
            "log_level": 2}


def _partitions(consumer: Consumer, topic: str, bootstrap: str, timeout_s: float) -> list[int] | None:
    """The topic's partition numbers, None if the topic does not exist; SetupError if Kafka is unreachable."""
    try:
        meta = consumer.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise SetupError(f"cannot reach Kafka at {bootstrap} ({exc}): start it (`kinshasa infra up`) or "
                         "pass --bootstrap HOST:PORT") from exc
    found = meta.topics.get(topic)
    if found is None or found.error is not None:
        return None
    return sorted(found.partitions)


def _watermarks(consumer: Consumer, tp: TopicPartition, timeout_s: float) -> tuple[int, int]:
    # A topic created a moment ago may not have its partition leader yet.
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=min(5.0, timeout_s))
            return int(low), int(high)
        except KafkaException:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def read_catalogue(bootstrap: str, topic: str, timeout_s: float) -> dict[str, bytes | None]:
    """The newest value of every key of the catalogue topic, read from its start to its high watermark.

    Raises SetupError if the topic does not exist or cannot be read to its end within `timeout_s`.
    """
    consumer = Consumer(_throwaway_config(bootstrap))
    try:
        partitions = _partitions(consumer, topic, bootstrap, timeout_s)
        if partitions is None:
            raise SetupError(f"topic {topic} does not exist on {bootstrap}: no service has declared itself "
                             "there; start the service (it publishes its declaration at start) or pass "
                             "--catalogue-topic")
        marks = {p: _watermarks(consumer, TopicPartition(topic, p), timeout_s) for p in partitions}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        return _read_to_ends(consumer, topic, marks, timeout_s)
    finally:
        consumer.close()


def _read_to_ends(consumer: Consumer, topic: str, marks: dict[int, tuple[int, int]],
                  timeout_s: float) -> dict[str, bytes | None]:
    latest: dict[str, bytes | None] = {}
    pending = {p for p, (low, high) in marks.items() if high > low}
    deadline = time.monotonic() + timeout_s
    while pending:
        if time.monotonic() >= deadline:
            raise SetupError(f"could not read {topic} to its end within {timeout_s:g}s: check the broker "
                             "(`kinshasa infra status`) or raise --timeout")
        msg = consumer.poll(0.2)
        key = msg.key() if msg is not None and msg.error() is None else None
        if msg is not None and key is not None:
            latest[key.decode(errors="replace")] = msg.value()
        for tp in consumer.position([TopicPartition(topic, p) for p in pending]):
            if tp.offset >= marks[tp.partition][1]:
                pending.discard(tp.partition)
    return latest


@dataclass(frozen=True)
class Seen:
    """One event of this run, where it was on the events topic."""

    envelope: Envelope
    partition: int
    offset: int


class EventLog:
    """This run's events as they arrive, and a way to wait until one that a check looks for is there."""

    def __init__(self) -> None:
        self.events: list[Seen] = []
        self._changed = asyncio.Condition()

    async def add(self, seen: list[Seen]) -> None:
        async with self._changed:
            self.events.extend(seen)
            self._changed.notify_all()

    def caused_by(self, message_id: UUID) -> list[Seen]:
        """Events whose causation is `message_id`, in partition order (one entity: one partition)."""
        found = [s for s in self.events if s.envelope.causation_id == message_id]
        return sorted(found, key=lambda s: (s.partition, s.offset))

    def with_id(self, message_id: UUID) -> list[Seen]:
        """Copies of one event (a re-emission repeats the id), in partition order."""
        found = [s for s in self.events if s.envelope.message_id == message_id]
        return sorted(found, key=lambda s: (s.partition, s.offset))

    async def wait(self, find: Callable[[], T | None], timeout_s: float) -> T | None:
        """What `find` returns once it is not None, or None when `timeout_s` passed first."""
        try:
            async with asyncio.timeout(timeout_s), self._changed:
                return await self._changed.wait_for(find)
        except TimeoutError:
            return find()


class ServiceDriver:
    """One run's connection to a service: commands out, its events in, its read API; use `async with`."""

    def __init__(self, bootstrap: str, subject: ServiceUnderTest, run_id: str, timeout_s: float,
                 topic_suffix: str | None = None) -> None:
        self.bootstrap = bootstrap
        self.subject = subject
        self.run_id = run_id
        self.timeout_s = timeout_s
        tail = f".{topic_suffix}" if topic_suffix else ""
        self.commands_topic = commands_topic(subject.service) + tail
        self.events_topic = events_topic(subject.service) + tail
        self.events = EventLog()
        # librdkafka consumer calls stay on one thread, in order, so a poll never races close().
        self._kafka_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conformance-events")
        self._consumer: Consumer | None = None
        self._producer: AsyncProducer | None = None
        self._http: httpx.AsyncClient | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stopping = False
        self._sent: set[UUID] = set()

    async def __aenter__(self) -> ServiceDriver:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._consumer = Consumer(_throwaway_config(self.bootstrap))
        await loop.run_in_executor(self._kafka_thread, self._assign_at_ends)
        self._producer = AsyncProducer(self.bootstrap, client_id="kinshasa-conformance")
        self._http = httpx.AsyncClient(base_url=self.subject.read_url, timeout=_HTTP_TIMEOUT_S)
        self._reader = asyncio.create_task(self._read_events(), name="conformance-events")

    def _assign_at_ends(self) -> None:
        assert self._consumer is not None
        service = self.subject.service
        for topic in (self.commands_topic, self.events_topic):
            if _partitions(self._consumer, topic, self.bootstrap, self.timeout_s) is None:
                raise SetupError(f"topic {topic} does not exist: start {service} (it creates its topics) "
                                 f"or run `kinshasa topics ensure --service {service}`")
        partitions = _partitions(self._consumer, self.events_topic, self.bootstrap, self.timeout_s) or []
        ends = [_watermarks(self._consumer, TopicPartition(self.events_topic, p), self.timeout_s)[1]
                for p in partitions]
        self._consumer.assign([TopicPartition(self.events_topic, p, end)
                               for p, end in zip(partitions, ends, strict=True)])

    async def _read_events(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._consumer is not None
        while not self._stopping:
            try:
                messages = await loop.run_in_executor(self._kafka_thread, self._consumer.consume, 500, 0.2)
            except Exception:
                log.exception("conformance: reading %s failed; retrying", self.events_topic)
                continue
            seen = [s for s in map(self._of_this_run, messages) if s is not None]
            if seen:
                await self.events.add(seen)

    def _of_this_run(self, msg: Message) -> Seen | None:
        if msg.error() is not None:
            return None
        try:
            envelope = parse_envelope(msg.value() or b"")
        except InvalidMessage:
            return None  # not one of ours, and not the kit's business: no envelope, no run id
        # An answer that lost the run id is still an answer: the check then reports the run id it lacks.
        if envelope.run_id != self.run_id and envelope.causation_id not in self._sent:
            return None
        return Seen(envelope, int(msg.partition() or 0), int(msg.offset() or 0))

    async def close(self) -> None:
        """Stop reading, flush the producer, close the clients. Safe to call more than once."""
        self._stopping = True
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader
        if self._producer is not None:
            await self._producer.close()
        if self._http is not None:
            await self._http.aclose()
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await asyncio.get_running_loop().run_in_executor(self._kafka_thread, consumer.close)
        self._kafka_thread.shutdown(wait=False)

    # --- commands and their answers -----------------------------------------------------------------

    async def send(self, *commands: Envelope) -> None:
        """Publish the commands in this order (one send: same key, same partition, back to back)."""
        assert self._producer is not None, "use the driver inside `async with`"
        self._sent.update(c.message_id for c in commands)
        await self._producer.send_batch([envelope_message(self.commands_topic, c) for c in commands])

    async def answer(self, command: Envelope) -> Envelope:
        """The service's first event caused by `command`; CheckFailed if none came within the timeout."""
        seen = await self.events.wait(lambda: next(iter(self.events.caused_by(command.message_id)), None),
                                      self.timeout_s)
        if seen is None:
            raise CheckFailed(
                f"no event answered {command.type} {command.message_id} within {self.timeout_s:g}s: is "
                f"{self.subject.service} running and consuming {self.commands_topic}? (--timeout "
                "gives a slow service longer)")
        return seen.envelope

    # --- the read API -------------------------------------------------------------------------------

    async def get(self, path: str) -> httpx.Response:
        """GET a path of the read API; CheckFailed saying what to check if it cannot be reached."""
        assert self._http is not None, "use the driver inside `async with`"
        try:
            return await self._http.get(path)
        except httpx.HTTPError as exc:
            raise CheckFailed(
                f"the read API at {self.subject.read_url} did not answer GET {path} ({exc!r}): is the "
                "service running, and does its declaration's endpoints.read point at it?") from exc

    async def read_state(self, entity_type: str, entity_id: str) -> dict[str, Any] | None:
        """The entity's current state from the read API, None on 404."""
        response = await self.get(f"/entities/{entity_type}/{entity_id}")
        if response.status_code == 404:
            return None
        body = _json(response)
        if response.status_code != 200 or not isinstance(body, dict):
            raise CheckFailed(f"GET /entities/{entity_type}/{entity_id} answered {response.status_code} "
                              f"{response.text[:200]!r}, expected 200 with a JSON object or 404")
        return body


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
