"""Every door to a revert rings the same doorbell, and a run whose revert was requested takes nothing more.

The gateway alone, on a real database and Kafka: the doors are a trip with auto-revert, `revertRun`,
`revertRuns`, and the coordinator's `run.reverted` / `run.revert_failed` arriving for a run the gateway
still thought open. The whole path through the real coordinator and services is in
tests/integration/test_revert_doorbell.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from kinshasa.schemas.envelope import Actor, Envelope, utcnow
from kinshasa.topics.catalogue import RUNS, commands_topic
from tests.integration.gateway.conftest import OPERATOR_KEY, Client, Harness, TopicReader, publish

RECEIPT = "{ commandId status }"
COUNTS = "counts { held awaitingApproval published discarded }"
# Everything is held for 10 minutes except opening an account, which leaves at once.
POLICY = {
    "quarantineWindowS": 600,
    "operationWindows": {"ledger.open_account": 0},
    "maxWrites": 4,
    "autoRevert": True,
    "holdTimeoutS": None,
}


async def _write(c: Client, run_id: str, mutation: str, args: str) -> dict[str, Any]:
    return await c.gql(f'mutation {{ {mutation}(runId: "{run_id}", {args}) {RECEIPT} }}')


async def _four_writes(c: Client, run_id: str) -> dict[str, dict[str, Any]]:
    """Two documents held, one account published, one email awaiting approval: the run's 4 writes."""
    out = {}
    for name, mutation, args in (
        ("held1", "createDocument", 'input: {title: "a", body: "b"}'),
        ("held2", "createDocument", 'input: {title: "c", body: "d"}'),
        ("published", "openAccount", 'input: {name: "Cash", currency: "EUR"}'),
        ("email", "sendEmail", 'input: {to: "a@example.org", subject: "s", body: "b"}'),
    ):
        body = await _write(c, run_id, mutation, args)
        assert not body.get("errors"), body
        out[name] = body["data"][mutation]
    assert [out[n]["status"] for n in ("held1", "held2", "published", "email")] == [
        "HELD",
        "HELD",
        "PUBLISHED",
        "AWAITING_APPROVAL",
    ]
    return out


async def _run(c: Client, run_id: str) -> dict[str, Any]:
    query = f'{{ run(id: "{run_id}") {{ status revertReason breaker {{ state }} {COUNTS} }} }}'
    return dict((await c.data(query, key=OPERATOR_KEY))["run"])


async def _ring(c: Client, door: str, run_id: str) -> None:
    if door == "trip":
        refused = await c.create_document(run_id)  # the 5th write, over maxWrites
        assert refused["errors"][0]["extensions"]["code"] == "BREAKER_OPEN", refused
    elif door == "revertRun":
        revert = f'mutation {{ revertRun(runId: "{run_id}", reason: "rogue") {{ id }} }}'
        await c.data(revert, key=OPERATOR_KEY)
    else:
        rung = await c.data(
            'mutation($e: String!) { revertRuns(selector: {agentId: "agent-1", entryPoint: $e}, '
            'reason: "rogue") { requested { id } unchanged { id } } }',
            {"e": f"door-{door}"},
            OPERATOR_KEY,
        )
        assert rung["revertRuns"] == {"requested": [{"id": run_id}], "unchanged": []}


async def _refused_as_closed(c: Client, mutation: str, key: str = OPERATOR_KEY) -> str:
    error = await c.error(mutation, key=key)
    assert error["extensions"]["code"] == "RUN_CLOSED", error
    return str(error["message"])


async def _operator_closed_checks(
    c: Client, run_id: str, writes: dict[str, dict[str, Any]], status: str
) -> None:
    """Release, hold and approve are RUN_CLOSED; discard and deny answer what is already true."""
    email = writes["email"]["commandId"]
    released = await _refused_as_closed(c, f'mutation {{ releaseRun(runId: "{run_id}") {{ count }} }}')
    assert released.startswith(f"run {run_id} is {status} (revert reason: ")
    assert "nothing of it can be released any more" in released
    await _refused_as_closed(c, f'mutation {{ holdRun(runId: "{run_id}") {{ count }} }}')
    approved = await _refused_as_closed(c, f'mutation {{ approveEgress(commandId: "{email}") {{ status }} }}')
    assert "nothing of it can be approved any more" in approved
    await _refused_as_closed(c, f'mutation {{ setBreaker(runId: "{run_id}", state: CLOSED) {{ id }} }}')
    discarded = await c.data(f'mutation {{ discardRun(runId: "{run_id}") {{ count }} }}', key=OPERATOR_KEY)
    assert discarded["discardRun"] == {"count": 0}
    denied = await c.data(
        f'mutation {{ denyEgress(commandId: "{email}", reason: "no") {{ status }} }}', key=OPERATOR_KEY
    )
    assert denied["denyEgress"] == {"status": "DISCARDED"}
    # No agent write is accepted either, whichever door the revert came through.
    body = await c.create_document(run_id)
    assert body["errors"][0]["extensions"]["code"] == "RUN_CLOSED", body


async def _published_marker(c: Client) -> str:
    """A command published at once on another run: once it is on Kafka, every earlier commit's is too."""
    await c.set_policy({"quarantineWindowS": 0, "maxWrites": 100})
    marker_run = await c.start_run(entry_point="marker")
    receipt = (await c.create_document(marker_run))["data"]["createDocument"]
    assert receipt["status"] == "PUBLISHED"
    return str(receipt["commandId"])


