"""`GET /admin/outbox` on real databases and a real broker: pending rows, their age, dead rows, the DLQ."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.infra.kafka import KafkaBroker
from kinshasa.kernel.admin_api import admin_app
from kinshasa.kernel.dlq import DeadLetterQueue, OutboxDeadLetters, SqlDeadLetterStore
from kinshasa.kernel.metrics import ComponentMetrics
from kinshasa.kernel.outbox import OutboxStatus, append
from kinshasa.kernel.relay import OutboxRelay
from kinshasa.topics.admin import ensure_topics
from kinshasa.topics.catalogue import TopicSpec
from kinshasa.topics.producer import AsyncProducer

TOKEN = "outbox-status-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _client(engine: AsyncEngine) -> httpx.AsyncClient:
    dlq = DeadLetterQueue("documents", SqlDeadLetterStore(engine), outbox=OutboxDeadLetters(engine))
    app = admin_app("documents", token=TOKEN, dlq_api=dlq, metrics=ComponentMetrics("documents"),
                    outbox=OutboxStatus(engine))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin")


async def test_outbox_status_counts_pending_rows_then_the_dead_one_the_relay_gave_up_on(
    kafka: KafkaBroker, unique: str, engine: AsyncEngine
) -> None:
    good = f"status.good.{unique}"
    await asyncio.to_thread(ensure_topics, kafka.bootstrap, [TopicSpec(good, 1)])
    missing = f"status.missing.{unique}"  # never created; the broker does not auto-create topics
    poison = uuid.uuid4()
    async with engine.begin() as conn:
        await append(conn, missing, b"documents:K", b"poison", poison)
        await append(conn, good, b"documents:J", b"one", uuid.uuid4())
        await append(conn, good, b"documents:L", b"two", uuid.uuid4())

    async with _client(engine) as client:
        # No relay has run: all three are pending, and the oldest has an age.
        first = (await client.get("/admin/outbox", headers=AUTH)).json()
        assert first["component"] == "documents"
        assert (first["pending"], first["dead"], first["dlq_count"]) == (3, 0, 0)
        assert first["oldest_pending_age_s"] is not None and first["oldest_pending_age_s"] >= 0

        producer = AsyncProducer(kafka.bootstrap, client_id=f"status-{unique}",
                                 extra_config={"message.timeout.ms": 2000,
                                               "topic.metadata.propagation.max.ms": 100})
        relay = OutboxRelay(engine, producer, max_attempts=2, base_backoff_s=0.05, max_backoff_s=0.1,
                            jitter=0)
        try:
            deadline = time.monotonic() + 60
            dead = 0
            while dead == 0 and time.monotonic() < deadline:
                stats = await relay.run_once()
                dead += stats.dead
                if stats.claimed == 0:
                    await asyncio.sleep(0.05)
            assert dead == 1
        finally:
            await producer.close(5)

        after = (await client.get("/admin/outbox", headers=AUTH)).json()
        assert after == {"component": "documents", "pending": 0, "oldest_pending_age_s": None, "dead": 1,
                         "dlq_count": 1}

        # Reprocessing requeues it: pending again (the topic still does not exist), no longer dead.
        requeued = await client.post("/admin/dlq/reprocess", headers=AUTH,
                                     json={"message_ids": [str(poison)]})
        assert requeued.json()["results"][0]["outcome"] == "requeued"
        again = (await client.get("/admin/outbox", headers=AUTH)).json()
        assert (again["pending"], again["dead"], again["dlq_count"]) == (1, 0, 0)


async def test_outbox_status_needs_the_internal_token(engine: AsyncEngine) -> None:
    async with _client(engine) as client:
        missing = await client.get("/admin/outbox")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "UNAUTHENTICATED"
        wrong = await client.get("/admin/outbox", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "FORBIDDEN"
