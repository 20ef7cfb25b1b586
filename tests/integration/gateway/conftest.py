"""Fixtures for gateway integration tests: a real gateway on a real database, Kafka read back for real."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.gateway.app import Gateway
from kinshasa.gateway.principals import PrincipalRegistry
from kinshasa.gateway.settings import GatewayConfig
from kinshasa.kernel.outbox import OutboxStatus
from kinshasa.schemas.envelope import Envelope
from kinshasa.settings import StackSettings
from kinshasa.topics.producer import AsyncProducer

AGENT_KEY = "test-agent-key-" + "a" * 40
OTHER_AGENT_KEY = "test-agent-key-" + "b" * 40
OPERATOR_KEY = "test-operator-key-" + "c" * 40
# An agent held to one entry point, which may write and read documents only.
SUPPORT_AGENT_KEY = "test-agent-key-" + "d" * 40

PRINCIPALS = {
    "principals": [
        {"id": "agent-1", "kind": "agent", "scopes": ["*"], "key": AGENT_KEY},
        # Writes documents, reads nothing: a write scope is not a read scope.
        {"id": "agent-2", "kind": "agent", "scopes": ["documents.*"], "key": OTHER_AGENT_KEY},
        {
            "id": "agent-3",
            "kind": "agent",
            "scopes": ["documents.*", "documents:read"],
            "entryPoints": ["support-bot"],
            "key": SUPPORT_AGENT_KEY,
        },
        {"id": "op-1", "kind": "operator", "scopes": ["*"], "key": OPERATOR_KEY},
    ]
}


class Client:
    """A GraphQL client speaking to the gateway's ASGI app in-process (real app, real database)."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def raw(self, body: Any, key: str | None = AGENT_KEY, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if isinstance(body, bytes | str):
            return await self.http.post(
                "/graphql", content=body, headers={**headers, "content-type": "application/json"}, **kwargs
            )
        return await self.http.post("/graphql", json=body, headers=headers, **kwargs)

    async def gql(
        self, query: str, variables: dict[str, Any] | None = None, key: str | None = AGENT_KEY
    ) -> dict[str, Any]:
        response = await self.raw({"query": query, "variables": variables or {}}, key)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def data(
        self, query: str, variables: dict[str, Any] | None = None, key: str | None = AGENT_KEY
    ) -> dict[str, Any]:
        body = await self.gql(query, variables, key)
        assert not body.get("errors"), body
        data: dict[str, Any] = body["data"]
        return data

    async def error(
        self, query: str, variables: dict[str, Any] | None = None, key: str | None = AGENT_KEY
    ) -> dict[str, Any]:
        body = await self.gql(query, variables, key)
        assert body.get("errors"), body
        error: dict[str, Any] = body["errors"][0]
        return error

    async def start_run(self, key: str = AGENT_KEY, entry_point: str = "test") -> str:
        data = await self.data(
            "mutation($e: String!) { startRun(entryPoint: $e) { id } }", {"e": entry_point}, key
        )
        return str(data["startRun"]["id"])

    async def set_policy(
        self,
        settings: dict[str, Any],
        scope: str = "DEFAULT",
        subject: str | None = None,
        loosen: bool = False,
    ) -> None:
        await self.data(
            "mutation($s: PolicyInput!, $scope: PolicyScope!, $sub: String, $l: Boolean!) { setPolicy("
            'scope: $scope, subject: $sub, settings: $s, reason: "test", loosen: $l) { version } }',
            {"s": settings, "scope": scope, "sub": subject, "l": loosen},
            OPERATOR_KEY,
        )

    async def create_document(self, run_id: str, title: str = "t", key: str = AGENT_KEY) -> dict[str, Any]:
        return await self.gql(
            "mutation($r: ID!, $t: String!) { createDocument(runId: $r, input: {title: $t, "
            'body: "b"}) { commandId runId operation entityId status releaseAt } }',
            {"r": run_id, "t": title},
            key,
        )


@dataclass
class Harness:
    gateway: Gateway
    client: Client
    bootstrap: str


async def outbox_drained(engine: AsyncEngine, within_s: float = 30.0) -> None:
    """Wait until the gateway's relay has published every row appended to its outbox so far, each
    acknowledged by the broker, and none went dead: what is on Kafka then is all those rows. The positive
    signal a check that something was *not* published waits for (a held command enters the outbox only
    when it is released)."""
    status = OutboxStatus(engine)
    deadline = time.monotonic() + within_s
    while (backlog := await status.backlog()).pending:
        assert time.monotonic() < deadline, f"the outbox holds {backlog.pending} rows after {within_s} s"
        await asyncio.sleep(0.05)
    assert backlog.dead == 0, f"{backlog.dead} outbox rows went dead instead of being published"