async def _wait_on_topic(reader: TopicReader, topic: str, message_id: str, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while message_id not in {str(e.message_id) for e in await reader.envelopes([topic])}:
        assert time.monotonic() < deadline, f"{message_id} never reached {topic}"
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("door", ["trip", "revertRun", "revertRuns"])
async def test_every_door_discards_the_unpublished_at_once_and_closes_the_run(
    harness: Harness, reader: TopicReader, door: str
) -> None:
    c = harness.client
    await c.set_policy(POLICY)
    run_id = await c.start_run(entry_point=f"door-{door}")
    writes = await _four_writes(c, run_id)
    await _ring(c, door, run_id)

    run = await _run(c, run_id)
    assert run["status"] == "REVERTING" and run["breaker"] == {"state": "OPEN"}
    assert run["counts"] == {"held": 0, "awaitingApproval": 0, "published": 1, "discarded": 3}
    if door == "trip":
        assert run["revertReason"] == "automatic revert after a trip: writes 5 exceeded the limit of 4"
    await _operator_closed_checks(c, run_id, writes, "REVERTING")

    # On kinshasa.runs, in the order committed: the discard, then the request with the final count.
    facts = await reader.wait_for([RUNS], run_id, 1, type_prefix="run.revert_requested")
    kinds = [e.type for e in await reader.envelopes([RUNS], run_id)]
    expected = ["run.started", "run.discarded", "run.revert_requested"]
    assert kinds == (["run.started", "run.tripped", *expected[1:]] if door == "trip" else expected)
    (requested,) = facts
    assert requested.payload["published_count"] == 1
    assert requested.actor == (
        Actor(kind="system", id="gateway") if door == "trip" else Actor(kind="operator", id="op-1")
    )
    discarded = next(e for e in await reader.envelopes([RUNS], run_id) if e.type == "run.discarded")
    assert discarded.payload == {"count": 3}

    # Nothing held or awaiting ever left: only the account did, and a later marker is on Kafka too.
    marker = await _published_marker(c)
    await _wait_on_topic(reader, commands_topic("documents"), marker)
    left = [
        str(e.message_id)
        for topic in ("documents", "ledger", "notifier")
        for e in await reader.envelopes([commands_topic(topic)], run_id)
    ]
    assert left == [writes["published"]["commandId"]]


def _outcome(run_id: str, kind: str) -> Envelope:
    payload: dict[str, Any] = (
        {"compensated": 1, "irreversible": 0} if kind == "run.reverted" else {"failing_steps": []}
    )
    return Envelope(
        message_id=uuid.uuid4(),
        type=kind,
        run_id=run_id,
        actor=Actor(kind="system", id="coordinator"),
        correlation_id=run_id,
        occurred_at=utcnow(),
        payload=payload,
    )


@pytest.mark.parametrize(
    ("kind", "status"), [("run.reverted", "REVERTED"), ("run.revert_failed", "REVERT_FAILED")]
)
async def test_the_coordinators_outcome_closes_a_run_the_gateway_thought_running(
    harness: Harness, reader: TopicReader, kind: str, status: str
) -> None:
    c = harness.client
    await c.set_policy(POLICY)
    run_id = await c.start_run(entry_point="outcome")
    writes = await _four_writes(c, run_id)
    assert (await _run(c, run_id))["status"] == "RUNNING"

    # As a coordinator reports a revert this gateway never rang for (a revert started before the
    # side door closed, or by another stack's gateway on the same topics).
    await publish(harness.bootstrap, RUNS, _outcome(run_id, kind))
    deadline = time.monotonic() + 30
    while (run := await _run(c, run_id))["status"] != status:
        assert time.monotonic() < deadline, run
        await asyncio.sleep(0.1)
    assert run["breaker"] == {"state": "OPEN"}
    assert run["counts"] == {"held": 0, "awaitingApproval": 0, "published": 1, "discarded": 3}
    assert run["revertReason"] == "the coordinator reported it; no request came here"
    await _operator_closed_checks(c, run_id, writes, status)
    discarded = await reader.wait_for([RUNS], run_id, 1, type_prefix="run.discarded")
    assert [(e.payload, e.actor.id) for e in discarded] == [({"count": 3, "reason": status}, "gateway")]


async def test_a_failed_revert_is_rung_again_one_under_way_is_not(
    harness: Harness, reader: TopicReader
) -> None:
    c = harness.client
    await c.set_policy(POLICY)
    failed = await c.start_run(entry_point="again")
    await c.data(f'mutation {{ revertRun(runId: "{failed}", reason: "first") {{ id }} }}', key=OPERATOR_KEY)
    await publish(harness.bootstrap, RUNS, _outcome(failed, "run.revert_failed"))
    deadline = time.monotonic() + 30
    while (await _run(c, failed))["status"] != "REVERT_FAILED":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    again = await c.data(
        f'mutation {{ revertRun(runId: "{failed}", reason: "second") {{ status revertReason }} }}',
        key=OPERATOR_KEY,
    )
    assert again["revertRun"] == {"status": "REVERTING", "revertReason": "second"}
    rung = await reader.wait_for([RUNS], failed, 2, type_prefix="run.revert_requested")
    assert [e.payload["reason"] for e in rung] == ["first", "second"]
    # REVERTING: the request under way covers it; a second ring would only repeat it.
    unchanged = await c.data(
        'mutation($ids: [ID!]) { revertRuns(selector: {runIds: $ids}, reason: "third") '
        "{ requested { id } unchanged { id status } } }",
        {"ids": [failed]},
        OPERATOR_KEY,
    )
    assert unchanged["revertRuns"] == {"requested": [], "unchanged": [{"id": failed, "status": "REVERTING"}]}
