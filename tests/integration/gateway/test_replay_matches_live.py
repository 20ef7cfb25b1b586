"""Replaying a recorded run under the policy that governed it reproduces what the live gateway decided.

Hypothesis generates a policy (thresholds, a velocity window, per-operation windows, some short enough
for the releaser to publish mid-run) and a run: writes to several services with pauses between them,
egress some of which the operator approves, and rejections a service reports back on the real broker.
The REAL gateway decides; then the run is read back from the gateway's database as a replay records it
and replayed under its `policyVersion`. The trip (threshold and write index) and the sets of escaped and
held commands must be exactly the live ones.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from kinshasa.gateway.app import Gateway
from kinshasa.gateway.backtest import Governing, load_history, load_policy_history
from kinshasa.gateway.replay import replay
from kinshasa.gateway.settings import GatewayConfig
from kinshasa.gateway.store import incidents
from kinshasa.schemas.envelope import Actor, EntityRef, Envelope, utcnow
from kinshasa.settings import StackSettings
from kinshasa.topics.catalogue import events_topic
from tests.integration.gateway.conftest import OPERATOR_KEY, Client, Harness, publish, registry

# (mutation, service, arguments): one operation of each example service, egress included.
WRITES = {
    "doc": ("createDocument", "documents", ', input: {title: "t", body: "b"}'),
    "account": ("openAccount", "ledger", ', input: {name: "n", currency: "EUR"}'),
    "email": ("sendEmail", "notifier", ', input: {to: "a@example.org", subject: "s", body: "b"}'),
}


@dataclass(frozen=True)
class Step:
    kind: str
    pause_s: float
    reject: bool
    approve: bool


steps = st.lists(
    st.builds(
        Step,
        kind=st.sampled_from(sorted(WRITES)),
        pause_s=st.sampled_from([0.0, 0.0, 0.02, 0.15, 0.3]),
        reject=st.booleans(),
        approve=st.booleans(),
    ),
    min_size=3,
    max_size=16,
)
policies = st.fixed_dictionaries(
    {
        "maxWrites": st.integers(2, 12),
        "maxErrors": st.integers(0, 3),
        "maxServices": st.integers(2, 3),
        "maxVelocity": st.integers(2, 8),
        "velocityWindowS": st.sampled_from([0.05, 0.25, 5.0]),
        "quarantineWindowS": st.sampled_from([0.0, 0.2, 600.0]),
        "operationWindows": st.fixed_dictionaries(
            {"documents.create": st.sampled_from([0.0, 0.2, 0.4, 600.0])}
        ),
        "autoRevert": st.just(False),
    }
)


@pytest.fixture
async def live(
    database_url: str, kafka: Any, tmp_path: Path, examples_catalogue: str
) -> AsyncIterator[Harness]:
    """A real gateway whose releaser polls often, so short windows elapse during a generated run."""
    config = GatewayConfig(
        database_url=database_url,
        dev_mode=False,
        releaser_interval_s=0.05,
        catalogue_topic=examples_catalogue,
    )
    gateway = Gateway(config, StackSettings(data_dir=tmp_path / "data", kafka_bootstrap=kafka.bootstrap),
                      registry=registry())
    await gateway.start()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gateway.app), base_url="http://gateway", timeout=30
        ) as http:
            yield Harness(gateway, Client(http), kafka.bootstrap)
    finally:
        await gateway.stop()


async def _errors(c: Client, run_id: str) -> tuple[int, str]:
    query = "query($r: ID!) { run(id: $r) { breaker { errors state } } }"
    data = await c.data(query, {"r": run_id}, OPERATOR_KEY)
    return int(data["run"]["breaker"]["errors"]), str(data["run"]["breaker"]["state"])


async def _reject(
    harness: Harness, run_id: str, service: str, operation: str, receipt: dict[str, Any]
) -> None:
    """The service reports the command rejected; wait until the gateway has counted it."""
    before, _ = await _errors(harness.client, run_id)
    await publish(
        harness.bootstrap,
        events_topic(service),
        Envelope(
            message_id=uuid.uuid4(),
            type=f"{operation}.rejected",
            run_id=run_id,
            actor=Actor(kind="service", id=service),
            causation_id=uuid.UUID(receipt["commandId"]),
            correlation_id=run_id,
            entity=EntityRef(service=service, type="thing", id=receipt["entityId"]),
            occurred_at=utcnow(),
            payload={"reason": "refused by the test"},
        ),
    )
    deadline = time.monotonic() + 20
    while (await _errors(harness.client, run_id))[0] == before:
        assert time.monotonic() < deadline, "the rejection was never counted"
        await asyncio.sleep(0.02)


async def _drive(harness: Harness, policy: dict[str, Any], run: list[Step]) -> str:
    c = harness.client
    await c.set_policy(policy)
    run_id = await c.start_run(entry_point="replay")
    for step in run:
        await asyncio.sleep(step.pause_s)
        mutation, service, args = WRITES[step.kind]
        answer = await c.gql(
            f"mutation($r: ID!) {{ {mutation}(runId: $r{args}) {{ commandId entityId status operation }} }}",
            {"r": run_id},
        )
        if answer.get("errors"):
            assert answer["errors"][0]["extensions"]["code"] == "BREAKER_OPEN", answer
            break
        receipt = answer["data"][mutation]
        if step.reject and receipt["status"] == "PUBLISHED":
            await _reject(harness, run_id, service, receipt["operation"], receipt)
            if (await _errors(c, run_id))[1] == "OPEN":
                break
        if step.approve and receipt["status"] == "AWAITING_APPROVAL":
            await c.data('mutation($c: ID!) { approveEgress(commandId: $c) { status } }',
                         {"c": receipt["commandId"]}, OPERATOR_KEY)
    return run_id


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(policy=policies, run=steps)
async def test_replaying_a_run_under_its_policy_reproduces_the_live_decisions(
    live: Harness, policy: dict[str, Any], run: list[Step]
) -> None:
    run_id = await _drive(live, policy, run)
    gateway = live.gateway
    declared = {spec.command_type: spec.window_s for spec in gateway.book.catalogue}
    async with gateway.engine.connect() as conn:
        [recorded] = await load_history(conn, declared, datetime.min.replace(tzinfo=utcnow().tzinfo),
                                        run_ids=[run_id])
        history = await load_policy_history(conn)
        trip = (
            await conn.execute(
                select(incidents.c.threshold, incidents.c.write_index, incidents.c.detail)
                .where(incidents.c.run_id == run_id, incidents.c.kind == "TRIP")
            )
        ).mappings().first()
        await conn.rollback()
    assert recorded.recorded.policy_version == history.latest
    outcome = replay(recorded.recorded, Governing(history).policy_for(recorded.recorded))
    if trip is None:
        assert not outcome.tripped, (outcome, recorded.recorded)
        return
    detail = json.loads(trip["detail"])
    assert outcome.trip is not None and outcome.trip.threshold == trip["threshold"], (outcome, trip)
    assert outcome.write_index == trip["write_index"]
    assert sorted(outcome.escaped) == sorted(detail["escaped_ids"]), (outcome, detail, recorded.recorded)
    assert sorted(outcome.held) == sorted(detail["held_ids"]), (outcome, detail, recorded.recorded)
