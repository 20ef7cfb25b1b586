"""The durability surface through a real gateway: `outboxStatus` and the `dlq_threshold` alert.

A real notifier runs in-process on its own database, with a real SMTP sink that refuses a listed
mailbox: an email to it fails three times and is dead-lettered, a real dead letter. The gateway polls
every 0.2 s. Polls are counted (`DurabilityWatcher.polls`), so "no second alert" is checked after polls
that happened, never after a sleep.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from kinshasa.gateway.app import Gateway
from kinshasa.gateway.durability import (
    ComponentDurability,
    DurabilityWatcher,
    Limits,
    alarms,
    install_durability_tables,
)
from kinshasa.gateway.settings import GatewayConfig
from kinshasa.gateway.store import alerts, install_gateway_tables
from kinshasa.infra.kafka import KafkaBroker
from kinshasa.infra.process import free_port
from kinshasa.kernel.database import create_engine
from kinshasa.kernel.outbox import outbox
from kinshasa.migrations.install import install_kernel_tables
from kinshasa.schemas.envelope import Envelope
from kinshasa.services import notifier
from kinshasa.services.kit.runtime import ServiceTopics
from kinshasa.services.smtp_sink import REFUSE_FILE, SmtpSink
from kinshasa.settings import StackSettings
from kinshasa.topics.catalogue import ALERTS
from kinshasa.topics.producer import AsyncProducer
from tests.integration.gateway.conftest import AGENT_KEY, OPERATOR_KEY, Client, TopicReader, registry
from tests.integration.services.helpers import Running, command, make_runtime, new_entity_id, wait_for

TOKEN = "durability-test-token"
STATUS = "{ outboxStatus { component pending oldestPendingAgeS dead dlqCount error } }"
ALERT_FIELDS = "id runId kind source summary threshold { name count limit } details webhookStatus"


class Webhook:
    """A real HTTP receiver for the alert webhook, on a thread."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Webhook:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Stack:
    gateway: Gateway
    client: Client
    notifier: Running
    topics: ServiceTopics
    mail_dir: Path
    webhook: Webhook
    bootstrap: str

    async def send_email(self, to: str) -> Envelope:
        envelope = command("notifier", "send_email", {"to": to, "subject": "s", "body": "hello"},
                           new_entity_id(), run_id="run-durability")
        async with AsyncProducer(self.bootstrap, client_id="test-durability") as producer:
            await producer.send_envelope(self.topics.commands, envelope)
        return envelope

    async def threshold_alerts(self) -> list[dict[str, Any]]:
        data = await self.client.data(
            f'{{ alerts(kind: "dlq_threshold") {{ {ALERT_FIELDS} }} }}', key=OPERATOR_KEY
        )
        found: list[dict[str, Any]] = data["alerts"]
        return found

    async def polls(self, count: int) -> None:
        await self.gateway.durability.wait_polls(count, 30)


@pytest.fixture
async def stack(
    kafka: KafkaBroker, database_url: str, other_database_url: str, tmp_path: Path, examples_catalogue: str,
    unique: str,
) -> AsyncIterator[Stack]:
    topics = ServiceTopics.for_service("notifier", f"t{unique}")
    mail_dir = tmp_path / "mail"
    mail_dir.mkdir()
    smtp_port = free_port()
    with SmtpSink(mail_dir, port=smtp_port), Webhook() as webhook:
        running = Running(make_runtime(notifier.notifier, kafka, other_database_url, tmp_path, topics,
                                       token=TOKEN, smtp_port=smtp_port))
        await running.started()
        settings = GatewayConfig(
            database_url=database_url, dev_mode=False, catalogue_topic=examples_catalogue,
            internal_token=TOKEN,
            admin_urls={"notifier": running.runtime.admin_url or "", "ghost": f"http://127.0.0.1:{free_port()}"},
            dlq_alert_interval_s=0.2, alert_webhook_url=webhook.url,
        )
        gateway = Gateway(settings, StackSettings(data_dir=tmp_path / "gw", kafka_bootstrap=kafka.bootstrap),
                          registry=registry())
        await gateway.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app),
                                         base_url="http://gateway", timeout=30) as http:
                yield Stack(gateway, Client(http), running, topics, mail_dir, webhook, kafka.bootstrap)
        finally:
            await gateway.stop()
            await running.shutdown()


