"""Fault 2: the broker SIGSTOPped for 20 s while a service consumes and the gateway accepts. The gateway
keeps accepting (its writes need only its database), and once the broker runs again every accepted
command is applied, once, in order."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from kinshasa.gateway.app import Gateway
from kinshasa.gateway.settings import GatewayConfig
from kinshasa.infra.kafka import KafkaBroker
from kinshasa.services import documents
from kinshasa.services.kit.runtime import ServiceTopics
from kinshasa.settings import StackSettings
from tests.faults.brokers import broker_pid
from tests.integration.gateway.conftest import OPERATOR_KEY, Client, registry
from tests.integration.services.helpers import Running, make_runtime, wait_for

PAUSE_S = 20.0
# The broker's lease outlasts the pause, so its controller does not fence it on waking. A fenced lone
# broker answers metadata listing no broker, and librdkafka 2.16 then left the service's consumer-group
# member without a coordinator for the rest of the run: 2 runs in 5 failed that way with KRaft's 9 s
# lease. That is a fault of its own, with no cure here yet ("Kafka with a single broker" in
# docs/operations.md); this test is about the pause. The lease is this broker's alone: it cannot be
# longer in general, because a broker restarted after a crash cannot register again until its old
# lease expires.
LEASE_MS = str(int(PAUSE_S * 2 * 1000))
TOKEN = "pause-test-token"
RENAME = ('mutation($r: ID!, $d: ID!, $t: String!, $k: String!) { renameDocument(runId: $r, documentId: $d, '
          "title: $t, idempotencyKey: $k) { commandId status } }")


@pytest.fixture
def broker_overrides() -> dict[str, str]:
    return {"broker.session.timeout.ms": LEASE_MS}


async def test_a_paused_broker_loses_nothing_and_applies_nothing_twice(
        broker: KafkaBroker, tmp_path: Path) -> None:
    service = Running(make_runtime(documents.documents, broker, f"sqlite+aiosqlite:///{tmp_path / 'docs.db'}",
                                   tmp_path / "svc", ServiceTopics.for_service("documents"), token=TOKEN))
    await service.started()
    settings = GatewayConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}", dev_mode=False,
                             releaser_interval_s=0.1)
    gateway = Gateway(settings, StackSettings(data_dir=tmp_path / "gw", kafka_bootstrap=broker.bootstrap),
                      registry=registry())
    await gateway.start()
    paused = False
    try:
        async with (httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app),
                                      base_url="http://gateway", timeout=60) as http,
                    httpx.AsyncClient(base_url=service.runtime.admin_url or "") as svc):
            c = Client(http)
            # The service published its declaration at start: the gateway serves its mutations.
            await wait_for(lambda: _has_rename(c), 60, "renameDocument in the gateway's schema")
            await c.set_policy({"quarantineWindowS": 0, "maxVelocity": 10_000, "maxWrites": 10_000})
            run_id = await c.start_run()
            created = (await c.create_document(run_id, "paused"))["data"]["createDocument"]
            doc = created["entityId"]

            async def receipt(command_id: str) -> dict[str, Any]:
                found: dict[str, Any] = (await c.data(f'{{ command(id: "{command_id}") {{ status }} }}'))
                return found["command"]

            await wait_for(lambda: _status_is(receipt(created["commandId"]), "APPLIED"), 60, "the create")

            titles = [f"v{n:03d}" for n in range(1, 61)]
            accepted: list[str] = []
            for n, title in enumerate(titles):
                if n == 20:
                    os.kill(broker_pid(broker), signal.SIGSTOP)
                    paused, paused_at = True, time.monotonic()
                if paused and time.monotonic() - paused_at >= PAUSE_S:
                    os.kill(broker_pid(broker), signal.SIGCONT)
                    paused = False
                answer = await c.data(RENAME, {"r": run_id, "d": doc, "t": title, "k": f"pause-{n}"})
                assert answer["renameDocument"]["status"] == "PUBLISHED"  # accepted while the broker sleeps
                accepted.append(answer["renameDocument"]["commandId"])
                if paused:
                    await asyncio.sleep(PAUSE_S / 40)  # writes spread over the pause: it is the fault
            if paused:
                await asyncio.sleep(max(0.0, PAUSE_S - (time.monotonic() - paused_at)))
                os.kill(broker_pid(broker), signal.SIGCONT)
                paused = False

            await wait_for(lambda: _all_applied(c, run_id, 61), 120, "every accepted command applied")
            versions = (await svc.get(f"/entities/document/{doc}/versions")).json()["versions"]
            assert [v["title"] for v in versions] == ["paused", *titles]  # once each, in order
            service_dlq = await svc.get("/admin/dlq", headers={"Authorization": f"Bearer {TOKEN}"})
            assert service_dlq.json()["count"] == 0
            gateway_dlq = await c.data("{ dlq(component: \"gateway\") { count } }", key=OPERATOR_KEY)
            assert gateway_dlq["dlq"] == [{"count": 0}]
    finally:
        if paused:
            os.kill(broker_pid(broker), signal.SIGCONT)
        await gateway.stop()
        await service.shutdown()


async def _has_rename(c: Client) -> bool:
    body = await c.gql("{ operations { mutation } }")
    return any(o["mutation"] == "renameDocument" for o in (body.get("data") or {}).get("operations") or [])


async def _status_is(found: Any, status: str) -> bool:
    return bool((await found)["status"] == status)


async def _all_applied(c: Client, run_id: str, n: int) -> bool:
    query = f'{{ run(id: "{run_id}") {{ commands(first: 200) {{ status }} }} }}'
    data = await c.data(query, key=OPERATOR_KEY)
    statuses = [cmd["status"] for cmd in data["run"]["commands"]]
    return len(statuses) == n and set(statuses) == {"APPLIED"}
