"""A revert leaves nothing half-done, through the real gateway, coordinator, Temporal and services.

Whatever door a revert comes through (a trip with auto-revert, `revertRun`, `revertRuns`), it ends with
no command of the run held or awaiting approval, every published command compensated or named as
failing, and nothing released, approved or written for the run after the request.

The stack: the gateway in this process (its own SQLite, served in-process over ASGI), the coordinator in
this process (its own SQLite, consumer group and task queue), the example services documents, ledger
and links as real processes, the session's Temporal dev server, and a Kafka broker of this module's
own: the gateway knows only the canonical topic names, so this module gets a broker where they hold
nothing but its own messages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.service import RPCError

from kinshasa.coordinator.workflows import revert_workflow_id
from kinshasa.gateway.app import Gateway
from kinshasa.gateway.principals import PrincipalRegistry
from kinshasa.gateway.settings import GatewayConfig
from kinshasa.infra.kafka import KafkaBroker, kafka_libs
from kinshasa.infra.process import free_port
from kinshasa.infra.temporal import TemporalServer
from kinshasa.schemas.envelope import Envelope
from kinshasa.services.registry import publish_example_declarations
from kinshasa.settings import InfraSettings, StackSettings
from kinshasa.topics.catalogue import RUNS, commands_topic
from tests.integration.coordinator.harness import (
    FAST_POLICY,
    REPO,
    ServiceFleet,
    Stack,
    compare,
    coordinator_stack,
    service_fleet,
)
from tests.integration.gateway.conftest import TopicReader

AGENT_A = "doorbell-agent-a-" + "a" * 32
AGENT_B = "doorbell-agent-b-" + "b" * 32
OPERATOR = "doorbell-operator-" + "o" * 32
PRINCIPALS = {"principals": [
    {"id": "agent-a", "kind": "agent", "scopes": ["*"], "key": AGENT_A},
    {"id": "agent-b", "kind": "agent", "scopes": ["*"], "key": AGENT_B},
    {"id": "op-1", "kind": "operator", "scopes": ["*"], "key": OPERATOR},
]}
RUN = """{ id status revertReason breaker { state }
  counts { held awaitingApproval published applied compensated discarded }
  steps(first: 50) { nodes { status forwardType failureReason } } }"""
# The checkout's jar cache, shared with the session's broker and `make run`.
CACHE = REPO / ".kinshasa" / "cache"
# Long enough for the checks made while a revert waits for a service that is down.
POLICY = FAST_POLICY.model_copy(update={"forward_wait_s": 120.0})


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    infra = InfraSettings()
    kafka = KafkaBroker(root=tmp_path_factory.mktemp("doorbell-kafka"),
                        libs=kafka_libs(CACHE, infra.kafka_version, infra.kafka_home),
                        port=free_port(), controller_port=free_port())
    kafka.start(attached=True)
    try:
        yield kafka
    finally:
        kafka.stop()


@pytest.fixture(scope="module")
def fleet(broker: KafkaBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceFleet]:
    """documents, ledger and links as processes on the canonical topics (no suffix), as `make run` has them;
    notifier's declaration is published too, so `sendEmail` exists (egress never leaves here)."""
    publish_example_declarations(broker.bootstrap)
    with service_fleet(broker.bootstrap, tmp_path_factory.mktemp("doorbell-fleet"), "") as running:
        yield running