async def test_outbox_status_lists_every_component_and_says_which_did_not_answer(stack: Stack) -> None:
    # `ghost` is configured but not running: it is listed with its error, as in `dlq`.
    found = {c["component"]: c for c in (await stack.client.data(STATUS, key=OPERATOR_KEY))["outboxStatus"]}
    assert sorted(found) == ["gateway", "ghost", "notifier"]
    for name in ("gateway", "notifier"):
        entry = found[name]
        assert entry["error"] is None, entry
        assert all(isinstance(entry[k], int) for k in ("pending", "dead", "dlqCount")), entry
        assert (entry["dead"], entry["dlqCount"]) == (0, 0)
    ghost = found["ghost"]
    assert ghost["pending"] is ghost["dead"] is ghost["dlqCount"] is None
    assert "ghost did not answer" in ghost["error"] and "127.0.0.1" not in ghost["error"]

    # The numbers are the component's own /admin/outbox answer.
    async with httpx.AsyncClient(base_url=stack.notifier.runtime.admin_url or "") as admin:
        direct = (await admin.get("/admin/outbox", headers={"Authorization": f"Bearer {TOKEN}"})).json()
    assert direct["component"] == "notifier" and direct["pending"] == found["notifier"]["pending"]


async def test_outbox_status_is_refused_to_agents(stack: Stack) -> None:
    error = await stack.client.error(STATUS, key=AGENT_KEY)
    assert error["extensions"]["code"] == "FORBIDDEN"
    assert "operator" in error["message"]


async def test_a_dead_letter_raises_one_alert_per_crossing(stack: Stack, reader: TopicReader) -> None:
    await stack.polls(2)
    assert await stack.threshold_alerts() == []

    (stack.mail_dir / REFUSE_FILE).write_text("first@example.org\n")
    poison = await stack.send_email("first@example.org")
    await wait_for(stack.threshold_alerts, 90, "the first dlq_threshold alert")
    [alert] = await stack.threshold_alerts()
    assert alert["id"] == (await _alarm(stack.gateway.engine, "notifier"))["alert_id"]
    assert (alert["runId"], alert["kind"], alert["source"]) == ("", "dlq_threshold", "gateway")
    assert alert["threshold"] == {"name": "dlq_count", "count": 1.0, "limit": 1.0}
    assert alert["details"]["component"] == "notifier" and alert["details"]["dlq_count"] == 1
    assert "notifier has 1 dead letter(s)" in alert["summary"] and "reprocessDlq" in alert["summary"]

    # Still over on the polls that follow: no second alert.
    await stack.polls(3)
    assert len(await stack.threshold_alerts()) == 1

    # Like the other alerts: on kinshasa.alerts (keyed by the component) and to the webhook.
    async def on_topic() -> list[Envelope]:
        return [e for e in await reader.envelopes([ALERTS]) if str(e.message_id) == alert["id"]]

    await wait_for(on_topic, 30, "the alert on kinshasa.alerts")
    [published] = await on_topic()
    assert published.type == "alert.dlq_threshold" and published.kafka_key() == b"kinshasa:notifier"
    assert published.payload["component"] == "notifier" and published.payload["dlq_count"] == 1
    await wait_for(lambda: [h for h in stack.webhook.received if h["alert_id"] == alert["id"]], 30,
                   "the webhook delivery")

    # The mailbox is back; the reprocess empties the DLQ and re-arms the alert.
    (stack.mail_dir / REFUSE_FILE).unlink()
    reprocessed = await stack.client.data(
        'mutation($ids: [String!]!) { reprocessDlq(component: "notifier", messageIds: $ids) '
        "{ count results } }", {"ids": [str(poison.message_id)]}, OPERATOR_KEY,
    )
    assert reprocessed["reprocessDlq"]["count"] == 0
    assert reprocessed["reprocessDlq"]["results"][0]["outcome"] == "reprocessed"

    async def rearmed() -> bool:
        return not (await _alarm(stack.gateway.engine, "notifier"))["over"]

    await wait_for(rearmed, 30, "the alarm re-armed")
    assert len(await stack.threshold_alerts()) == 1

    # A new dead letter is a new crossing: a second alert.
    (stack.mail_dir / REFUSE_FILE).write_text("second@example.org\n")
    await stack.send_email("second@example.org")
    await wait_for(lambda: _count(stack, 2), 90, "the second dlq_threshold alert")
    await stack.polls(3)
    second = await _alarm(stack.gateway.engine, "notifier")
    assert second["crossings"] == 2
    assert [a["id"] for a in await stack.threshold_alerts()] == [second["alert_id"], alert["id"]]


