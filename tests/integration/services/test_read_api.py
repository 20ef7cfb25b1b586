"""The services' HTTP reads: current state or 404, version history, emails of a run, links of an entity."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.kernel.admin_api import admin_app
from kinshasa.kernel.dlq import DeadLetterQueue, SqlDeadLetterStore
from kinshasa.kernel.metrics import ComponentMetrics
from kinshasa.services import documents, ledger, links
from kinshasa.services.kit import Service
from kinshasa.services.kit.dispatcher import CommandDispatcher
from kinshasa.services.kit.readapi import mount_reads
from kinshasa.services.kit.runtime import ServiceTopics
from tests.integration.services.helpers import command, compensate, new_entity_id, service_engine

TOKEN = "test-token"


def _app(service: Service, engine: AsyncEngine) -> FastAPI:
    dlq = DeadLetterQueue(service.name, SqlDeadLetterStore(engine))
    app = admin_app(service.name, token=TOKEN, dlq_api=dlq, metrics=ComponentMetrics(service.name))
    return mount_reads(app, service, engine)


@pytest.fixture
async def setup(database_url: str) -> AsyncIterator[tuple[str, list[AsyncEngine]]]:
    engines: list[AsyncEngine] = []
    yield database_url, engines
    for engine in engines:
        await engine.dispose()


async def _client(
    service: Service, url: str, engines: list[AsyncEngine]
) -> tuple[httpx.AsyncClient, CommandDispatcher]:
    engine = await service_engine(url, service)
    engines.append(engine)
    topics = ServiceTopics.for_service(service.name)
    dispatcher = CommandDispatcher(service, engine, group=topics.group, events_topic=topics.events)
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=_app(service, engine)), base_url="http://svc"
    )
    return client, dispatcher


async def test_document_reads(setup: tuple[str, list[AsyncEngine]]) -> None:
    client, dispatcher = await _client(documents.documents, *setup)
    doc = new_entity_id()
    created = await dispatcher.handle(command("documents", "create", {"title": "Plan", "body": "b"}, doc))
    await dispatcher.handle(command("documents", "rename", {"document_id": doc, "title": "Plan B"}, doc))
    async with client:
        current = (await client.get(f"/entities/document/{doc}")).json()
        assert (current["title"], current["body"], current["status"], current["version"]) == (
            "Plan B",
            "b",
            "active",
            2,
        )
        assert current["run_id"] == "run-1" and current["actor"] == "agent:agent-7"
        history = (await client.get(f"/entities/document/{doc}/versions")).json()["versions"]
        assert [v["title"] for v in history] == ["Plan", "Plan B"]

        assert created.event is not None
        # Deleting it would drop the later rename: the inverse of the create is refused.
        assert (await dispatcher.handle(compensate(created.event))).kind == "compensation_failed"
        assert (await client.get(f"/entities/document/{doc}")).status_code == 200

        missing = await client.get(f"/entities/document/{new_entity_id()}")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "NOT_FOUND"
        unknown = await client.get(f"/entities/spaceship/{doc}")
        assert unknown.status_code == 404 and "document" in unknown.json()["error"]["message"]
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/admin/dlq")).status_code == 401
        dlq = await client.get("/admin/dlq", headers={"Authorization": f"Bearer {TOKEN}"})
        assert dlq.json()["count"] == 0


async def test_deleted_document_is_404_but_keeps_its_history(setup: tuple[str, list[AsyncEngine]]) -> None:
    client, dispatcher = await _client(documents.documents, *setup)
    doc = new_entity_id()
    created = await dispatcher.handle(command("documents", "create", {"title": "Draft"}, doc))
    assert created.event is not None
    assert (await dispatcher.handle(compensate(created.event))).kind == "compensated"
    async with client:
        assert (await client.get(f"/entities/document/{doc}")).status_code == 404
        history = (await client.get(f"/entities/document/{doc}/versions")).json()["versions"]
        assert [v["status"] for v in history] == ["active", "deleted"]
        assert history[1]["actor"] == "system:coordinator"


async def test_ledger_entry_reads_posted_then_reversed(setup: tuple[str, list[AsyncEngine]]) -> None:
    client, dispatcher = await _client(ledger.ledger, *setup)
    account = new_entity_id()
    await dispatcher.handle(command("ledger", "open_account", {"name": "Ops", "currency": "EUR"}, account))
    posted = await dispatcher.handle(
        command(
            "ledger", "post_entry", {"account_id": account, "amount_cents": 1250, "memo": "fees"}, account
        )
    )
    assert posted.event is not None
    entry_id = posted.event.payload["entry_id"]
    refused = await dispatcher.handle(
        command("ledger", "post_entry", {"account_id": new_entity_id(), "amount_cents": 1}, account)
    )
    assert refused.kind == "rejected"
    async with client:
        body = (await client.get(f"/entities/account/{account}")).json()
        assert body["balance_cents"] == 1250 and body["entries"][0]["status"] == "posted"
        assert (await dispatcher.handle(compensate(posted.event))).kind == "compensated"
        entry = (await client.get(f"/entities/entry/{entry_id}")).json()
        assert entry["status"] == "reversed" and entry["reversed_by"]
        history = (await client.get(f"/entities/entry/{entry_id}/versions")).json()["versions"]
        assert [(v["kind"], v["amount_cents"]) for v in history] == [("posted", 1250), ("reversal", -1250)]
        assert (await client.get(f"/entities/account/{account}")).json()["balance_cents"] == 0


async def test_links_of_an_entity(setup: tuple[str, list[AsyncEngine]]) -> None:
    client, dispatcher = await _client(links.links, *setup)
    first, second = new_entity_id(), new_entity_id()
    await dispatcher.handle(
        command("links", "link", {"from_id": "doc-1", "to_id": "doc-2", "kind": "refs"}, first)
    )
    duplicate = await dispatcher.handle(
        command("links", "link", {"from_id": "doc-1", "to_id": "doc-2", "kind": "refs"}, second)
    )
    assert duplicate.kind == "rejected" and duplicate.event is not None
    assert duplicate.event.payload["code"] == "LINK_DUPLICATE"
    await dispatcher.handle(
        command("links", "link", {"from_id": "doc-3", "to_id": "doc-1", "kind": "owns"}, second)
    )
    async with client:
        found = (await client.get("/entities/link", params={"entity_id": "doc-1"})).json()
        assert sorted(link["id"] for link in found) == sorted([first, second])
        await dispatcher.handle(command("links", "unlink", {"link_id": first}, first))
        assert [
            link["id"] for link in (await client.get("/entities/link", params={"entity_id": "doc-1"})).json()
        ] == [second]
        assert (await client.get(f"/entities/link/{first}")).status_code == 404
        assert (await client.get("/entities/link")).status_code == 400
        assert (await client.get("/entities/link", params={"run_id": "r"})).status_code == 400
        # Each version names the operation that wrote it, from the service's own record of its steps.
        history = (await client.get(f"/entities/link/{first}/versions")).json()["versions"]
        assert [v["operation"] for v in history] == ["links.link", "links.unlink"]
