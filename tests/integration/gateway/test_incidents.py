"""Every punch becomes an incident: trips, revert outcomes, budget breaches, denied egress, dead letters.

A real gateway on each database backend, with the coordinator's outcomes and a service's dead letter
published on the real broker as those components publish them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from kinshasa.schemas.envelope import Actor, EntityRef, Envelope, utcnow
from kinshasa.topics.catalogue import RUNS, dlq_topic, group_id
from tests.integration.gateway.conftest import AGENT_KEY, OPERATOR_KEY, Client, Harness, publish

INCIDENT = """id kind runId agentId entryPoint policyVersion trigger { threshold count limit }
  writeIndexAtTrip escaped { operation count } held servicesTouched openedAt decidedAt decision"""
PROPOSAL = """id scope subject rationale status reason policyVersion settings { operationGates maxWrites }
  backtest { runsReplayed incidentRunsReplayed incidentRunsCaught incidentRunsCaughtEarlier
  escapedWritesBefore escapedWritesAfter goodRunsReplayed goodRunsTripped } incident { id }"""


async def set_policy(
    c: Client, settings: dict[str, Any], scope: str = "DEFAULT", subject: str | None = None
) -> int:
    data = await c.data(
        "mutation($s: PolicyInput!, $scope: PolicyScope!, $sub: String) { setPolicy(scope: $scope, "
        'subject: $sub, settings: $s, reason: "test") { version } }',
        {"s": settings, "scope": scope, "sub": subject},
        OPERATOR_KEY,
    )
    return int(data["setPolicy"]["version"])


async def incidents(c: Client, kind: str | None = None) -> list[dict[str, Any]]:
    data = await c.data(
        f"query($k: IncidentKind) {{ incidents(first: 100, kind: $k) {{ nodes {{ {INCIDENT} }} }} }}",
        {"k": kind},
        OPERATOR_KEY,
    )
    found: list[dict[str, Any]] = data["incidents"]["nodes"]
    return found


async def wait_for_incident(c: Client, kind: str, run_id: str, within_s: float = 90.0) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    while True:
        found = [i for i in await incidents(c, kind) if i["runId"] == run_id]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no {kind} incident for run {run_id}"
        await asyncio.sleep(0.2)


async def write(c: Client, mutation: str, run_id: str, args: str = "") -> dict[str, Any]:
    query = f"mutation($r: ID!) {{ {mutation}(runId: $r{args}) {{ commandId status }} }}"
    return await c.gql(query, {"r": run_id})


async def test_a_trip_records_what_tripped_what_escaped_and_what_was_held(harness: Harness) -> None:
    c = harness.client
    version = await set_policy(
        c,
        {"maxWrites": 3, "quarantineWindowS": 600, "operationWindows": {"documents.create": 0},
         "autoRevert": False},
    )
    run_id = await c.start_run(entry_point="incidents")
    first = (await c.create_document(run_id))["data"]["createDocument"]
    await c.create_document(run_id)
    held = await write(c, "archiveDocument", run_id, f', documentId: "{first["entityId"]}"')
    assert held["data"]["archiveDocument"]["status"] == "HELD"
    refused = await c.create_document(run_id)
    assert refused["errors"][0]["extensions"]["code"] == "BREAKER_OPEN"

    [incident] = [i for i in await incidents(c, "TRIP") if i["runId"] == run_id]
    assert incident["kind"] == "TRIP" and incident["agentId"] == "agent-1"
    assert incident["entryPoint"] == "incidents" and incident["policyVersion"] == version
    assert incident["trigger"] == {"threshold": "writes", "count": 4.0, "limit": 3.0}
    assert incident["writeIndexAtTrip"] == 4
    assert incident["escaped"] == [{"operation": "documents.create", "count": 2}]
    assert incident["held"] == 1 and incident["servicesTouched"] == ["documents"]
    assert incident["decidedAt"] is None
    run = await c.data("query($r: ID!) { run(id: $r) { policyVersion } }", {"r": run_id}, OPERATOR_KEY)
    assert run["run"]["policyVersion"] == version
    again = await c.data(f"query($i: ID!) {{ incident(id: $i) {{ {INCIDENT} }} }}", {"i": incident["id"]},
                         OPERATOR_KEY)
    assert again["incident"] == incident

    # The recorded run replayed under a tighter entry-point layer (a time without a zone is UTC).
    backtest = """query($s: PolicyInput!) { backtestPolicy(scope: ENTRY_POINT, subject: "incidents",
      settings: $s, since: "2020-01-01T00:00:00") { runsReplayed incidentRunsReplayed incidentRunsCaught
      incidentRunsCaughtEarlier escapedWritesBefore escapedWritesAfter goodRunsReplayed goodRunsTripped } }"""
    tighter = await c.data(backtest, {"s": {"maxWrites": 1}}, OPERATOR_KEY)
    assert tighter["backtestPolicy"] == {
        "runsReplayed": 1, "incidentRunsReplayed": 1, "incidentRunsCaught": 1, "incidentRunsCaughtEarlier": 1,
        "escapedWritesBefore": 2, "escapedWritesAfter": 1, "goodRunsReplayed": 0, "goodRunsTripped": 0,
    }
    unknown = await c.error(backtest, {"s": {"operationGates": ["nobody.nothing"]}}, OPERATOR_KEY)
    assert unknown["extensions"]["code"] == "VALIDATION"


async def test_incidents_are_for_operators_only_and_bad_ids_say_what_to_pass(harness: Harness) -> None:
    c = harness.client
    denied = await c.error("{ incidents { nodes { id } } }", key=AGENT_KEY)
    assert denied["extensions"]["code"] == "FORBIDDEN"
    missing = await c.error('{ incident(id: "nope") { id } }', key=OPERATOR_KEY)
    assert missing["extensions"]["code"] == "NOT_FOUND" and "incidents query" in missing["message"]
    cursor = await c.error('{ incidents(after: "garbage") { nodes { id } } }', key=OPERATOR_KEY)
    assert cursor["extensions"]["code"] == "VALIDATION"
    reject = await c.error(
        'mutation { rejectProposal(id: "00000000-0000-0000-0000-000000000000", reason: "x") { id } }',
        key=OPERATOR_KEY,
    )
    assert reject["extensions"]["code"] == "NOT_FOUND"


async def test_a_denied_egress_and_an_agent_over_budget_are_incidents(harness: Harness) -> None:
    c = harness.client
    run_id = await c.start_run(entry_point="egress")
    email = await write(c, "sendEmail", run_id, ', input: {to: "a@example.org", subject: "s", body: "b"}')
    command_id = email["data"]["sendEmail"]["commandId"]
    await c.data(
        'mutation($c: ID!) { denyEgress(commandId: $c, reason: "not today") { status } }', {"c": command_id},
        OPERATOR_KEY,
    )
    denied = await wait_for_incident(c, "EGRESS_DENIED", run_id)
    assert denied["servicesTouched"] == ["notifier"] and denied["held"] == 1

    await set_policy(c, {"maxConcurrentRuns": 1}, "AGENT", "agent-1")
    refused = await c.gql('mutation { startRun(entryPoint: "budget") { id } }')
    assert refused["errors"][0]["extensions"]["code"] == "AGENT_BUDGET_EXCEEDED"
    [budget] = await incidents(c, "AGENT_BUDGET")
    assert budget["agentId"] == "agent-1" and budget["entryPoint"] == "budget"
    assert budget["trigger"]["threshold"] == "maxConcurrentRuns" and budget["trigger"]["limit"] == 1.0


def outcome(run_id: str, kind: str, payload: dict[str, Any]) -> Envelope:
    return Envelope(
        message_id=uuid.uuid4(),
        type=kind,
        run_id=run_id,
        actor=Actor(kind="system", id="coordinator"),
        correlation_id=run_id,
        occurred_at=utcnow(),
        payload=payload,
    )


async def test_revert_outcomes_and_dead_letters_are_incidents_and_a_failed_compensation_proposes_a_gate(
    harness: Harness,
) -> None:
    c = harness.client
    await set_policy(c, {"quarantineWindowS": 0})
    reverted = await c.start_run(entry_point="reverted")
    await c.create_document(reverted)
    await publish(harness.bootstrap, RUNS, outcome(reverted, "run.reverted", {"compensated": 1}))
    done = await wait_for_incident(c, "REVERT", reverted)
    assert done["escaped"] == [{"operation": "documents.create", "count": 1}]

    failed = await c.start_run(entry_point="failed")
    doc = (await c.create_document(failed))["data"]["createDocument"]
    await write(c, "renameDocument", failed, f', documentId: "{doc["entityId"]}", title: "x"')
    steps = [{"step_id": 2, "forward_type": "documents.rename.applied", "reason": "edited since"}]
    await publish(harness.bootstrap, RUNS, outcome(failed, "run.revert_failed", {"failing_steps": steps}))
    incident = await wait_for_incident(c, "REVERT_FAILED", failed)

    data = await c.data(f"query($i: ID!) {{ incident(id: $i) {{ proposals {{ {PROPOSAL} }} }} }}",
                        {"i": incident["id"]}, OPERATOR_KEY)
    [gate] = data["incident"]["proposals"]
    assert gate["status"] == "PROPOSED"
    assert (gate["scope"], gate["subject"]) == ("ENTRY_POINT", "failed")
    assert gate["settings"]["operationGates"] == ["documents.rename"]
    assert "documents.rename" in gate["rationale"] and gate["incident"]["id"] == incident["id"]
    # Reading again proposes nothing new.
    again = await c.data("query($i: ID!) { incident(id: $i) { proposals { id } } }",
                         {"i": incident["id"]}, OPERATOR_KEY)
    assert [p["id"] for p in again["incident"]["proposals"]] == [gate["id"]]

    blank = await c.error('mutation($p: ID!) { rejectProposal(id: $p, reason: "  ") { id } }',
                          {"p": gate["id"]}, OPERATOR_KEY)
    assert blank["extensions"]["code"] == "VALIDATION"
    rejected = await c.data(
        'mutation($p: ID!) { rejectProposal(id: $p, reason: "the rename is fine") { status reason } }',
        {"p": gate["id"]}, OPERATOR_KEY,
    )
    assert rejected["rejectProposal"] == {"status": "REJECTED", "reason": "the rename is fine"}
    twice = await c.error('mutation($p: ID!) { acceptProposal(id: $p, reason: "on second thought") { id } }',
                          {"p": gate["id"]}, OPERATOR_KEY)
    assert twice["extensions"]["code"] == "VALIDATION" and "already REJECTED" in twice["message"]
    decided = await c.data(f"query($i: ID!) {{ incident(id: $i) {{ {INCIDENT} }} }}", {"i": incident["id"]},
                           OPERATOR_KEY)
    assert decided["incident"]["decision"].startswith("rejected proposal")

    # A service gave up on one of the run's commands: its dead-letter topic carries the command.
    dead = Envelope(
        message_id=uuid.uuid4(),
        type="documents.create",
        run_id=reverted,
        actor=Actor(kind="agent", id="agent-1"),
        correlation_id=reverted,
        entity=EntityRef(service="documents", type="document", id=str(uuid.uuid4())),
        occurred_at=utcnow(),
        payload={"title": "t", "body": "b"},
    )
    await publish(harness.bootstrap, dlq_topic(group_id("documents")), dead)
    letter = await wait_for_incident(c, "DEAD_LETTER", reverted)
    assert letter["servicesTouched"] == ["documents"]


async def test_an_operation_gate_holds_an_operation_until_an_operator_approves_it(
    harness: Harness,
) -> None:
    c = harness.client
    bad = await c.error(
        'mutation { setPolicy(scope: DEFAULT, settings: {operationGates: ["nobody.nothing"]}, reason: "x") '
        "{ version } }",
        key=OPERATOR_KEY,
    )
    assert bad["extensions"]["code"] == "VALIDATION" and "nobody.nothing" in bad["message"]
    await set_policy(c, {"quarantineWindowS": 0, "operationGates": ["documents.archive"]})
    policy = await c.data("{ policy { effective { operationGates } } }", key=OPERATOR_KEY)
    assert policy["policy"]["effective"]["operationGates"] == ["documents.archive"]
    run_id = await c.start_run(entry_point="gated")
    doc = (await c.create_document(run_id))["data"]["createDocument"]
    assert doc["status"] == "PUBLISHED"
    gated = (await write(c, "archiveDocument", run_id, f', documentId: "{doc["entityId"]}"'))["data"]
    assert gated["archiveDocument"]["status"] == "AWAITING_APPROVAL"
    approved = await c.data(
        'mutation($c: ID!) { approveEgress(commandId: $c) { status } }',
        {"c": gated["archiveDocument"]["commandId"]},
        OPERATOR_KEY,
    )
    assert approved["approveEgress"]["status"] == "PUBLISHED"