async def _count(stack: Stack, n: int) -> bool:
    return len(await stack.threshold_alerts()) >= n


async def _alarm(engine: Any, component: str) -> dict[str, Any]:
    async with engine.connect() as conn:
        row = (await conn.execute(select(alarms).where(alarms.c.component == component))).mappings().one()
    return dict(row)


# --- replicas and restarts share the alarm state -------------------------------------------------------


class Readings:
    """What the components report, set by the test (the HTTP reads are covered above)."""

    def __init__(self) -> None:
        self.dlq = 0

    async def __call__(self) -> list[ComponentDurability]:
        return [ComponentDurability("ledger", pending=0, dead=0, dlq_count=self.dlq)]


@pytest.fixture
async def gateway_db(database_url: str) -> AsyncIterator[Any]:
    engine = create_engine(database_url)
    await install_kernel_tables(engine)
    await install_gateway_tables(engine)
    await install_durability_tables(engine)
    try:
        yield engine
    finally:
        await engine.dispose()


async def test_replicas_and_a_restart_raise_each_crossing_once(gateway_db: Any) -> None:
    readings = Readings()
    limits = Limits(dlq_count=1, age_s=300)

    def replica() -> DurabilityWatcher:
        return DurabilityWatcher(gateway_db, readings, limits, interval_s=0.05)

    a, b = replica(), replica()
    readings.dlq = 2
    # Two replicas see the crossing at the same moment: one alert.
    raised = await asyncio.gather(a.poll_once(), b.poll_once())
    assert sum(len(r) for r in raised) == 1
    await asyncio.gather(a.poll_once(), b.poll_once())
    # A gateway restarting while the component is still over raises nothing either.
    assert await replica().poll_once() == []

    readings.dlq = 0
    await b.poll_once()  # back under, seen by one replica: re-armed for all
    readings.dlq = 1
    second = await asyncio.gather(a.poll_once(), b.poll_once(), replica().poll_once())
    assert [x.payload["crossing"] for r in second for x in r] == [2]

    first_id = [x.alert_id for r in raised for x in r]
    second_id = [x.alert_id for r in second for x in r]
    async with gateway_db.connect() as conn:
        stored = [r.alert_id for r in await conn.execute(select(alerts.c.alert_id))]
        emitted = (await conn.execute(select(outbox.c.topic, outbox.c.key, outbox.c.message_id))).all()
    assert sorted(stored) == sorted(first_id + second_id)
    assert sorted((t, k, str(m)) for t, k, m in emitted) == sorted(
        (ALERTS, b"kinshasa:ledger", i) for i in first_id + second_id
    )
    assert (await _alarm(gateway_db, "ledger"))["alert_id"] == second_id[0]