class Client:
    """GraphQL over the gateway's ASGI app: the real app, no network."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def gql(self, query: str, variables: dict[str, Any] | None = None,
                  key: str = OPERATOR) -> dict[str, Any]:
        response = await self.http.post("/graphql", json={"query": query, "variables": variables or {}},
                                        headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def data(self, query: str, variables: dict[str, Any] | None = None,
                   key: str = OPERATOR) -> dict[str, Any]:
        body = await self.gql(query, variables, key)
        assert not body.get("errors"), body
        data: dict[str, Any] = body["data"]
        return data

    async def code(self, query: str, variables: dict[str, Any] | None = None, key: str = OPERATOR) -> str:
        """The error code a refused request answers with."""
        body = await self.gql(query, variables, key)
        assert body.get("errors"), body
        return str(body["errors"][0]["extensions"]["code"])

    async def start(self, key: str, entry_point: str) -> dict[str, Any]:
        query = "mutation($e: String!) { startRun(entryPoint: $e) { id startedAt } }"
        return dict((await self.data(query, {"e": entry_point}, key))["startRun"])

    async def write(self, key: str, run_id: str, mutation: str, args: str) -> dict[str, Any]:
        """An agent write: the receipt, or the error's code under `code`."""
        receipt = "{ commandId entityId status }"
        body = await self.gql(f'mutation {{ {mutation}(runId: "{run_id}", {args}) {receipt} }}', key=key)
        if body.get("errors"):
            return {"code": body["errors"][0]["extensions"]["code"]}
        return dict(body["data"][mutation])

    async def run(self, run_id: str) -> dict[str, Any]:
        return dict((await self.data(f'{{ run(id: "{run_id}") {RUN} }}'))["run"])

    async def settled(self, run_id: str, compensated: int, within_s: float = 240.0) -> dict[str, Any]:
        """The run once the coordinator's outcome (REVERTED or REVERT_FAILED) and `compensated` acks have
        reached the gateway: it hears outcomes on kinshasa.runs and acks on the events topics, so either
        may arrive first."""
        deadline = time.monotonic() + within_s
        while True:
            run = await self.run(run_id)
            if run["status"] in ("REVERTED", "REVERT_FAILED") and run["counts"]["compensated"] >= compensated:
                return run
            assert time.monotonic() < deadline, f"run {run_id} did not settle: {run}"
            await asyncio.sleep(0.25)

    async def set_policy(self, settings: dict[str, Any]) -> None:
        await self.data('mutation($s: PolicyInput!) { setPolicy(scope: DEFAULT, settings: $s, '
                        'reason: "test") { version } }', {"s": settings})


@dataclass
class World:
    client: Client
    stack: Stack
    fleet: ServiceFleet
    bootstrap: str


@pytest.fixture
async def world(fleet: ServiceFleet, temporal: TemporalServer, tmp_path: Path, unique: str
                ) -> AsyncIterator[World]:
    async with coordinator_stack(fleet, temporal.address, tmp_path, unique, policy=POLICY) as stack:
        assert stack.coordinator is not None
        settings = GatewayConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'gateway.sqlite3'}",
                                 dev_mode=False, releaser_interval_s=0.1,
                                 coordinator_url=stack.coordinator[0].api_url)
        stack_settings = StackSettings(data_dir=tmp_path / "gateway", kafka_bootstrap=fleet.kafka_bootstrap)
        gateway = Gateway(settings, stack_settings, registry=PrincipalRegistry.from_document(PRINCIPALS))
        await gateway.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app),
                                         base_url="http://gateway", timeout=60) as http:
                yield World(Client(http), stack, fleet, fleet.kafka_bootstrap)
        finally:
            await gateway.stop()


async def _closed_to_operators(c: Client, run_id: str, email_id: str) -> None:
    """Release, hold and approve answer RUN_CLOSED; discarding what is left finds nothing."""
    for refused in (f'mutation {{ releaseRun(runId: "{run_id}") {{ count }} }}',
                    f'mutation {{ holdRun(runId: "{run_id}") {{ count }} }}',
                    f'mutation {{ approveEgress(commandId: "{email_id}") {{ status }} }}'):
        assert await c.code(refused) == "RUN_CLOSED", refused
    assert (await c.data(f'mutation {{ discardRun(runId: "{run_id}") {{ count }} }}'))["discardRun"] == {
        "count": 0}


async def _facts(bootstrap: str, run_id: str) -> list[Envelope]:
    """The run's facts on kinshasa.runs, read to the end of the topic."""
    return await TopicReader(bootstrap).envelopes([RUNS], run_id)


