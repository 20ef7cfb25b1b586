"""Fixtures of the receipt-chain suite: a real gateway (optionally pointed at other components' admin APIs),
the coordinator suite's fleet of real service processes, and the `kinshasa` CLI run as a process."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy import text

from kinshasa.gateway.app import Gateway
from kinshasa.gateway.settings import GatewayConfig
from kinshasa.kernel.database import create_engine
from kinshasa.settings import StackSettings
from tests.integration.coordinator.conftest import fleet  # noqa: F401  (the coordinator suite's fleet)
from tests.integration.gateway.conftest import OPERATOR_KEY, Client, Harness, registry

REPO = Path(__file__).resolve().parents[3]


@asynccontextmanager
async def running_gateway(database_url: str, bootstrap: str, data_dir: Path, catalogue: str,
                          admin_urls: dict[str, str] | None = None,
                          internal_token: str | None = None) -> AsyncIterator[Harness]:
    """A real gateway on `database_url`, asking `admin_urls` for the other components' chains."""
    settings = GatewayConfig(database_url=database_url, dev_mode=False, releaser_interval_s=0.1,
                             catalogue_topic=catalogue, admin_urls=admin_urls or {},
                             internal_token=internal_token)
    gateway = Gateway(settings, StackSettings(data_dir=data_dir, kafka_bootstrap=bootstrap),
                      registry=registry())
    await gateway.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app),
                                     base_url="http://gateway", timeout=30) as http:
            yield Harness(gateway, Client(http), bootstrap)
    finally:
        await gateway.stop()


REPORT = ("query($c: String!) { receipts(component: $c) { component length verified problems } }")


async def chain_report(client: Client, component: str) -> dict[str, object]:
    data = await client.data(REPORT, {"c": component}, OPERATOR_KEY)
    report: dict[str, object] = data["receipts"]
    return report


@dataclass(frozen=True)
class CliResult:
    code: int
    output: str


async def kinshasa_cli(*args: str, env: dict[str, str] | None = None) -> CliResult:
    """`kinshasa <args>` as an operator runs it: its own process, stdout and stderr together."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kinshasa.cli", *args, cwd=REPO, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await process.communicate()
    return CliResult(process.returncode or 0, out.decode())


async def tamper(database_url: str, sql: str, **params: object) -> None:
    """Change the database as an attacker with access to it would: a plain connection, no Kinshasa code."""
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(sql), params)
    finally:
        await engine.dispose()
