"""The gateway's background tasks are supervised: one that dies is named by `/healthz` (503) until the
supervisor has restarted it, and then it works again; `/metrics` shows it down, then its restart.

Real gateway, real database, real broker: the listener's Kafka consumer is made to fail the way a fatal
client error does (`ConsumerError` out of its fetch), for every consumer the gateway builds, until the
test lets it recover; recovery is proved by an alert published afterwards reaching the `alerts` query,
which only the listener can have put there.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Message

from kinshasa.gateway.app import Gateway
from kinshasa.gateway.listener import GROUP
from kinshasa.gateway.settings import GatewayConfig
from kinshasa.kernel.database import create_engine
from kinshasa.kernel.outbox import OutboxStatus
from kinshasa.kernel.relay import OutboxRelay, RelayStats
from kinshasa.kernel.supervisor import GaveUp, RestartPolicy
from kinshasa.schemas.envelope import Actor, Envelope, utcnow
from kinshasa.settings import StackSettings
from kinshasa.topics.catalogue import ALERTS
from kinshasa.topics.consumer import AsyncConsumer, ConsumerError
from tests.integration.gateway.conftest import OPERATOR_KEY, Client, Harness, publish, registry
from tests.integration.prometheus import scrape, scrape_until, value


async def _health_until(http: httpx.AsyncClient, wanted: Callable[[httpx.Response], bool],
                        what: str, within_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    while True:
        response = await http.get("/healthz")
        if wanted(response):
            body: dict[str, Any] = response.json()
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"/healthz never {what} within {within_s} s; last: {response.text}")
        await asyncio.sleep(0.05)


async def _alert_ids(harness: Harness, run_id: str) -> set[str]:
    data = await harness.client.data("query($r: ID) { alerts(runId: $r) { id } }", {"r": run_id},
                                     OPERATOR_KEY)
    return {alert["id"] for alert in data["alerts"]}


def _alert(run_id: str) -> Envelope:
    return Envelope(message_id=uuid.uuid4(), type="alert.ledger_lagging", run_id=run_id,
                    actor=Actor(kind="system", id="coordinator"), correlation_id=run_id,
                    occurred_at=utcnow(), payload={"lag": 1200})


def _break_listener(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """While the returned event is set, every fetch of the gateway listener's consumer fails as a fatal
    client error would (the event is read on the consumer's own thread)."""
    broken = threading.Event()
    fetch = AsyncConsumer._fetch

    def failing_fetch(self: AsyncConsumer) -> list[Message]:
        if broken.is_set() and self.group_id == GROUP:
            raise ConsumerError("fatal client error (injected by the test): the consumer cannot go on")
        return fetch(self)

    monkeypatch.setattr(AsyncConsumer, "_fetch", failing_fetch)
    return broken


async def test_a_dead_listener_is_named_by_healthz_until_it_is_restarted_and_then_hears_again(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    http = harness.client.http
    healthy = await _health_until(http, lambda r: r.status_code == 200, "answered 200 after start")
    assert set(healthy["checks"]) == {"database", "catalogue", "releaser", "relay", "housekeeping",
                                      "durability", "listener"}

    token = harness.gateway.internal_token
    listener = {"component": "gateway", "role": "listener"}
    before = await scrape(http, token)
    assert value(before, "kinshasa_role_up", **listener) == 1
    assert value(before, "kinshasa_role_restarts_total", **listener) == 0
    for role in healthy["checks"]:
        if role != "database":
            assert value(before, "kinshasa_role_state", component="gateway", role=role, state="running") == 1

    broken = _break_listener(monkeypatch)
    broken.set()
    down = await _health_until(http, lambda r: r.status_code == 503, "answered 503 for the dead listener")
    assert down["status"] == "degraded"
    failed = {name: why for name, why in down["checks"].items() if why != "ok"}
    assert list(failed) == ["listener"], down
    assert failed["listener"].startswith("failed: listener is down, restarting since ")
    assert "ConsumerError: fatal client error" in failed["listener"]
    assert harness.gateway.supervisor.health()["listener"].restarts >= 1

    broken.clear()
    await _health_until(http, lambda r: r.status_code == 200, "answered 200 again after the restart")
    assert harness.gateway.supervisor.health()["listener"].state == "running"
    after = await scrape(http, token)
    assert value(after, "kinshasa_role_restarts_total", **listener) >= 1
    assert value(after, "kinshasa_role_up", **listener) == 1
    assert value(after, "kinshasa_role_restarts_total", component="gateway", role="relay") == 0

    # The restarted listener consumes again: an alert published now is stored.
    run_id = await harness.client.start_run(entry_point="supervision")
    alert = _alert(run_id)
    await publish(harness.bootstrap, ALERTS, alert)
    deadline = time.monotonic() + 30
    while str(alert.message_id) not in await _alert_ids(harness, run_id):
        assert time.monotonic() < deadline, "the restarted listener never stored the alert"
        await asyncio.sleep(0.2)


async def test_a_listener_that_keeps_dying_makes_the_gateway_give_up_and_say_so(
    database_url: str, kafka: Any, tmp_path: Path, examples_catalogue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = GatewayConfig(database_url=database_url, dev_mode=False, catalogue_topic=examples_catalogue)
    stack = StackSettings(data_dir=tmp_path / "data", kafka_bootstrap=kafka.bootstrap)
    policy = RestartPolicy(initial_backoff_s=0.05, max_backoff_s=0.1, max_restarts=2, window_s=600)
    gateway = Gateway(settings, stack, registry=registry(), restart_policy=policy)
    gave_up: list[GaveUp] = []
    gateway.on_give_up = gave_up.append
    broken = _break_listener(monkeypatch)
    broken.set()
    await gateway.start()
    try:
        failure = await asyncio.wait_for(gateway.supervisor.wait_failed(), 60)
        assert gave_up == [failure] and failure.role == "listener"
        assert "3 times within 600 s" in str(failure) and "ConsumerError" in str(failure)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app),
                                     base_url="http://gateway") as http:
            response = await http.get("/healthz")
        assert response.status_code == 503
        assert response.json()["checks"]["listener"].startswith("failed: listener failed at ")
        assert "not restarted: the process is exiting" in response.json()["checks"]["listener"]
    finally:
        await gateway.stop()


async def test_a_role_whose_task_is_cancelled_from_outside_is_named_by_healthz_and_restarted(
    database_url: str, kafka: Any, tmp_path: Path, examples_catalogue: str
) -> None:
    settings = GatewayConfig(database_url=database_url, dev_mode=False, catalogue_topic=examples_catalogue)
    stack = StackSettings(data_dir=tmp_path / "data", kafka_bootstrap=kafka.bootstrap)
    # A first backoff long enough for the test to see the role down before it is back, on a loaded
    # machine too (2 s was not, once: /metrics already showed the restarted role).
    policy = RestartPolicy(initial_backoff_s=6.0, max_backoff_s=6.0)
    gateway = Gateway(settings, stack, registry=registry(), restart_policy=policy)
    await gateway.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app),
                                     base_url="http://gateway") as http:
            await _health_until(http, lambda r: r.status_code == 200, "answered 200 after start")
            first = gateway.supervisor.attempt("releaser")
            assert first is not None
            first.cancel()
            releaser = {"component": "gateway", "role": "releaser"}
            # /metrics first, the cheaper page, read as soon as the role is seen down.
            during = await scrape_until(
                http, gateway.internal_token,
                lambda s: value(s, "kinshasa_role_state", state="running", **releaser) != 1,
                "the cancelled releaser down")
            assert value(during, "kinshasa_role_up", **releaser) == 0
            assert value(during, "kinshasa_role_state", state="restarting", **releaser) == 1
            down = await _health_until(http, lambda r: r.status_code == 503, "named the cancelled releaser")
            assert down["checks"]["releaser"].startswith("failed: releaser is down, restarting since ")
            assert "it was cancelled" in down["checks"]["releaser"]
            await _health_until(http, lambda r: r.status_code == 200, "answered 200 after the restart")
            after = await scrape(http, gateway.internal_token)
            assert value(after, "kinshasa_role_restarts_total", **releaser) == 1
            assert value(after, "kinshasa_role_state", state="running", **releaser) == 1
            assert gateway.supervisor.attempt("releaser") not in (None, first)
    finally:
        await gateway.stop()