async def test_a_tripped_run_with_auto_revert_ends_reverted_with_nothing_held_or_awaiting(
        world: World) -> None:
    c, fleet = world.client, world.fleet
    await c.set_policy({"quarantineWindowS": 0, "operationWindows": {"documents.edit": 600}, "maxWrites": 10,
                        "maxVelocity": 1000, "maxServices": 10, "autoRevert": True, "holdTimeoutS": None})
    before = await fleet.snapshot()
    # links is down: its command is published but has no result yet, so the revert waits for it and
    # the run stays REVERTING while the operator tries every door out of it.
    await asyncio.to_thread(fleet.stop, "links")
    run_id = (await c.start(AGENT_A, "tripped"))["id"]
    w = lambda mutation, args: c.write(AGENT_A, run_id, mutation, args)  # noqa: E731
    d1 = (await w("createDocument", 'input: {title: "one", body: "b1"}'))["entityId"]
    d2 = (await w("createDocument", 'input: {title: "two", body: "b2"}'))["entityId"]
    account = (await w("openAccount", 'input: {name: "Cash", currency: "EUR"}'))["entityId"]
    receipts = [
        await w("renameDocument", f'documentId: "{d1}", title: "one, renamed"'),
        await w("postEntry", f'input: {{accountId: "{account}", amountCents: 1000, memo: "in"}}'),
        await w("link", f'input: {{fromId: "{d1}", toId: "{d2}", kind: "refs"}}'),
        await w("editDocument", f'documentId: "{d1}", body: "held 1"'),
        await w("editDocument", f'documentId: "{d2}", body: "held 2"'),
        await w("sendEmail", 'input: {to: "ops@example.org", subject: "done", body: "b"}'),
        await w("postEntry", f'input: {{accountId: "{account}", amountCents: -250, memo: "out"}}'),
    ]
    assert [r["status"] for r in receipts] == ["PUBLISHED"] * 3 + ["HELD"] * 2 + ["AWAITING_APPROVAL",
                                                                                "PUBLISHED"]
    email = receipts[5]["commandId"]
    assert (await w("createDocument", 'input: {title: "eleventh", body: "b"}'))["code"] == "BREAKER_OPEN"

    # The trip rang the doorbell in its own transaction: REVERTING, nothing held, nothing awaiting.
    run = await c.run(run_id)
    assert run["status"] == "REVERTING" and run["breaker"] == {"state": "OPEN"}
    assert run["revertReason"] == "automatic revert after a trip: writes 11 exceeded the limit of 10"
    assert {k: run["counts"][k] for k in ("held", "awaitingApproval", "published", "discarded")} == {
        "held": 0, "awaitingApproval": 0, "published": 7, "discarded": 3}
    await _closed_to_operators(c, run_id, email)
    assert (await w("createDocument", 'input: {title: "late", body: "b"}'))["code"] == "RUN_CLOSED"
    assert (await c.run(run_id))["status"] == "REVERTING"  # all of the above happened while it reverted

    await asyncio.to_thread(fleet.start, "links")
    await asyncio.to_thread(fleet.wait_ready, "links")
    run = await c.settled(run_id, compensated=7)
    assert run["status"] == "REVERTED", run
    assert run["counts"] == {"held": 0, "awaitingApproval": 0, "published": 7, "applied": 7,
                             "compensated": 7, "discarded": 3}
    assert sorted(s["status"] for s in run["steps"]["nodes"]) == ["COMPENSATED"] * 7
    await _closed_to_operators(c, run_id, email)
    assert compare(before, await fleet.snapshot()) == []
    assert await fleet.compensation_writes(run_id) == 7
    summary = await world.stack.ledger.summary(run_id)
    assert summary is not None and summary.status == "REVERTED" and summary.counts.unsettled == 0

    facts = await _facts(world.bootstrap, run_id)
    assert [e.type for e in facts] == ["run.started", "run.tripped", "run.discarded", "run.revert_requested",
                                       "run.reverted"]
    requested = facts[3]
    assert requested.payload["published_count"] == 7 and requested.payload["requested_by"] == "gateway"
    # Only the published commands ever reached a service: the held and the awaiting were discarded.
    published = {r["commandId"] for r in receipts if r["status"] == "PUBLISHED"}
    on_kafka = await TopicReader(world.bootstrap).envelopes(
        [commands_topic(s) for s in ("documents", "ledger", "links", "notifier")], run_id)
    forward = {str(e.message_id) for e in on_kafka if e.actor.kind == "agent"}
    assert len(forward) == 7 and published <= forward
    assert not forward & {r["commandId"] for r in receipts if r["status"] != "PUBLISHED"}


