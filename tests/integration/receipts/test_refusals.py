"""A component that keeps no receipt chain is refused, never reported as a valid chain of length 0; one that
keeps a chain but has emitted nothing yet is intact at length 0."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.kernel.admin_api import admin_app
from kinshasa.kernel.component import http_server, wait_started
from kinshasa.kernel.database import create_engine
from kinshasa.kernel.dlq import DeadLetterQueue, SqlDeadLetterStore
from kinshasa.kernel.metrics import ComponentMetrics
from kinshasa.kernel.outbox import OutboxStatus
from kinshasa.kernel.receipts import open_chain
from kinshasa.migrations.install import install_kernel_tables
from tests.integration.receipts.conftest import chain_report, kinshasa_cli, running_gateway

TOKEN = "receipts-test-token-" + "x" * 24


def _admin(engine: AsyncEngine, component: str) -> Any:
    metrics = ComponentMetrics(component)
    return admin_app(component, token=TOKEN, metrics=metrics, outbox=OutboxStatus(engine),
                     dlq_api=DeadLetterQueue(component, SqlDeadLetterStore(engine), metrics=metrics))


async def _admin_verify(engine: AsyncEngine, component: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=_admin(engine, component))
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as http:
        return await http.get("/admin/receipts/verify", headers={"Authorization": f"Bearer {TOKEN}"})


async def test_a_store_keeping_no_chain_is_refused_by_the_cli_and_the_admin_endpoint(
    database_url: str,
) -> None:
    engine = create_engine(database_url)
    try:
        # The kernel's tables, receipts included, but no component ever opened a chain here.
        await install_kernel_tables(engine)
        result = await kinshasa_cli("receipts", "verify", "-c", "documents", "--database-url", database_url)
        assert result.code == 2, result.output
        assert "REFUSED: documents" in result.output and "keeps no receipt chain" in result.output
        assert "OK" not in result.output and "length 0" not in result.output

        refused = await _admin_verify(engine, "documents")
        assert refused.status_code == 404
        assert refused.json()["error"]["code"] == "NO_RECEIPT_CHAIN"

        # Opened (the component started) but nothing emitted yet: intact, length 0.
        await open_chain(engine, "documents")
        result = await kinshasa_cli("receipts", "verify", "-c", "documents", "--database-url", database_url)
        assert result.code == 0, result.output
        assert "OK: documents receipt chain intact, 0 receipts verified" in result.output
        answer = await _admin_verify(engine, "documents")
        assert answer.status_code == 200
        assert {k: answer.json()[k] for k in ("component", "length", "verified", "problems")} == {
            "component": "documents", "length": 0, "verified": True, "problems": []}
    finally:
        await engine.dispose()


async def test_every_component_is_checked_and_a_missing_one_refused(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'gateway.sqlite3'}"
    engine = create_engine(url)
    try:
        await install_kernel_tables(engine)
        await open_chain(engine, "gateway")
    finally:
        await engine.dispose()
    # Only the gateway has a database in this data directory: the others cannot be called valid.
    result = await kinshasa_cli("receipts", "verify", env={
        "KINSHASA_DATA_DIR": str(tmp_path / "data"), "KINSHASA_GATEWAY_DATABASE_URL": url})
    assert result.code == 2, result.output
    assert "OK: gateway receipt chain intact, 0 receipts verified" in result.output
    assert "REFUSED: coordinator: no database for coordinator" in result.output
    assert "REFUSED: documents: no database for documents" in result.output


async def test_the_query_reports_a_component_keeping_no_chain_as_not_verified(
    database_url: str, kafka: Any, tmp_path: Path, examples_catalogue: str
) -> None:
    component_url = f"sqlite+aiosqlite:///{tmp_path / 'links.sqlite3'}"
    links = create_engine(component_url)
    server = http_server(_admin(links, "links"), "127.0.0.1", 0)
    serving = asyncio.create_task(server.serve())
    try:
        await install_kernel_tables(links)
        host, port = await wait_started(server, serving, "the admin server did not start")
        async with running_gateway(database_url, kafka.bootstrap, tmp_path / "gw", examples_catalogue,
                                   admin_urls={"links": f"http://{host}:{port}"},
                                   internal_token=TOKEN) as harness:
            report = await chain_report(harness.client, "links")
            assert report["verified"] is False and report["length"] == 0
            problems = report["problems"]
            assert isinstance(problems, list) and len(problems) == 1
            assert problems[0].startswith("links keeps no receipt chain")
    finally:
        server.should_exit = True
        await serving
        await links.dispose()
