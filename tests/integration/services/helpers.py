"""Builders shared by the service tests: commands as the gateway and the coordinator would send them."""

from __future__ import annotations

import asyncio
import inspect
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.infra.kafka import KafkaBroker
from kinshasa.infra.process import free_port
from kinshasa.kernel.database import create_engine
from kinshasa.kernel.outbox import outbox
from kinshasa.schemas.envelope import Actor, EntityRef, Envelope, deterministic_id, utcnow
from kinshasa.services.kit import Service
from kinshasa.services.kit.dispatcher import CommandDispatcher
from kinshasa.services.kit.install import install_service
from kinshasa.services.kit.runtime import ServiceRuntime, ServiceTopics
from kinshasa.services.registry import example_catalogue
from kinshasa.settings import ServiceSettings, StackSettings, service_env_prefix
from kinshasa.topics.admin import ensure_topics

CATALOGUE = example_catalogue()

AGENT = Actor(kind="agent", id="agent-7")
COORDINATOR = Actor(kind="system", id="coordinator")


def new_entity_id() -> str:
    return str(uuid.uuid4())


def command(
    service: str,
    operation: str,
    payload: dict[str, Any],
    entity_id: str,
    *,
    run_id: str = "run-1",
    message_id: uuid.UUID | None = None,
) -> Envelope:
    """A forward command exactly as docs/contracts.md has the gateway publish it."""
    spec = CATALOGUE.by_command_type(f"{service}.{operation}")
    return Envelope(
        message_id=message_id or uuid.uuid4(),
        type=spec.command_type,
        run_id=run_id,
        actor=AGENT,
        correlation_id=run_id,
        entity=EntityRef(service=service, type=spec.entity_type, id=entity_id),
        occurred_at=utcnow(),
        payload=payload,
    )


def compensate(applied: Envelope, attempt: int = 0) -> Envelope:
    """The coordinator's compensate command for an `*.applied` event (deterministic id per attempt)."""
    command_type = applied.type.rsplit(".", 1)[0]
    return Envelope(
        message_id=deterministic_id("compensate", str(applied.message_id), str(attempt)),
        type=f"{command_type}.compensate",
        run_id=applied.run_id,
        actor=COORDINATOR,
        correlation_id=applied.run_id,
        entity=applied.entity,
        occurred_at=utcnow(),
        payload={"forward_event_id": str(applied.message_id), "forward_type": applied.type},
    )


def document_work(rng: random.Random, docs: list[str]) -> list[Envelope]:
    """Creates, renames, edits, archives and commands the service refuses (renaming an archived or
    missing document), in an order that keeps each document's own commands in sequence."""
    work = [command("documents", "create", {"title": f"t-{d[:4]}", "body": "b0"}, d) for d in docs]
    for i in range(120):
        doc = rng.choice(docs)
        kind = rng.random()
        if kind < 0.5:
            work.append(command("documents", "rename", {"document_id": doc, "title": f"r{i}"}, doc))
        elif kind < 0.8:
            work.append(command("documents", "edit", {"document_id": doc, "body": f"b{i}"}, doc))
        elif kind < 0.9:
            work.append(command("documents", "archive", {"document_id": doc}, doc))
        else:
            missing = new_entity_id()
            work.append(command("documents", "rename", {"document_id": missing, "title": "x"}, missing))
    return work


async def service_engine(url: str, service: Service) -> AsyncEngine:
    engine = create_engine(url)
    await install_service(engine, service)
    return engine


Factory = Callable[[Service], Awaitable[CommandDispatcher]]


@asynccontextmanager
async def dispatchers(*urls: str) -> AsyncIterator[Factory]:
    """Make dispatchers for services: the n-th gets a fresh engine on urls[n], or on the last url once
    they run out. Every engine is disposed on exit."""
    engines: list[AsyncEngine] = []

    async def make(service: Service) -> CommandDispatcher:
        engine = await service_engine(urls[min(len(engines), len(urls) - 1)], service)
        engines.append(engine)
        topics = ServiceTopics.for_service(service.name)
        return CommandDispatcher(service, engine, group=topics.group, events_topic=topics.events)

    try:
        yield make
    finally:
        for engine in engines:
            await engine.dispose()


