"""The gateway's domain metrics move with what happens: a trip, a held command, an egress awaiting approval,
an agent refused on its budget. Real gateway, real database (SQLite and PostgreSQL), real broker.
"""

from __future__ import annotations

from typing import Any

from tests.integration.gateway.conftest import OPERATOR_KEY, Client, Harness
from tests.integration.prometheus import Samples, scrape, scrape_until, value

GATEWAY = {"component": "gateway"}


async def _set_policy(c: Client, settings: dict[str, Any], scope: str = "DEFAULT",
                      subject: str | None = None) -> None:
    await c.data(
        "mutation($s: PolicyInput!, $scope: PolicyScope!, $sub: String) { setPolicy(scope: $scope, "
        'subject: $sub, settings: $s, reason: "test") { version } }',
        {"s": settings, "scope": scope, "sub": subject},
        OPERATOR_KEY,
    )


async def _archive(c: Client, run_id: str, document_id: str) -> dict[str, Any]:
    answer = await c.gql("mutation($r: ID!, $d: ID!) { archiveDocument(runId: $r, documentId: $d) "
                         "{ commandId status } }", {"r": run_id, "d": document_id})
    found: dict[str, Any] = answer["data"]["archiveDocument"]
    return found


def _figures(samples: Samples) -> tuple[float, float, float]:
    return (value(samples, "kinshasa_trips_total", reason="writes", **GATEWAY),
            value(samples, "kinshasa_incidents_total", kind="TRIP", **GATEWAY),
            value(samples, "kinshasa_held_commands", **GATEWAY))


async def test_a_tripped_run_moves_the_trip_counter_and_the_held_gauge(harness: Harness) -> None:
    c, http, token = harness.client, harness.client.http, harness.gateway.internal_token
    await _set_policy(c, {"maxWrites": 3, "quarantineWindowS": 600,
                          "operationWindows": {"documents.create": 0}, "autoRevert": False})
    trips, trip_incidents, held = _figures(await scrape(http, token))

    run_id = await c.start_run(entry_point="metrics")
    first = (await c.create_document(run_id))["data"]["createDocument"]
    await c.create_document(run_id)
    assert (await _archive(c, run_id, first["entityId"]))["status"] == "HELD"
    refused = await c.create_document(run_id)
    assert refused["errors"][0]["extensions"]["code"] == "BREAKER_OPEN"

    wanted = (trips + 1, trip_incidents + 1, held + 1)
    after = await scrape_until(http, token, lambda s: _figures(s) == wanted,
                               "one more writes trip, one more TRIP incident and one more held command")
    assert value(after, "kinshasa_trips_total", reason="errors", **GATEWAY) == 0
    # Labels are bounded: no run, agent or entity id appears anywhere on /metrics.
    for _name, labels in after:
        for label_value in dict(labels).values():
            assert run_id not in label_value and "agent-1" not in label_value
            assert first["entityId"] not in label_value


async def test_an_egress_awaiting_approval_is_counted_until_an_operator_approves_it(harness: Harness) -> None:
    c, http, token = harness.client, harness.client.http, harness.gateway.internal_token
    await _set_policy(c, {"quarantineWindowS": 0, "operationGates": ["documents.archive"]})
    awaiting = value(await scrape(http, token), "kinshasa_awaiting_approval_commands", **GATEWAY)
    run_id = await c.start_run(entry_point="metrics")
    doc = (await c.create_document(run_id))["data"]["createDocument"]
    gated = await _archive(c, run_id, doc["entityId"])
    assert gated["status"] == "AWAITING_APPROVAL"
    await scrape_until(http, token, lambda s: value(s, "kinshasa_awaiting_approval_commands", **GATEWAY)
                       == awaiting + 1, "the egress awaiting approval")
    await c.data("mutation($c: ID!) { approveEgress(commandId: $c) { status } }",
                 {"c": gated["commandId"]}, OPERATOR_KEY)
    await scrape_until(http, token, lambda s: value(s, "kinshasa_awaiting_approval_commands", **GATEWAY)
                       == awaiting, "the approved egress no longer awaiting")


async def test_a_write_refused_on_the_agents_budget_is_counted_by_budget(harness: Harness) -> None:
    c, http, token = harness.client, harness.client.http, harness.gateway.internal_token
    await _set_policy(c, {"maxAgentWritesPerHour": 1, "quarantineWindowS": 0}, "AGENT", "agent-1")
    name = "kinshasa_agent_budget_refusals_total"
    before = await scrape(http, token)
    run_id = await c.start_run(entry_point="metrics")
    await c.create_document(run_id)
    refused = await c.create_document(run_id)
    assert refused["errors"][0]["extensions"]["code"] == "AGENT_BUDGET_EXCEEDED"
    after = await scrape_until(
        http, token, lambda s: value(s, "kinshasa_incidents_total", kind="AGENT_BUDGET", **GATEWAY)
        == value(before, "kinshasa_incidents_total", kind="AGENT_BUDGET", **GATEWAY) + 1,
        "the AGENT_BUDGET incident")
    assert value(after, name, budget="maxAgentWritesPerHour", **GATEWAY) == \
        value(before, name, budget="maxAgentWritesPerHour", **GATEWAY) + 1
    assert value(after, name, budget="maxConcurrentRuns", **GATEWAY) == 0


async def test_a_run_start_refused_on_the_agents_budget_is_counted_by_budget(harness: Harness) -> None:
    c, http, token = harness.client, harness.client.http, harness.gateway.internal_token
    await _set_policy(c, {"maxConcurrentRuns": 1}, "AGENT", "agent-1")
    name = "kinshasa_agent_budget_refusals_total"
    before = await scrape(http, token)
    await c.start_run(entry_point="metrics")
    refused = await c.gql('mutation { startRun(entryPoint: "metrics") { id } }')
    assert refused["errors"][0]["extensions"]["code"] == "AGENT_BUDGET_EXCEEDED"
    assert refused["errors"][0]["extensions"]["budget"] == "maxConcurrentRuns"
    # Counted in memory as the resolver answers, so the next scrape has it.
    after = await scrape(http, token)
    assert value(after, name, budget="maxConcurrentRuns", **GATEWAY) == \
        value(before, name, budget="maxConcurrentRuns", **GATEWAY) + 1
    assert value(after, name, budget="maxAgentWritesPerHour", **GATEWAY) == \
        value(before, name, budget="maxAgentWritesPerHour", **GATEWAY)