async def test_a_revert_that_meets_a_conflict_names_every_step_it_could_not_undo(world: World) -> None:
    c = world.client
    await c.set_policy({"quarantineWindowS": 0, "operationWindows": {"documents.edit": 600}, "maxWrites": 3,
                        "maxVelocity": 1000, "maxServices": 10, "autoRevert": True, "holdTimeoutS": None})
    setup = (await c.start(AGENT_B, "setup"))["id"]
    doc = (await c.write(AGENT_B, setup, "createDocument", 'input: {title: "shared", body: "b"}'))["entityId"]
    await _applied(c, setup, 1)

    run_id = (await c.start(AGENT_A, "conflict"))["id"]
    w = lambda mutation, args: c.write(AGENT_A, run_id, mutation, args)  # noqa: E731
    assert (await w("renameDocument", f'documentId: "{doc}", title: "by the agent"'))["status"] == "PUBLISHED"
    mine = (await w("createDocument", 'input: {title: "mine", body: "b"}'))["entityId"]
    assert (await w("editDocument", f'documentId: "{mine}", body: "held"'))["status"] == "HELD"
    await _applied(c, run_id, 2)
    # Someone else renames the document after the run did: undoing the run's rename would lose theirs.
    other = (await c.start(AGENT_B, "other"))["id"]
    await c.write(AGENT_B, other, "renameDocument", f'documentId: "{doc}", title: "by someone else"')
    await _applied(c, other, 1)

    assert (await w("createDocument", 'input: {title: "fourth", body: "b"}'))["code"] == "BREAKER_OPEN"
    run = await c.settled(run_id, compensated=1)
    assert run["status"] == "REVERT_FAILED", run
    assert {k: run["counts"][k] for k in ("held", "awaitingApproval", "published", "compensated",
                                          "discarded")} == {
        "held": 0, "awaitingApproval": 0, "published": 2, "compensated": 1, "discarded": 1}
    by_status = {s["status"]: s for s in run["steps"]["nodes"]}
    assert sorted(by_status) == ["COMPENSATED", "COMPENSATION_FAILED"]
    failing = by_status["COMPENSATION_FAILED"]
    assert failing["forwardType"] == "documents.rename.applied" and failing["failureReason"]
    failed = next(e for e in await _facts(world.bootstrap, run_id) if e.type == "run.revert_failed")
    (named,) = failed.payload["failing_steps"]
    assert named["forward_type"] == "documents.rename.applied" and "refused by documents" in named["reason"]
    # Still closed to every door, and the operator is told how to go on.
    body = await c.gql(f'mutation {{ releaseRun(runId: "{run_id}") {{ count }} }}')
    assert body["errors"][0]["extensions"]["code"] == "RUN_CLOSED"
    assert "call revertRun again" in body["errors"][0]["message"]
    assert (await w("createDocument", 'input: {title: "late", body: "b"}'))["code"] == "RUN_CLOSED"


async def _applied(c: Client, run_id: str, count: int, within_s: float = 60.0) -> None:
    deadline = time.monotonic() + within_s
    while (await c.run(run_id))["counts"]["applied"] < count:
        assert time.monotonic() < deadline, f"run {run_id}: fewer than {count} applied"
        await asyncio.sleep(0.2)


async def _work(c: Client, key: str, run_id: str) -> dict[str, Any]:
    """Four published writes (a document created and renamed, an account opened and posted to) and one
    held edit."""
    doc = (await c.write(key, run_id, "createDocument", 'input: {title: "t", body: "b"}'))["entityId"]
    await c.write(key, run_id, "renameDocument", f'documentId: "{doc}", title: "t2"')
    account = (await c.write(key, run_id, "openAccount", 'input: {name: "A", currency: "EUR"}'))["entityId"]
    await c.write(key, run_id, "postEntry", f'input: {{accountId: "{account}", amountCents: 5, memo: "m"}}')
    held = await c.write(key, run_id, "editDocument", f'documentId: "{doc}", body: "held"')
    assert held["status"] == "HELD"
    return {"doc": doc, "account": account}