async def outbox_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(outbox))).scalar_one())


# --- Kafka ---------------------------------------------------------------------------------------


def read_topic(
    bootstrap: str, topic: str, timeout: float = 20.0
) -> list[tuple[bytes | None, bytes, dict[str, bytes]]]:
    """Every message on `topic` right now, from offset 0: (key, value, headers), partition by partition."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
        partitions = sorted(metadata.topics[topic].partitions)
        highs = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1]
            for p in partitions
        }
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        out: list[tuple[bytes | None, bytes, dict[str, bytes]]] = []
        done = {p for p, high in highs.items() if high == 0}
        deadline = time.monotonic() + timeout
        while len(done) < len(partitions):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end within {timeout}s")
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            headers: dict[str, bytes] = {}
            for name, value in list(msg.headers() or []):
                headers[str(name)] = value if isinstance(value, bytes) else str(value or "").encode()
            key = msg.key()
            value = msg.value()
            out.append(
                (
                    key if isinstance(key, bytes) or key is None else str(key).encode(),
                    value if isinstance(value, bytes) else str(value or "").encode(),
                    headers,
                )
            )
            if (msg.offset() or 0) + 1 >= highs[int(msg.partition() or 0)]:
                done.add(int(msg.partition() or 0))
        return out
    finally:
        consumer.close()


def group_caught_up(bootstrap: str, group: str, topic: str) -> bool:
    """True when `group` has committed every partition of `topic` up to its high watermark."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    metadata = admin.list_topics(topic, timeout=10)
    partitions = [TopicPartition(topic, p) for p in metadata.topics[topic].partitions]
    future = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group, partitions)])[group]
    committed = {tp.partition: tp.offset for tp in future.result(timeout=10).topic_partitions}
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{uuid.uuid4().hex}"})
    try:
        for tp in partitions:
            high = probe.get_watermark_offsets(tp, timeout=10)[1]
            if high > 0 and committed.get(tp.partition, -1) < high:
                return False
        return True
    finally:
        probe.close()


def rewind_group(bootstrap: str, group: str, topic: str) -> None:
    """Set the (stopped) group's committed offsets on `topic` back to 0: a full replay on next start."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    metadata = admin.list_topics(topic, timeout=10)
    partitions = [TopicPartition(topic, p, 0) for p in metadata.topics[topic].partitions]
    futures = admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, partitions)])
    result = futures[group].result(timeout=10)
    errors = [tp.error for tp in result.topic_partitions if tp.error is not None]
    if errors:
        raise RuntimeError(f"could not rewind {group} on {topic}: {errors}")


async def wait_for(condition: Any, limit: float = 30.0, what: str = "condition") -> None:
    """Poll an async or sync zero-argument callable until it returns truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {limit}s waiting for {what}")
        await asyncio.sleep(0.1)


# --- in-process service runtime ------------------------------------------------------------------


def make_runtime(
    service: Service,
    kafka: KafkaBroker,
    database_url: str,
    data_dir: Path,
    topics: ServiceTopics,
    *,
    token: str,
    **settings: Any,
) -> ServiceRuntime:
    """A ServiceRuntime on the test broker and database, HTTP on a free port, settings as keyword values.

    Its topics are created here, as `kinshasa topics ensure` does before a deployment starts a service.
    """
    ensure_topics(kafka.bootstrap, topics.specs(service.name))
    stack = StackSettings(kafka_bootstrap=kafka.bootstrap, data_dir=data_dir)
    values = {"database_url": database_url, "admin_port": free_port(), **settings}
    service_settings = ServiceSettings(_env_prefix=service_env_prefix(service.name), **values)
    return ServiceRuntime(service, stack=stack, settings=service_settings, topics=topics, token=token)


class Running:
    """One in-process service runtime and the means to stop it."""

    def __init__(self, runtime: ServiceRuntime) -> None:
        self.runtime = runtime
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(runtime.run(self.stop))

    async def started(self) -> None:
        ready = asyncio.create_task(self.runtime.ready.wait())
        await asyncio.wait([ready, self.task], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if self.task.done():
            self.task.result()  # raises what stopped it
        assert ready.done(), "service did not become ready within 60s"

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 60)
