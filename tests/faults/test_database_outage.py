"""Fault 7: the database unavailable for a few seconds. Under a service, commands wait and then apply
in order, and nothing is dead-lettered; under the gateway, an agent gets a clean, retryable
BACKEND_UNAVAILABLE and its retry with the same idempotency key is written once."""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kinshasa.gateway.app import Gateway
from kinshasa.gateway.settings import GatewayConfig
from kinshasa.infra.kafka import KafkaBroker
from kinshasa.infra.postgres import PostgresCluster
from kinshasa.infra.process import free_port
from kinshasa.services import documents
from kinshasa.services.kit.runtime import ServiceTopics
from kinshasa.settings import StackSettings
from kinshasa.topics.producer import AsyncProducer, envelope_message
from tests.integration.gateway.conftest import OPERATOR_KEY, Client, registry
from tests.integration.services.helpers import Running, command, make_runtime, new_entity_id, wait_for

TOKEN = "outage-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RETRYING = re.compile(r'kinshasa_handler_latency_seconds_count\{[^}]*outcome="retrying"[^}]*\} (\d+)')


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of this test's own: it is stopped mid-test, so it cannot be the session's."""
    # Not under pytest's tmp dir: that is private to root, and the server runs unprivileged.
    root = Path(tempfile.mkdtemp(prefix="kinshasa-outage-"))
    own = PostgresCluster(root=root, port=free_port())
    own.start(attached=True)
    try:
        yield own
    finally:
        own.stop()
        shutil.rmtree(root, ignore_errors=True)


async def _retries(client: httpx.AsyncClient) -> int:
    """How often the service's handlers met unavailable infrastructure, from its own metrics."""
    metrics = (await client.get("/metrics", headers=AUTH)).text
    return sum(int(n) for n in RETRYING.findall(metrics))


async def test_commands_wait_for_the_database_and_apply_in_order(
        kafka: KafkaBroker, cluster: PostgresCluster, tmp_path: Path, unique: str) -> None:
    topics = ServiceTopics.for_service("documents", f"outage{unique}")
    running = Running(make_runtime(documents.documents, kafka, cluster.url, tmp_path, topics, token=TOKEN))
    await running.started()
    doc = new_entity_id()
    titles = [f"title {n:02d}" for n in range(1, 31)]
    first = [command("documents", "create", {"title": "created", "body": "b"}, doc)]
    first += [command("documents", "rename", {"document_id": doc, "title": t}, doc) for t in titles[:10]]
    later = [command("documents", "rename", {"document_id": doc, "title": t}, doc) for t in titles[10:]]
    try:
        async with (AsyncProducer(kafka.bootstrap, client_id=f"outage-{unique}") as producer,
                    httpx.AsyncClient(base_url=running.runtime.admin_url or "") as client):

            async def versions() -> list[dict[str, Any]]:
                answer = await client.get(f"/entities/document/{doc}/versions")
                return list(answer.json()["versions"]) if answer.status_code == 200 else []

            await producer.send_batch([envelope_message(topics.commands, c) for c in first])
            await wait_for(lambda: _count(versions, 11), 60, "the first commands to apply")

            cluster.stop()
            await producer.send_batch([envelope_message(topics.commands, c) for c in later])
            # The service meets the outage: its handler is retried, not dead-lettered.
            await wait_for(lambda: _at_least(_retries(client), 2), 60, "the service to retry")
            await asyncio.to_thread(cluster.start, True)

            await wait_for(lambda: _count(versions, 31), 90, "every command to apply once it is back")
            applied = await versions()
            assert [v["title"] for v in applied] == ["created", *titles]  # in order, once each
            dlq = (await client.get("/admin/dlq", headers=AUTH)).json()
            assert dlq["count"] == 0
    finally:
        await running.shutdown()


async def _count(versions: Any, n: int) -> bool:
    return len(await versions()) >= n


async def _at_least(value: Any, n: int) -> bool:
    return int(await value) >= n


async def test_an_agent_gets_a_retryable_error_while_the_gateways_database_is_down(
        kafka: KafkaBroker, cluster: PostgresCluster, tmp_path: Path, examples_catalogue: str) -> None:
    settings = GatewayConfig(database_url=cluster.url, dev_mode=False, catalogue_topic=examples_catalogue)
    gateway = Gateway(settings, StackSettings(data_dir=tmp_path / "data", kafka_bootstrap=kafka.bootstrap),
                      registry=registry())
    await gateway.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app), base_url="http://gateway",
                                     timeout=60) as http:
            c = Client(http)
            await c.set_policy({"quarantineWindowS": 0})
            run_id = await c.start_run()
            write = ('mutation($r: ID!) { createDocument(runId: $r, input: {title: "t", body: "b"}, '
                     'idempotencyKey: "outage-1") { commandId status } }')

            cluster.stop()
            refused = await c.error(write, {"r": run_id})
            assert refused["extensions"]["code"] == "BACKEND_UNAVAILABLE", refused
            assert refused["extensions"]["retryAfterS"] > 0
            assert "127.0.0.1" not in refused["message"] and "postgres" not in refused["message"].lower()

            await asyncio.to_thread(cluster.start, True)
            accepted = (await c.data(write, {"r": run_id}))["createDocument"]
            again = (await c.data(write, {"r": run_id}))["createDocument"]
            assert accepted == again and accepted["status"] == "PUBLISHED"
            listed = f'{{ run(id: "{run_id}") {{ commands {{ commandId }} }} }}'
            commands = await c.data(listed, key=OPERATOR_KEY)
            assert commands["run"]["commands"] == [{"commandId": accepted["commandId"]}]
    finally:
        await gateway.stop()