async def test_revert_runs_by_agent_and_by_time_range_and_revert_run_revert_exactly_what_they_name(
        world: World) -> None:
    c, fleet = world.client, world.fleet
    await c.set_policy({"quarantineWindowS": 0, "operationWindows": {"documents.edit": 600}, "maxWrites": 100,
                        "maxVelocity": 1000, "maxServices": 10, "autoRevert": True, "holdTimeoutS": None})
    before = await fleet.snapshot()
    plan = [("a1", AGENT_A, "chat"), ("a2", AGENT_A, "batch"), ("b1", AGENT_B, "chat"),
            ("b2", AGENT_B, "chat"), ("c1", AGENT_B, "single")]
    runs: dict[str, dict[str, Any]] = {}
    keys = {name: key for name, key, _ in plan}
    entities: dict[str, dict[str, Any]] = {}
    for name, key, entry_point in plan:
        runs[name] = await c.start(key, entry_point)
        entities[name] = await _work(c, key, runs[name]["id"])
    ids = {name: str(run["id"]) for name, run in runs.items()}
    await c.data('mutation($r: ID!) { finishRun(runId: $r) { status } }', {"r": ids["a1"]}, AGENT_A)

    by_agent = (await c.data('mutation { revertRuns(selector: {agentId: "agent-a"}, reason: "bad prompt") '
                             "{ requested { id status } unchanged { id } } }"))["revertRuns"]
    assert sorted(r["id"] for r in by_agent["requested"]) == sorted([ids["a1"], ids["a2"]])
    assert {r["status"] for r in by_agent["requested"]} == {"REVERTING"} and by_agent["unchanged"] == []
    window = {"after": runs["a2"]["startedAt"], "before": runs["b2"]["startedAt"]}
    by_time = (await c.data(
        'mutation($after: DateTime!, $before: DateTime!) { revertRuns(selector: {startedAfter: $after, '
        'startedBefore: $before}, reason: "bad deploy") { requested { id } unchanged { id } } }',
        window))["revertRuns"]
    # a2 is in the window too: its revert under way covers it, and it is reported as left alone.
    assert by_time == {"requested": [{"id": ids["b1"]}], "unchanged": [{"id": ids["a2"]}]}
    one = await c.data('mutation($r: ID!) { revertRun(runId: $r, reason: "one bad run") { status } }',
                       {"r": ids["c1"]})
    assert one["revertRun"] == {"status": "REVERTING"}

    # No write is accepted for a run once its revert is requested; the run nobody named goes on.
    reverted = ("a1", "a2", "b1", "c1")
    for name in reverted:
        late = await c.write(keys[name], ids[name], "createDocument", 'input: {title: "late", body: "b"}')
        assert late == {"code": "RUN_CLOSED"}, name
    kept = await c.write(AGENT_B, ids["b2"], "createDocument", 'input: {title: "kept", body: "b"}')
    assert kept["status"] == "PUBLISHED"

    for name in reverted:
        run = await c.settled(ids[name], compensated=4)
        assert run["status"] == "REVERTED", (name, run)
        assert run["counts"] == {"held": 0, "awaitingApproval": 0, "published": 4, "applied": 4,
                                 "compensated": 4, "discarded": 1}, name
        assert await fleet.compensation_writes(ids[name]) == 4
    b2 = await c.run(ids["b2"])
    assert b2["status"] == "RUNNING" and b2["counts"]["compensated"] == 0 and b2["counts"]["held"] == 1
    # The coordinator starts a revert only on a request, and none was recorded for b2 (the topic is read
    # to its end, after every other run's outcome).
    assert "run.revert_requested" not in {e.type for e in await _facts(world.bootstrap, ids["b2"])}
    with pytest.raises(RPCError):
        await world.stack.client.get_workflow_handle(revert_workflow_id(ids["b2"])).describe()
    assert await fleet.compensation_writes(ids["b2"]) == 0
    problems = compare(before, await fleet.snapshot())
    b2_entities = [*entities["b2"].values(), kept["entityId"]]
    assert problems and all(any(e in p for e in b2_entities) for p in problems), problems
