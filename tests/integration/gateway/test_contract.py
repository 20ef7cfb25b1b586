"""Contract tests: every mutation and query of the public GraphQL contract, with every error code."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from kinshasa.schemas.envelope import Actor, Envelope, deterministic_id, utcnow
from kinshasa.topics.catalogue import RUNS, commands_topic, events_topic
from tests.integration.gateway.conftest import (
    AGENT_KEY,
    OPERATOR_KEY,
    OTHER_AGENT_KEY,
    Harness,
    TopicReader,
    outbox_drained,
    publish,
)

RECEIPT = "{ commandId runId operation entityId status releaseAt }"
RUN = (
    "{ id agentId entryPoint status startedAt finishedAt breaker { state writes errors servicesTouched "
    "velocity "
    "trippedReason } counts { held awaitingApproval published applied compensated discarded } }"
)

# One call per catalogued operation, with valid arguments; {doc}/{acct} are filled with ids created first.
OPERATIONS = [
    ("createDocument", 'input: {title: "Plan", body: "text"}', True),
    ("renameDocument", 'documentId: "{doc}", title: "New"', False),
    ("editDocument", 'documentId: "{doc}", body: "new body"', False),
    ("archiveDocument", 'documentId: "{doc}"', False),
    ("unarchiveDocument", 'documentId: "{doc}"', False),
    ("openAccount", 'input: {name: "Cash", currency: "EUR"}', True),
    ("postEntry", 'input: {accountId: "{acct}", amountCents: 1500000000000, memo: "big"}', False),
    ("link", 'input: {fromId: "{doc}", toId: "{acct}", kind: "references"}', True),
    ("unlink", 'linkId: "link-1"', False),
]


async def test_start_write_and_finish_every_operation(harness: Harness, reader: TopicReader) -> None:
    c = harness.client
    await c.set_policy({"quarantineWindowS": 0})
    run_id = await c.start_run(entry_point="contract")
    doc, acct = "doc-1", "acct-1"
    receipts: dict[str, dict[str, Any]] = {}
    for name, args, creates in OPERATIONS:
        data = await c.data(
            f'mutation {{ {name}(runId: "{run_id}", {args.replace("{doc}", doc).replace("{acct}", acct)}) '
            f"{RECEIPT} }}"
        )
        receipt = data[name]
        assert (
            receipt["status"] == "PUBLISHED" and receipt["runId"] == run_id and receipt["releaseAt"] is None
        )
        if creates:
            uuid.UUID(receipt["entityId"])  # minted by the gateway
        receipts[name] = receipt
    assert receipts["renameDocument"]["entityId"] == doc
    assert receipts["postEntry"]["operation"] == "ledger.post_entry"

    email = (
        await c.data(
            f'mutation {{ sendEmail(runId: "{run_id}", input: {{to: "a@example.org", subject: "hi", '
            f'body: "x"}}) {RECEIPT} }}'
        )
    )["sendEmail"]
    assert email["status"] == "AWAITING_APPROVAL"

    run = (await c.data(f'{{ run(id: "{run_id}") {RUN} }}'))["run"]
    assert run["breaker"]["writes"] == len(OPERATIONS) + 1
    assert sorted(run["breaker"]["servicesTouched"]) == ["documents", "ledger", "links", "notifier"]
    assert run["counts"]["published"] == len(OPERATIONS) and run["counts"]["awaitingApproval"] == 1

    finished = (await c.data(f'mutation {{ finishRun(runId: "{run_id}") {{ status finishedAt }} }}'))[
        "finishRun"
    ]
    assert finished["status"] == "FINISHED" and finished["finishedAt"]
    error = await c.error(f'mutation {{ archiveDocument(runId: "{run_id}", documentId: "x") {{ status }} }}')
    assert error["extensions"]["code"] == "RUN_CLOSED"

    topics = [commands_topic(s) for s in ("documents", "ledger", "links", "notifier")]
    on_kafka = await reader.wait_for(topics, run_id, len(OPERATIONS))
    assert {e.message_id for e in on_kafka} == {uuid.UUID(r["commandId"]) for r in receipts.values()}
    post = next(e for e in on_kafka if e.type == "ledger.post_entry")
    assert post.payload == {"account_id": acct, "amount_cents": 1500000000000, "memo": "big"}
    assert post.actor == Actor(kind="agent", id="agent-1") and post.correlation_id == run_id
    assert post.entity is not None and post.entity.key == f"ledger:{acct}"
    lifecycle = await reader.wait_for([RUNS], run_id, 2)
    assert [e.type for e in lifecycle][:2] == ["run.started", "run.finished"]
    # Egress never left without approval.
    assert not [e for e in on_kafka if e.type == "notifier.send_email"]


async def test_error_codes(harness: Harness) -> None:
    c = harness.client
    q = 'mutation { startRun(entryPoint: "x") { id } }'
    assert (await c.error(q, key=None))["extensions"]["code"] == "UNAUTHENTICATED"
    assert (await c.error(q, key="not-a-key"))["extensions"]["code"] == "UNAUTHENTICATED"
    assert (await c.error(q, key=OPERATOR_KEY))["extensions"]["code"] == "FORBIDDEN"
    missing = f'mutation {{ archiveDocument(runId: "{uuid.uuid4()}", documentId: "d") {{ status }} }}'
    assert (await c.error(missing))["extensions"]["code"] == "RUN_NOT_FOUND"
    assert (await c.error(f'{{ run(id: "{uuid.uuid4()}") {{ id }} }}'))["extensions"][
        "code"
    ] == "RUN_NOT_FOUND"

    run_id = await c.start_run()
    bad = await c.error(
        f'mutation {{ openAccount(runId: "{run_id}", input: {{name: " ", currency: "eur"}}) {{ status }} }}'
    )
    assert bad["extensions"]["code"] == "VALIDATION"
    assert {f["path"] for f in bad["extensions"]["fields"]} == {"input.name", "input.currency"}
    wrong_type = await c.error(
        f'mutation {{ postEntry(runId: "{run_id}", input: {{accountId: "a", '
        'amountCents: "12"}) { status } }'
    )
    assert wrong_type["extensions"]["code"] == "VALIDATION"
    unknown = await c.error("{ nope }")
    assert unknown["extensions"]["code"] == "VALIDATION"
    # agent-2 may only call documents.*: scope is enforced per operation.
    other_run = await c.start_run(key=OTHER_AGENT_KEY)
    scoped = await c.error(
        f'mutation {{ unlink(runId: "{other_run}", linkId: "l") {{ status }} }}', key=OTHER_AGENT_KEY
    )
    assert scoped["extensions"]["code"] == "FORBIDDEN"
    # Nothing of the refused writes was counted.
    run = (await c.data(f'{{ run(id: "{run_id}") {RUN} }}'))["run"]
    assert run["breaker"]["writes"] == 0 and run["counts"]["published"] == 0


async def test_breaker_trip_alert_and_operator_states(harness: Harness, reader: TopicReader) -> None:
    c = harness.client
    await c.set_policy({"maxWrites": 2, "quarantineWindowS": 30, "probeWrites": 1, "autoRevert": False})
    run_id = await c.start_run(entry_point="trip")
    for _ in range(2):
        assert (await c.create_document(run_id))["data"]["createDocument"]["status"] == "HELD"
    refused = await c.create_document(run_id)
    error = refused["errors"][0]
    assert error["extensions"]["code"] == "BREAKER_OPEN"
    assert error["extensions"]["breaker"]["state"] == "OPEN" and error["extensions"]["breaker"]["writes"] == 2
    again = (await c.create_document(run_id))["errors"][0]
    assert again["extensions"]["code"] == "BREAKER_OPEN"

    alerts = (
        await c.data(
            f'{{ alerts(runId: "{run_id}") {{ kind agentId entryPoint threshold {{ name count limit }} '
            "servicesTouched held propagated summary } }",
            key=OPERATOR_KEY,
        )
    )["alerts"]
    assert len(alerts) == 1
    assert alerts[0]["threshold"] == {"name": "writes", "count": 3.0, "limit": 2.0}
    assert alerts[0]["held"] == 2 and alerts[0]["propagated"] == 0 and alerts[0]["agentId"] == "agent-1"
    tripped = await reader.wait_for([RUNS], run_id, 1, type_prefix="run.tripped")
    assert (
        len(tripped) == 1 and tripped[0].payload["held"] == 2 and tripped[0].payload["auto_revert"] is False
    )
    on_alerts = await reader.wait_for(["kinshasa.alerts"], run_id, 1)
    assert len(on_alerts) == 1

    status = (await c.data(f'{{ run(id: "{run_id}") {{ status breaker {{ state }} }} }}'))["run"]
    assert status == {"status": "TRIPPED", "breaker": {"state": "OPEN"}}
    half = (
        await c.data(
            f'mutation {{ setBreaker(runId: "{run_id}", state: HALF_OPEN) {{ breaker {{ state }} }} }}',
            key=OPERATOR_KEY,
        )
    )["setBreaker"]
    assert half["breaker"]["state"] == "HALF_OPEN"
    probe = await c.create_document(run_id)
    assert probe["data"]["createDocument"]["status"] == "HELD"
    assert (await c.create_document(run_id))["errors"][0]["extensions"]["code"] == "BREAKER_OPEN"
    closed = (
        await c.data(
            f'mutation {{ setBreaker(runId: "{run_id}", state: CLOSED) {{ status breaker {{ state }} }} }}',
            key=OPERATOR_KEY,
        )
    )["setBreaker"]
    assert closed == {"status": "RUNNING", "breaker": {"state": "CLOSED"}}
    opened = (
        await c.data(
            f'mutation {{ setBreaker(runId: "{run_id}", state: OPEN) {{ status }} }}', key=OPERATOR_KEY
        )
    )["setBreaker"]
    assert opened["status"] == "TRIPPED"


async def test_a_half_open_breaker_closes_once_every_probe_is_applied(harness: Harness) -> None:
    c = harness.client
    await c.set_policy({"maxWrites": 1, "quarantineWindowS": 0, "probeWrites": 1, "autoRevert": False})
    run_id = await c.start_run(entry_point="probes")
    assert "data" in await c.create_document(run_id)
    assert (await c.create_document(run_id))["errors"][0]["extensions"]["code"] == "BREAKER_OPEN"
    await c.data(f'mutation {{ setBreaker(runId: "{run_id}", state: HALF_OPEN) {{ status }} }}',
                 key=OPERATOR_KEY)
    probe = (await c.create_document(run_id))["data"]["createDocument"]
    assert probe["status"] == "PUBLISHED"
    run = (await c.data(f'{{ run(id: "{run_id}") {{ status breaker {{ state }} }} }}'))["run"]
    assert run == {"status": "TRIPPED", "breaker": {"state": "HALF_OPEN"}}  # until the probe is applied
    command = Envelope(
        message_id=uuid.UUID(probe["commandId"]), type="documents.create", run_id=run_id,
        actor=Actor(kind="agent", id="agent-1"), correlation_id=run_id, occurred_at=utcnow(),
        entity={"service": "documents", "type": "document", "id": probe["entityId"]},
    )
    applied = command.derive(type="documents.create.applied", actor=Actor(kind="service", id="documents"),
                             message_id=deterministic_id("applied", probe["commandId"]), payload={})
    await publish(harness.bootstrap, events_topic("documents"), applied)
    for _ in range(100):
        run = (await c.data(f'{{ run(id: "{run_id}") {{ status breaker {{ state }} }} }}'))["run"]
        if run["breaker"]["state"] != "HALF_OPEN":
            break
        await asyncio.sleep(0.2)
    assert run == {"status": "RUNNING", "breaker": {"state": "CLOSED"}}


async def test_rejections_feed_the_breaker(harness: Harness, reader: TopicReader) -> None:
    c = harness.client
    await c.set_policy({"maxErrors": 1, "quarantineWindowS": 0})
    run_id = await c.start_run(entry_point="errors")
    receipts = [(await c.create_document(run_id))["data"]["createDocument"] for _ in range(2)]
    for receipt in receipts:
        command = Envelope(
            message_id=uuid.UUID(receipt["commandId"]),
            type="documents.create",
            run_id=run_id,
            actor=Actor(kind="agent", id="agent-1"),
            correlation_id=run_id,
            occurred_at=utcnow(),
            entity={"service": "documents", "type": "document", "id": receipt["entityId"]},
        )
        rejected = command.derive(
            type="documents.create.rejected",
            actor=Actor(kind="service", id="documents"),
            message_id=deterministic_id("rejected", receipt["commandId"]),
            payload={"reason": "no", "code": "TEST"},
        )
        await publish(harness.bootstrap, events_topic("documents"), rejected)
        await publish(harness.bootstrap, events_topic("documents"), rejected)  # a redelivery: counted once
    for _ in range(100):
        run = (await c.data(f'{{ run(id: "{run_id}") {{ status breaker {{ errors state }} }} }}'))["run"]
        if run["breaker"]["errors"] >= 2:
            break
        await asyncio.sleep(0.2)
    # Auto-revert is on by default: the trip rang the revert doorbell in its own transaction.
    assert run == {"status": "REVERTING", "breaker": {"errors": 2, "state": "OPEN"}}
    listed = (await c.data(f'{{ run(id: "{run_id}") {{ commands {{ status result }} }} }}'))["run"][
        "commands"
    ]
    assert all(cmd == {"status": "REJECTED", "result": "REJECTED"} for cmd in listed)
    alerts = (await c.data(f'{{ alerts(runId: "{run_id}") {{ threshold {{ name }} }} }}', key=OPERATOR_KEY))[
        "alerts"
    ]
    assert alerts == [{"threshold": {"name": "errors"}}]


async def test_quarantine_release_discard_hold(harness: Harness, reader: TopicReader) -> None:
    c = harness.client
    await c.set_policy({"quarantineWindowS": 600})
    run_id = await c.start_run(entry_point="quarantine")
    held = [(await c.create_document(run_id))["data"]["createDocument"] for _ in range(2)]
    assert all(r["status"] == "HELD" and r["releaseAt"] for r in held)
    hold = (await c.data(f'mutation {{ holdRun(runId: "{run_id}") {{ count }} }}', key=OPERATOR_KEY))[
        "holdRun"
    ]
    assert hold["count"] == 2
    released = (
        await c.data(
            f'mutation {{ releaseRun(runId: "{run_id}") {{ count run {{ counts {{ held published }} }} }} }}',
            key=OPERATOR_KEY,
        )
    )["releaseRun"]
    assert released["count"] == 2 and released["run"]["counts"] == {"held": 0, "published": 2}
    third = (await c.create_document(run_id))["data"]["createDocument"]
    discarded = await c.data(f'mutation {{ discardRun(runId: "{run_id}") {{ count }} }}', key=OPERATOR_KEY)
    assert discarded["discardRun"]["count"] == 1
    await outbox_drained(harness.gateway.engine)
    on_kafka = await reader.envelopes([commands_topic("documents")], run_id)
    assert {str(e.message_id) for e in on_kafka} == {r["commandId"] for r in held}
    assert third["commandId"] not in {str(e.message_id) for e in on_kafka}
    kinds = [e.type for e in await reader.wait_for([RUNS], run_id, 3)]
    assert "run.released" in kinds and "run.discarded" in kinds


async def test_egress_approve_and_deny(harness: Harness, reader: TopicReader) -> None:
    c = harness.client
    await c.set_policy({"quarantineWindowS": 0})
    run_id = await c.start_run(entry_point="egress")
    send = (
        f'mutation {{ sendEmail(runId: "{run_id}", input: {{to: "a@example.org", subject: "s"}}) {RECEIPT} }}'
    )
    first = (await c.data(send))["sendEmail"]
    second = (await c.data(send))["sendEmail"]
    approved = (
        await c.data(
            f'mutation {{ approveEgress(commandId: "{first["commandId"]}") {{ status }} }}', key=OPERATOR_KEY
        )
    )["approveEgress"]
    denied = (
        await c.data(
            f'mutation {{ denyEgress(commandId: "{second["commandId"]}", reason: "spam") '
            "{ status reason } }",
            key=OPERATOR_KEY,
        )
    )["denyEgress"]
    assert approved == {"status": "PUBLISHED"} and denied == {"status": "DISCARDED", "reason": "spam"}
    twice = await c.error(
        f'mutation {{ approveEgress(commandId: "{second["commandId"]}") {{ status }} }}', key=OPERATOR_KEY
    )
    assert twice["extensions"]["code"] == "VALIDATION"
    await outbox_drained(harness.gateway.engine)
    sent = await reader.envelopes([commands_topic("notifier")], run_id)
    assert [str(e.message_id) for e in sent] == [first["commandId"]]


async def test_revert_doorbell_and_outcome(harness: Harness, reader: TopicReader) -> None:
    c = harness.client
    await c.set_policy({"quarantineWindowS": 0})
    published_run = await c.start_run(entry_point="revert-a")
    await c.create_document(published_run)
    await c.create_document(published_run)
    await c.set_policy({"quarantineWindowS": 600})
    held_run = await c.start_run(entry_point="revert-b")
    await c.create_document(held_run)

    one = (
        await c.data(
            f'mutation {{ revertRun(runId: "{published_run}", reason: "bad run") '
            "{ status breaker { state } } }",
            key=OPERATOR_KEY,
        )
    )["revertRun"]
    assert one == {"status": "REVERTING", "breaker": {"state": "OPEN"}}
    assert (await c.create_document(published_run))["errors"][0]["extensions"]["code"] == "RUN_CLOSED"
    many = (
        await c.data(
            'mutation($ids: [ID!]) { revertRuns(selector: {runIds: $ids}, reason: "bulk") '
            "{ requested { id counts { held discarded } } unchanged { id } } }",
            {"ids": [published_run, held_run]},
            OPERATOR_KEY,
        )
    )["revertRuns"]
    assert [r["id"] for r in many["requested"]] == [held_run]
    assert many["requested"][0]["counts"] == {"held": 0, "discarded": 1}
    assert [r["id"] for r in many["unchanged"]] == [published_run]
    by_agent = await c.data(
        'mutation { revertRuns(selector: {agentId: "agent-1", entryPoint: "revert-a"}, '
        'reason: "again") { requested { id } unchanged { id } } }',
        key=OPERATOR_KEY,
    )
    assert by_agent["revertRuns"] == {"requested": [], "unchanged": [{"id": published_run}]}
    empty = await c.error(
        'mutation { revertRuns(selector: {}, reason: "x") { requested { id } } }', key=OPERATOR_KEY
    )
    assert empty["extensions"]["code"] == "VALIDATION"
    missing = await c.error(
        f'mutation {{ revertRuns(selector: {{runIds: ["{uuid.uuid4()}"]}}, reason: "x") '
        "{ requested { id } } }",
        key=OPERATOR_KEY,
    )
    assert missing["extensions"]["code"] == "RUN_NOT_FOUND"

    requested = await reader.wait_for([RUNS], published_run, 1, type_prefix="run.revert_requested")
    assert len(requested) == 1 and requested[0].payload["published_count"] == 2
    assert requested[0].payload["requested_by"] == "op-1"
    # The coordinator reports the outcome on kinshasa.runs; the gateway's run view follows it.
    await publish(
        harness.bootstrap,
        RUNS,
        Envelope(
            message_id=uuid.uuid4(),
            type="run.reverted",
            run_id=published_run,
            actor=Actor(kind="system", id="coordinator"),
            occurred_at=utcnow(),
            payload={"compensated": 2, "irreversible": 0},
        ),
    )
    for _ in range(100):
        status = (await c.data(f'{{ run(id: "{published_run}") {{ status }} }}'))["run"]["status"]
        if status == "REVERTED":
            break
        await asyncio.sleep(0.2)
    assert status == "REVERTED"


async def test_runs_listing_and_pagination(harness: Harness) -> None:
    c = harness.client
    ids = [await c.start_run(entry_point="page") for _ in range(5)]
    await c.start_run(key=OTHER_AGENT_KEY, entry_point="page")
    seen: list[str] = []
    after = None
    while True:
        page = (
            await c.data(
                'query($a: String) { runs(filter: {entryPoint: "page"}, first: 2, after: $a) '
                "{ nodes { id agentId } pageInfo { hasNextPage endCursor } } }",
                {"a": after},
            )
        )["runs"]
        seen += [n["id"] for n in page["nodes"]]
        assert all(n["agentId"] == "agent-1" for n in page["nodes"])  # agents see only their own
        if not page["pageInfo"]["hasNextPage"]:
            break
        after = page["pageInfo"]["endCursor"]
    assert seen == list(reversed(ids))
    everyone = (
        await c.data(
            '{ runs(filter: {entryPoint: "page", status: RUNNING}, first: 50) { nodes { id } } }',
            key=OPERATOR_KEY,
        )
    )["runs"]["nodes"]
    assert len(everyone) == 6
    other = (await c.data('{ runs(filter: {agentId: "agent-2"}) { nodes { id } } }', key=OPERATOR_KEY))[
        "runs"
    ]["nodes"]
    assert len(other) == 1
    bad = await c.error('{ runs(after: "!!garbage") { nodes { id } } }')
    assert bad["extensions"]["code"] == "VALIDATION"


async def test_policy_versions_are_append_only(harness: Harness) -> None:
    c = harness.client
    await c.set_policy({"maxWrites": 10})
    await c.set_policy({"maxWrites": 3}, scope="AGENT", subject="agent-1")
    await c.set_policy(
        {"maxWrites": 5, "operationWindows": {"ledger.post_entry": 60}},
        scope="ENTRY_POINT",
        subject="nightly",
    )
    view = (
        await c.data(
            '{ policy(agentId: "agent-1", entryPoint: "nightly") { version effective { maxWrites '
            "operationWindows } layers { scope subject author } history { version reason } } }",
            key=OPERATOR_KEY,
        )
    )["policy"]
    # The entry point cannot loosen the agent's own limit (3) without loosen: true: the strictest applies.
    assert view["version"] == 3 and view["effective"]["maxWrites"] == 3
    assert view["effective"]["operationWindows"] == {"ledger.post_entry": 60}
    assert [entry["version"] for entry in view["history"]] == [3, 2, 1]
    assert {layer["author"] for layer in view["layers"]} == {"op-1"}
    bad = await c.error(
        'mutation { setPolicy(scope: AGENT, settings: {maxWrites: 0}, reason: "x", subject: "a") '
        "{ version } }",
        key=OPERATOR_KEY,
    )
    assert bad["extensions"]["code"] == "VALIDATION"
    unknown = await c.error(
        "mutation { setPolicy(scope: DEFAULT, settings: {operationWindows: {nope: 1}}, "
        'reason: "x") { version } }',
        key=OPERATOR_KEY,
    )
    assert unknown["extensions"]["code"] == "VALIDATION"


async def test_reads_say_which_backend_is_missing(harness: Harness) -> None:
    c = harness.client
    run_id = await c.start_run()
    for query in (
        '{ document(id: "d") { id } }',
        '{ account(id: "a") { id } }',
        '{ links(entityId: "d") { id } }',
        f'{{ emails(runId: "{run_id}") {{ id }} }}',
        '{ entity(service: "documents", type: "document", id: "d") { id } }',
    ):
        # The declarations in this test's catalogue name no read API: the service is unreachable, and the
        # error says which one without any address.
        error = await c.error(query)
        assert error["extensions"]["code"] == "BACKEND_UNAVAILABLE", error
        assert "publishes that in its declaration" in error["message"]
        assert "http" not in error["message"] and "127.0.0.1" not in error["message"]
    body = await c.gql(f'{{ run(id: "{run_id}") {{ id steps {{ nodes {{ stepId status }} }} }} }}')
    assert body["data"]["run"] == {"id": run_id, "steps": None}
    assert body["errors"][0]["extensions"]["code"] == "BACKEND_UNAVAILABLE"
    dlq = (await c.data("{ dlq { component count entries error } }", key=OPERATOR_KEY))["dlq"]
    assert dlq == [{"component": "gateway", "count": 0, "entries": [], "error": None}]
    # One component's only; a component the gateway does not know is refused, naming the known ones.
    only = await c.data('{ dlq(component: "gateway") { component count } }', key=OPERATOR_KEY)
    assert only["dlq"] == [{"component": "gateway", "count": 0}]
    unknown = await c.error('{ dlq(component: "nowhere") { component } }', key=OPERATOR_KEY)
    assert unknown["extensions"]["code"] == "VALIDATION" and "nowhere" in unknown["message"]
    assert "http" not in unknown["message"]
    reprocess = (
        await c.data(
            'mutation { reprocessDlq(component: "gateway", messageIds: ["m-1"]) '
            "{ component results count } }",
            key=OPERATOR_KEY,
        )
    )["reprocessDlq"]
    assert reprocess["component"] == "gateway" and reprocess["results"][0]["outcome"]
    me = (await c.data("{ me { id kind } }", key=AGENT_KEY))["me"]
    assert me == {"id": "agent-1", "kind": "agent"}
