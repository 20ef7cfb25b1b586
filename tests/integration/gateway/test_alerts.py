"""The `alerts` query shows the gateway's own alerts and those other components publish on kinshasa.alerts.

Real broker: the coordinator's alert is built by the coordinator's own code and published on the
topic (twice, as a redelivery would bring it); the gateway's listener stores it once, and the
gateway's own trip alert, coming back from the topic, is not stored a second time.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from kinshasa.coordinator.activities import RevertActivities
from kinshasa.coordinator.models import FinishInput
from kinshasa.schemas.envelope import Actor, Envelope, utcnow
from kinshasa.topics.catalogue import ALERTS
from tests.integration.gateway.conftest import OPERATOR_KEY, Harness, TopicReader, publish

ALERT_FIELDS = """id runId kind source summary createdAt agentId threshold { name count limit } held
  failingCount failingSteps { stepId forwardEventId forwardType reason } details"""


async def _alerts(
    harness: Harness, run_id: str | None = None, kind: str | None = None
) -> list[dict[str, Any]]:
    data = await harness.client.data(
        f"query($r: ID, $k: String) {{ alerts(runId: $r, kind: $k) {{ {ALERT_FIELDS} }} }}",
        {"r": run_id, "k": kind},
        OPERATOR_KEY,
    )
    found: list[dict[str, Any]] = data["alerts"]
    return found


async def _wait_for_alert(harness: Harness, alert_id: str, within_s: float = 30.0) -> None:
    for _ in range(int(within_s / 0.2)):
        if any(a["id"] == alert_id for a in await _alerts(harness)):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"alert {alert_id} never reached the alerts query")


def coordinator_alert(run_id: str) -> Envelope:
    """A `revert_failed` alert exactly as the coordinator's finish_revert activity emits it."""
    failing = [
        {
            "step_id": 2,
            "forward_event_id": str(uuid.uuid4()),
            "forward_type": "documents.rename.applied",
            "reason": "the title was edited since",
        }
    ]
    params = FinishInput(run_id=run_id, outcome_token="pass-3", missing_results=0, passes=3)
    return RevertActivities._alert(params, utcnow(), failing, 1, 4)


async def test_coordinator_alerts_are_stored_once_beside_the_gateways_own(
    harness: Harness, reader: TopicReader
) -> None:
    c = harness.client
    await c.set_policy({"maxWrites": 1, "quarantineWindowS": 600, "autoRevert": False})
    run_id = await c.start_run(entry_point="alerts")
    await c.create_document(run_id)
    assert (await c.create_document(run_id))["errors"][0]["extensions"]["code"] == "BREAKER_OPEN"
    # The trip alert is on the topic (keyed by run id, so everything below follows it in its partition).
    own = await reader.wait_for([ALERTS], run_id, 1)
    assert len(own) == 1 and own[0].type == "alert.run_tripped" and own[0].payload["source"] == "gateway"

    revert_failed = coordinator_alert(run_id)
    await publish(harness.bootstrap, ALERTS, revert_failed)
    await publish(harness.bootstrap, ALERTS, revert_failed)  # delivered again: stored once
    # A foreign stack's alert (a run this gateway never minted) is not this gateway's to show.
    foreign = coordinator_alert(str(uuid.uuid4()))
    await publish(harness.bootstrap, ALERTS, foreign)
    # Another component's alert of a kind the gateway has no fields for, with no summary: the marker
    # that everything published before it on the run's partition was handled.
    marker = Envelope(
        message_id=uuid.uuid4(),
        type="alert.ledger_lagging",
        run_id=run_id,
        actor=Actor(kind="system", id="coordinator"),
        correlation_id=run_id,
        occurred_at=utcnow(),
        payload={"lag": 1200},
    )
    await publish(harness.bootstrap, ALERTS, marker)
    await _wait_for_alert(harness, str(marker.message_id))

    everything = await _alerts(harness)
    assert sorted((a["kind"], a["source"]) for a in everything) == [
        ("ledger_lagging", "coordinator"),
        ("revert_failed", "coordinator"),
        ("run_tripped", "gateway"),
    ]
    assert all(a["runId"] == run_id for a in everything)
    by_kind = {a["kind"]: a for a in everything}

    tripped = by_kind["run_tripped"]
    assert tripped["threshold"] == {"name": "writes", "count": 2.0, "limit": 1.0} and tripped["held"] == 1
    assert (
        tripped["agentId"] == "agent-1" and tripped["failingSteps"] == [] and tripped["failingCount"] is None
    )

    failed = by_kind["revert_failed"]
    assert failed["id"] == str(revert_failed.message_id) == revert_failed.payload["alert_id"]
    assert (
        failed["summary"] == revert_failed.payload["summary"]
        and "failed after 3 pass(es)" in failed["summary"]
    )
    assert failed["createdAt"] == revert_failed.occurred_at.isoformat()
    assert failed["failingCount"] == 1 and failed["threshold"] is None and failed["agentId"] is None
    assert failed["failingSteps"] == [
        {
            "stepId": 2,
            "forwardEventId": revert_failed.payload["failing_steps"][0]["forward_event_id"],
            "forwardType": "documents.rename.applied",
            "reason": "the title was edited since",
        }
    ]
    assert failed["details"]["compensated"] == 4 and failed["details"]["missing_results"] == 0

    lagging = by_kind["ledger_lagging"]
    assert lagging["summary"] == f"ledger_lagging alert from coordinator about run {run_id}"
    assert lagging["details"] == {"lag": 1200}

    assert [a["kind"] for a in await _alerts(harness, run_id, kind="revert_failed")] == ["revert_failed"]
    # The gateway re-published none of them: only its own alert is on the topic under its actor.
    on_topic = await reader.envelopes([ALERTS], run_id)
    assert [e.type for e in on_topic if e.actor.id == "gateway"] == ["alert.run_tripped"]