def registry() -> PrincipalRegistry:
    return PrincipalRegistry.from_document(PRINCIPALS)


@pytest.fixture
async def harness(
    database_url: str, kafka: Any, tmp_path: Path, examples_catalogue: str
) -> AsyncIterator[Harness]:
    """The gateway most tests share: its relay and listener on, a fast releaser and metrics cache."""
    async with configured_gateway(database_url, kafka, tmp_path, examples_catalogue, background=True,
                                  releaser_interval_s=0.1, metrics_cache_s=0.1) as served:
        yield served


class TopicReader:
    """Reads whole topics from the beginning with a throwaway group: what is really on Kafka."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap

    def _read(self, topics: list[str], settle_s: float) -> list[Envelope]:
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"test-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        try:
            meta = consumer.list_topics(timeout=10)
            assignments = [
                TopicPartition(t, p) for t in topics if t in meta.topics for p in meta.topics[t].partitions
            ]
            if not assignments:
                return []
            ends = {}
            for tp in assignments:
                ends[(tp.topic, tp.partition)] = _high_watermark(consumer, tp)
            consumer.assign([TopicPartition(tp.topic, tp.partition, 0) for tp in assignments])
            found: list[Envelope] = []
            pending = {k for k, v in ends.items() if v > 0}
            deadline = time.monotonic() + settle_s + 10
            while pending and time.monotonic() < deadline:
                msg = consumer.poll(0.2)
                if msg is None or msg.error():
                    continue
                found.append(Envelope.from_bytes(msg.value()))
                if msg.offset() + 1 >= ends[(msg.topic(), msg.partition())]:
                    pending.discard((msg.topic(), msg.partition()))
            return found
        finally:
            consumer.close()

    async def envelopes(
        self, topics: list[str], run_id: str | None = None, settle_s: float = 0.0
    ) -> list[Envelope]:
        found = await asyncio.to_thread(self._read, topics, settle_s)
        return [e for e in found if run_id is None or e.run_id == run_id]

    async def wait_for(
        self, topics: list[str], run_id: str, count: int, within_s: float = 20.0, type_prefix: str = ""
    ) -> list[Envelope]:
        deadline = time.monotonic() + within_s
        while True:
            found = [e for e in await self.envelopes(topics, run_id) if e.type.startswith(type_prefix)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.3)


def _high_watermark(consumer: Consumer, tp: TopicPartition) -> int:
    # A topic created a moment ago may not have its leader elected yet.
    for attempt in range(50):
        try:
            return int(consumer.get_watermark_offsets(tp, timeout=10)[1])
        except KafkaException:
            if attempt == 49:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


@pytest.fixture
def reader(kafka: Any) -> TopicReader:
    return TopicReader(kafka.bootstrap)


async def publish(bootstrap: str, topic: str, envelope: Envelope) -> None:
    """Publish as a service would (contract shape), through the project's own producer."""
    async with AsyncProducer(bootstrap, client_id="test-service") as producer:
        await producer.send_envelope(topic, envelope)


@asynccontextmanager
async def configured_gateway(
    database_url: str, kafka: Any, tmp_path: Path, catalogue: str, **settings: Any
) -> AsyncIterator[Harness]:
    """A gateway with these settings; by default no relay or listener (`background=True` for them)."""
    config = GatewayConfig(**{"database_url": database_url, "dev_mode": False, "background": False,
                              "catalogue_topic": catalogue, **settings})
    stack = StackSettings(data_dir=tmp_path / "data", kafka_bootstrap=kafka.bootstrap)
    served = Gateway(config, stack, registry=registry())
    await served.start()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=served.app), base_url="http://gateway", timeout=60
        ) as http:
            yield Harness(served, Client(http), kafka.bootstrap)
    finally:
        await served.stop()


@pytest.fixture
def serve(database_url: str, kafka: Any, tmp_path: Path, examples_catalogue: str) -> Callable[..., Any]:
    """`async with serve(**settings) as harness`: a gateway of its own, with these settings."""

    def start(**settings: Any) -> Any:
        return configured_gateway(database_url, kafka, tmp_path, examples_catalogue, **settings)

    return start
