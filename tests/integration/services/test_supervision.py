"""A service's roles are supervised: a consumer that dies is named by `/healthz` until it is restarted and
consumes again, and `/metrics` shows it down and then its restart; one that keeps dying stops the service
with an error (the process exits non-zero).

The documents service runs in-process on an isolated copy of its topics, on the real broker and database;
its consumer is made to fail as a fatal client error does (`ConsumerError` out of its fetch) until the
test lets it recover.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Message
from sqlalchemy import func, select

from kinshasa.infra.kafka import KafkaBroker
from kinshasa.kernel.database import create_engine
from kinshasa.kernel.inbox import inbox
from kinshasa.kernel.supervisor import RestartPolicy
from kinshasa.services import documents
from kinshasa.services.kit.runtime import ServiceRuntime, ServiceTopics
from kinshasa.topics.consumer import AsyncConsumer, ConsumerError
from kinshasa.topics.producer import AsyncProducer, envelope_message
from tests.integration.prometheus import scrape, value
from tests.integration.services.helpers import Running, command, make_runtime, new_entity_id, wait_for

TOKEN = "supervision-test-token"


def _runtime(kafka: KafkaBroker, database_url: str, data_dir: Path, topics: ServiceTopics,
             policy: RestartPolicy | None = None) -> ServiceRuntime:
    runtime = make_runtime(documents.documents, kafka, database_url, data_dir, topics, token=TOKEN)
    if policy is not None:
        runtime.options = dataclasses.replace(runtime.options, restart_policy=policy)
    return runtime


def _break_consumer(monkeypatch: pytest.MonkeyPatch, group: str) -> threading.Event:
    """While the returned event is set, every fetch of `group`'s consumer fails as a fatal client error
    would (the event is read on the consumer's own thread)."""
    broken = threading.Event()
    fetch = AsyncConsumer._fetch

    def failing_fetch(self: AsyncConsumer) -> list[Message]:
        if broken.is_set() and self.group_id == group:
            raise ConsumerError("fatal client error (injected by the test): the consumer cannot go on")
        return fetch(self)

    monkeypatch.setattr(AsyncConsumer, "_fetch", failing_fetch)
    return broken


async def _health(url: str, wanted: Callable[[httpx.Response], bool], what: str) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=url) as client:
        found: dict[str, str] = {}

        async def check() -> bool:
            response = await client.get("/healthz")
            found.clear()
            found.update(response.json()["checks"])
            return wanted(response)

        await wait_for(check, 30, what)
    return found


async def test_a_dead_consumer_is_named_by_healthz_until_it_is_restarted_and_then_consumes_again(
    kafka: KafkaBroker, database_url: str, tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = ServiceTopics.for_service("documents", f"t{unique}")
    running = Running(_runtime(kafka, database_url, tmp_path, topics))
    await running.started()
    url = running.runtime.admin_url or ""
    try:
        checks = await _health(url, lambda r: r.status_code == 200, "200 after start")
        assert set(checks) == {"database", "http", "relay", "consumer", "lag", "housekeeping"}

        consumer = {"component": "documents", "role": "consumer"}
        async with httpx.AsyncClient(base_url=url) as http:
            before = await scrape(http, TOKEN)
        assert value(before, "kinshasa_role_restarts_total", **consumer) == 0
        assert value(before, "kinshasa_role_up", **consumer) == 1

        broken = _break_consumer(monkeypatch, topics.group)
        broken.set()
        checks = await _health(url, lambda r: r.status_code == 503, "503 for the dead consumer")
        assert [name for name, why in checks.items() if why != "ok"] == ["consumer"]
        assert checks["consumer"].startswith("failed: consumer is down, restarting since ")
        assert "ConsumerError: fatal client error" in checks["consumer"]

        broken.clear()
        await _health(url, lambda r: r.status_code == 200, "200 again after the restart")
        async with httpx.AsyncClient(base_url=url) as http:
            after = await scrape(http, TOKEN)
        assert value(after, "kinshasa_role_restarts_total", **consumer) >= 1
        assert value(after, "kinshasa_role_state", state="running", **consumer) == 1
        assert value(after, "kinshasa_role_restarts_total", component="documents", role="relay") == 0
        assert value(after, "kinshasa_dlq_size", component="documents") == 0
        doc = new_entity_id()
        create = command("documents", "create", {"title": "after the restart", "body": "b"}, doc)
        async with AsyncProducer(kafka.bootstrap, client_id=f"test-{unique}") as producer:
            await producer.send_batch([envelope_message(topics.commands, create)])
        engine = create_engine(database_url)
        try:
            async def handled() -> bool:
                async with engine.connect() as conn:
                    query = select(func.count()).select_from(inbox).where(
                        inbox.c.message_id == create.message_id)
                    return int((await conn.execute(query)).scalar_one()) == 1

            await wait_for(handled, 30, "the command sent after the restart to be handled")
        finally:
            await engine.dispose()
    finally:
        await running.shutdown()


async def test_a_consumer_that_keeps_dying_stops_the_service_with_an_error(
    kafka: KafkaBroker, database_url: str, tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = ServiceTopics.for_service("documents", f"t{unique}")
    broken = _break_consumer(monkeypatch, topics.group)
    broken.set()
    policy = RestartPolicy(initial_backoff_s=0.05, max_backoff_s=0.1, max_restarts=2, window_s=600)
    running = Running(_runtime(kafka, database_url, tmp_path, topics, policy))
    await running.started()
    with pytest.raises(RuntimeError, match="service documents stopped after a failure") as stopped:
        await asyncio.wait_for(running.task, 60)
    assert "role consumer is not restarted" in str(stopped.value)
    assert "3 times within 600 s" in str(stopped.value)
