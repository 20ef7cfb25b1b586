"""The admin endpoint on real databases: bearer auth, DLQ listing and reprocessing, metrics, token file."""

from __future__ import annotations

import asyncio
import os
import stat
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Column, MetaData, String, Table, func, insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.kernel.admin_api import admin_app, load_or_create_internal_token
from kinshasa.kernel.dlq import DeadLetterQueue, SqlDeadLetterStore, dead_letters
from kinshasa.kernel.metrics import (
    CONSUMER_LAG,
    DLQ_SIZE,
    HANDLER_LATENCY,
    OUTBOX_BACKLOG,
    OUTBOX_OLDEST_AGE,
    PUBLISH_FAILURES,
    ComponentMetrics,
)
from kinshasa.schemas.envelope import Actor, EntityRef, Envelope, utcnow
from kinshasa.topics.consumer import Record

GROUP = "kinshasa.svc.documents"
TOKEN = "s3cret-internal-token"

test_metadata = MetaData()
effects = Table("admin_test_effects", test_metadata, Column("message_id", String(64), primary_key=True))


class Applier:
    """A handler that applies each message once (its effect table's key is its inbox); can be broken."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.broken = False

    async def __call__(self, record: Record) -> None:
        envelope = record.envelope()
        if self.broken:
            raise RuntimeError("ledger is read-only during maintenance")
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(effects).values(message_id=str(envelope.message_id)))
        except IntegrityError:
            return

    async def applied(self) -> int:
        async with self.engine.connect() as conn:
            return int(await conn.scalar(select(func.count()).select_from(effects)) or 0)


pytestmark = pytest.mark.schema(dead_letters, test_metadata)


def _poison_record(offset: int) -> tuple[Envelope, Record]:
    envelope = Envelope(message_id=uuid.uuid4(), type="documents.rename", run_id="run-7",
                        actor=Actor(kind="agent", id="agent-7"),
                        entity=EntityRef(service="documents", type="document", id="doc-7"),
                        occurred_at=utcnow(), payload={"title": "new"})
    record = Record(topic="kinshasa.commands.documents", partition=0, offset=offset,
                    key=envelope.kafka_key(), value=envelope.to_bytes(),
                    headers=(("type", envelope.type.encode()),
                             ("message_id", str(envelope.message_id).encode())))
    return envelope, record


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin")


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _setup(engine: AsyncEngine,
                 health_ok: bool = True) -> tuple[FastAPI, Applier, Envelope, ComponentMetrics]:
    store = SqlDeadLetterStore(engine)
    handler = Applier(engine)
    envelope, record = _poison_record(17)
    await store.record(group=GROUP, record=record, message_id=str(envelope.message_id),
                       error="RuntimeError: ledger is read-only", attempts=3, reason="handler_failed")
    metrics = ComponentMetrics("documents")

    async def outbox_numbers() -> tuple[int, float | None]:
        return 4, 12.5

    metrics.set_outbox_callback(outbox_numbers)
    metrics.observe_handler("documents.rename", 0.02)
    metrics.publish_failed("kinshasa.events.documents")
    metrics.set_consumer_lag(GROUP, "kinshasa.commands.documents", 0, 3)

    async def database() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def kafka() -> bool:
        return health_ok

    app = admin_app("documents", token=TOKEN,
                    dlq_api=DeadLetterQueue("documents", store, handlers=handler, metrics=metrics),
                    metrics=metrics, health_checks={"database": database, "kafka": kafka})
    return app, handler, envelope, metrics


async def test_protected_routes_refuse_missing_and_wrong_tokens(engine: AsyncEngine) -> None:
    app, *_ = await _setup(engine)
    async with _client(app) as client:
        for method, path in [("GET", "/admin/dlq"), ("POST", "/admin/dlq/reprocess"), ("GET", "/metrics")]:
            missing = await client.request(method, path, json={"message_ids": ["x"]})
            assert missing.status_code == 401, path
            assert missing.json()["error"]["code"] == "UNAUTHENTICATED"
            assert "Authorization: Bearer" in missing.json()["error"]["message"]
            assert missing.headers["www-authenticate"].startswith("Bearer")
            wrong = await client.request(method, path, json={"message_ids": ["x"]},
                                         headers={"Authorization": "Bearer not-the-token"})
            assert wrong.status_code == 403, path
            assert wrong.json()["error"]["code"] == "FORBIDDEN"
            assert "internal-token" in wrong.json()["error"]["message"]
            basic = await client.request(method, path, headers={"Authorization": "Basic dXNlcjpwdw=="})
            assert basic.status_code == 401


async def test_healthz_is_open_and_reports_each_check(engine: AsyncEngine) -> None:
    app, *_ = await _setup(engine)
    async with _client(app) as client:
        ok = await client.get("/healthz")
    assert ok.status_code == 200
    assert ok.json() == {"component": "documents", "status": "ok",
                         "checks": {"database": "ok", "kafka": "ok"}}
    app, *_ = await _setup(engine, health_ok=False)
    async with _client(app) as client:
        bad = await client.get("/healthz")
    assert bad.status_code == 503
    assert bad.json()["status"] == "degraded" and bad.json()["checks"]["kafka"].startswith("failed")


async def test_dlq_listing_and_reprocessing(engine: AsyncEngine) -> None:
    app, handler, envelope, _ = await _setup(engine)
    async with _client(app) as client:
        listing = await client.get("/admin/dlq", params={"limit": 10}, headers=AUTH)
        assert listing.status_code == 200
        body = listing.json()
        assert body["component"] == "documents" and body["count"] == 1
        [entry] = body["entries"]
        assert entry["message_id"] == str(envelope.message_id)
        assert entry["attempts"] == 3 and "read-only" in entry["error"]
        assert entry["source"] == {"topic": "kinshasa.commands.documents", "partition": 0, "offset": 17}
        assert entry["value"] == envelope.to_bytes().decode()

        bad_limit = await client.get("/admin/dlq", params={"limit": 0}, headers=AUTH)
        assert bad_limit.status_code == 422 and bad_limit.json()["error"]["code"] == "VALIDATION"
        empty = await client.post("/admin/dlq/reprocess", json={"message_ids": []}, headers=AUTH)
        assert empty.status_code == 422 and empty.json()["error"]["problems"]

        # Still broken: the entry stays, with the new error.
        handler.broken = True
        failed = await client.post("/admin/dlq/reprocess", headers=AUTH,
                                   json={"message_ids": [str(envelope.message_id)]})
        assert failed.status_code == 200
        assert failed.json()["results"][0]["outcome"] == "failed"
        assert failed.json()["count"] == 1

        handler.broken = False
        done = await client.post("/admin/dlq/reprocess", headers=AUTH,
                                 json={"message_ids": [str(envelope.message_id), "unknown-id"]})
        assert done.status_code == 200
        results = done.json()["results"]
        assert [r["outcome"] for r in results] == ["reprocessed", "not_found"]
        assert done.json()["count"] == 0
        again = await client.post("/admin/dlq/reprocess", headers=AUTH,
                                  json={"message_ids": [str(envelope.message_id)]})
        assert again.json()["results"][0]["outcome"] == "already_reprocessed"
        assert (await client.get("/admin/dlq", headers=AUTH)).json() == {
            "component": "documents", "count": 0, "entries": []}
    assert await handler.applied() == 1


async def test_metrics_serve_every_metric_name(engine: AsyncEngine) -> None:
    app, *_ = await _setup(engine)
    async with _client(app) as client:
        response = await client.get("/metrics", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    body = response.text
    for name in (OUTBOX_BACKLOG, OUTBOX_OLDEST_AGE, PUBLISH_FAILURES, DLQ_SIZE, HANDLER_LATENCY,
                 CONSUMER_LAG):
        assert name in body, name
    assert f'{OUTBOX_BACKLOG}{{component="documents"}} 4.0' in body
    assert f'{OUTBOX_OLDEST_AGE}{{component="documents"}} 12.5' in body
    assert f'{DLQ_SIZE}{{component="documents"}} 1.0' in body
    assert (f'{CONSUMER_LAG}{{component="documents",group="{GROUP}",partition="0",'
            'topic="kinshasa.commands.documents"} 3.0') in body


def test_internal_token_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    token = load_or_create_internal_token(data_dir)
    path = data_dir / "internal-token"
    assert len(token) >= 32 and path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_internal_token(data_dir) == token
    assert load_or_create_internal_token(data_dir, configured="from-settings") == "from-settings"
    os.chmod(path, 0o644)
    assert load_or_create_internal_token(data_dir) == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_concurrent_starts_agree_on_one_token(tmp_path: Path) -> None:
    async def many() -> set[str]:
        results = await asyncio.gather(*(asyncio.to_thread(load_or_create_internal_token, tmp_path)
                                         for _ in range(8)))
        return set(results)

    assert len(asyncio.run(many())) == 1


def test_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="admin token is empty"):
        admin_app("documents", token=" ", dlq_api=None, metrics=ComponentMetrics("documents"))  # type: ignore[arg-type]