async def test_a_stopping_gateway_publishes_what_it_committed_before_it_stops(
    database_url: str, kafka: Any, tmp_path: Path, examples_catalogue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The relay role publishes nothing while it runs: only the stop's drain can empty the outbox.
    async def idle(self: OutboxRelay, stop: asyncio.Event, idle_sleep_s: float = 0.2) -> RelayStats:
        await stop.wait()
        return RelayStats()

    monkeypatch.setattr(OutboxRelay, "run", idle)
    settings = GatewayConfig(database_url=database_url, dev_mode=False, catalogue_topic=examples_catalogue)
    stack = StackSettings(data_dir=tmp_path / "data", kafka_bootstrap=kafka.bootstrap)
    gateway = Gateway(settings, stack, registry=registry())
    await gateway.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app),
                                     base_url="http://gateway") as http:
            client = Client(http)
            await client.set_policy({"quarantineWindowS": 0})
            run_id = await client.start_run(entry_point="drain")
            created = (await client.create_document(run_id))["data"]["createDocument"]
            assert created["status"] == "PUBLISHED"
            assert (await OutboxStatus(gateway.engine).backlog()).pending >= 1
    finally:
        await gateway.stop()
    engine = create_engine(database_url)
    try:
        assert (await OutboxStatus(engine).backlog()).pending == 0
    finally:
        await engine.dispose()
