"""Contract tests of `Run.steps`: typed steps from the coordinator's real ledger API, a page at a time.

The ledger is the coordinator's own store and HTTP API (served on a free port), filled by its own
projector from contract-shaped events; the gateway reads it over HTTP as in the stack.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from kinshasa.coordinator.api import ledger_app
from kinshasa.coordinator.projector import LedgerProjector
from kinshasa.coordinator.run_ledger import Ledger
from kinshasa.coordinator.store import install_ledger
from kinshasa.gateway.app import Gateway
from kinshasa.gateway.settings import GatewayConfig
from kinshasa.infra.process import free_port
from kinshasa.kernel.component import QuietServer
from kinshasa.kernel.database import create_engine
from kinshasa.operator import gateway_client as operator
from kinshasa.schemas.envelope import Actor, EntityRef, Envelope, deterministic_id
from kinshasa.services.registry import example_catalogue
from kinshasa.settings import StackSettings
from tests.integration.gateway.conftest import (
    OPERATOR_KEY,
    OTHER_AGENT_KEY,
    SUPPORT_AGENT_KEY,
    Client,
    registry,
)

CATALOGUE = example_catalogue()

AGENT = Actor(kind="agent", id="agent-1")
COORDINATOR = Actor(kind="system", id="coordinator")
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)

STEP_FIELDS = """stepId forwardEventId forwardType operation commandId service
  entity { service type id } entityKey actor { kind id } appliedAt status attempts resolvedAt failureReason"""


@dataclass
class Stack:
    gateway: Gateway
    client: Client
    ledger: Ledger


@pytest.fixture
async def stack(
    database_url: str, tmp_path: Path, kafka: Any, examples_catalogue: str
) -> AsyncIterator[Stack]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'ledger.sqlite3'}")
    await install_ledger(engine)
    ledger = Ledger(engine)
    port = free_port()
    server = QuietServer(
        uvicorn.Config(
            ledger_app(ledger), host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="off"
        )
    )
    serving = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or serving.done():
            break
        await asyncio.sleep(0.02)
    assert server.started, "the ledger API did not start"
    settings = GatewayConfig(
        database_url=database_url, coordinator_url=f"http://127.0.0.1:{port}", background=False,
        catalogue_topic=examples_catalogue,
    )
    stack = StackSettings(data_dir=tmp_path / "data", kafka_bootstrap=kafka.bootstrap)
    gateway = Gateway(settings, stack, registry=registry())
    await gateway.start()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gateway.app), base_url="http://gateway", timeout=30
        ) as http:
            yield Stack(gateway, Client(http), ledger)
    finally:
        await gateway.stop()
        server.should_exit = True
        await serving
        await ledger.close()
        await engine.dispose()


def applied(run_id: str, command_type: str, entity_id: str, minute: int) -> Envelope:
    """A service's `*.applied` event exactly as docs/service-contract.md pins it."""
    spec = CATALOGUE.by_command_type(command_type)
    command_id = uuid.uuid4()
    return Envelope(
        message_id=deterministic_id("applied", str(command_id)),
        type=spec.event_type("applied"),
        run_id=run_id,
        actor=AGENT,
        causation_id=command_id,
        correlation_id=run_id,
        entity=EntityRef(service=spec.service, type=spec.entity_type, id=entity_id),
        occurred_at=T0 + timedelta(minutes=minute),
        payload={"before": None, "after": {"id": entity_id},
                 **({"irreversible": True} if spec.egress else {})},
    )


def outcome(forward: Envelope, suffix: str, reason: str | None = None) -> Envelope:
    """The owning service's answer to the first compensate command of `forward`."""
    compensate_id = deterministic_id("compensate", str(forward.message_id), "1")
    message_id = (
        deterministic_id("compensated", str(forward.message_id))
        if suffix == "compensated"
        else deterministic_id("compensation_failed", str(compensate_id))
    )
    payload: dict[str, Any] = {"forward_event_id": str(forward.message_id), "forward_type": forward.type}
    if reason:
        payload["reason"] = reason
    return Envelope(
        message_id=message_id,
        type=f"{forward.type.rsplit('.', 1)[0]}.{suffix}",
        run_id=forward.run_id,
        actor=COORDINATOR,
        causation_id=compensate_id,
        correlation_id=forward.run_id,
        entity=forward.entity,
        occurred_at=T0 + timedelta(minutes=30),
        payload=payload,
    )


async def fill_ledger(ledger: Ledger, run_id: str) -> list[Envelope]:
    """Four steps: 1 create (refused inverse), 2 rename (undone), 3 email (egress), 4 rename (applied)."""
    forward = [
        applied(run_id, "documents.create", "d1", 1),
        applied(run_id, "documents.rename", "d1", 2),
        applied(run_id, "notifier.send_email", "e1", 3),
        applied(run_id, "documents.rename", "d1", 4),
    ]
    projector = LedgerProjector()
    async with ledger.engine.begin() as conn:
        await projector.project_batch(conn, forward)
        await ledger.claim(conn, run_id, [1, 2], "pass-1", T0 + timedelta(minutes=20))
    async with ledger.engine.begin() as conn:
        await projector.project_batch(
            conn,
            [outcome(forward[1], "compensated"), outcome(forward[0], "compensation_failed", "edited since")],
        )
    return forward


async def test_steps_are_typed_and_paginated_newest_first(stack: Stack) -> None:
    c = stack.client
    run_id = await c.start_run(entry_point="steps")
    forward = await fill_ledger(stack.ledger, run_id)

    first = (
        await c.data(
            f"query($id: ID!) {{ run(id: $id) {{ steps(first: 2) {{ "
            f"edges {{ cursor node {{ {STEP_FIELDS} }} }} "
            "nodes { stepId } pageInfo { hasNextPage endCursor } } } }",
            {"id": run_id},
        )
    )["run"]["steps"]
    assert [e["node"]["stepId"] for e in first["edges"]] == [4, 3] and first["nodes"] == [
        {"stepId": 4},
        {"stepId": 3},
    ]
    assert first["pageInfo"] == {"hasNextPage": True, "endCursor": first["edges"][-1]["cursor"]}
    newest = first["edges"][0]["node"]
    assert newest == {
        "stepId": 4,
        "forwardEventId": str(forward[3].message_id),
        "forwardType": "documents.rename.applied",
        "operation": "documents.rename",
        "commandId": str(forward[3].causation_id),
        "service": "documents",
        "entity": {"service": "documents", "type": "document", "id": "d1"},
        "entityKey": "documents:d1",
        "actor": {"kind": "agent", "id": "agent-1"},
        "appliedAt": (T0 + timedelta(minutes=4)).isoformat(),
        "status": "APPLIED",
        "attempts": 0,
        "resolvedAt": None,
        "failureReason": None,
    }
    email = first["edges"][1]["node"]
    assert email["status"] == "IRREVERSIBLE" and email["entity"] == {
        "service": "notifier",
        "type": "email",
        "id": "e1",
    }

    rest = (
        await c.data(
            f"query($id: ID!, $after: String) {{ run(id: $id) {{ steps(first: 2, after: $after) {{ "
            f"nodes {{ {STEP_FIELDS} }} pageInfo {{ hasNextPage endCursor }} }} }} }}",
            {"id": run_id, "after": first["pageInfo"]["endCursor"]},
        )
    )["run"]["steps"]
    assert [n["stepId"] for n in rest["nodes"]] == [2, 1]
    assert rest["pageInfo"] == {"hasNextPage": False, "endCursor": "1"}
    undone, refused = rest["nodes"]
    assert (undone["status"], undone["attempts"], undone["failureReason"]) == ("COMPENSATED", 1, None)
    assert undone["resolvedAt"] == (T0 + timedelta(minutes=30)).isoformat()
    assert (refused["status"], refused["attempts"], refused["failureReason"]) == (
        "COMPENSATION_FAILED",
        1,
        "edited since",
    )

    # The operator CLI's client reads the same typed steps, following the pages itself.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(operator, "STEPS_PAGE", 3)
        client = operator.GatewayClient(
            url="http://gateway/graphql",
            key=OPERATOR_KEY,
            transport=httpx.ASGITransport(app=stack.gateway.app),
        )
        detail = await client.run(run_id, steps=4)
    assert [s["stepId"] for s in detail["steps"]["nodes"]] == [4, 3, 2, 1] and not client.warnings
    lines = operator.timeline(detail)
    shown = lines[lines.index("  steps, newest first (4 shown):") + 1 :]
    assert "IRREVERSIBLE (egress)" in shown[1] and "undone" in shown[2] and "(edited since)" in shown[3]


async def test_steps_of_a_run_the_ledger_has_not_seen_and_bad_cursors(stack: Stack) -> None:
    c = stack.client
    run_id = await c.start_run(entry_point="steps-empty")
    empty = (
        await c.data(
            "query($id: ID!) { run(id: $id) { steps { edges { cursor } nodes { stepId } "
            "pageInfo { hasNextPage endCursor } } } }",
            {"id": run_id},
        )
    )["run"]["steps"]
    assert empty == {"edges": [], "nodes": [], "pageInfo": {"hasNextPage": False, "endCursor": None}}
    for after in ("abc", "0", "-1", "9" * 40):
        error = await c.error(
            "query($id: ID!, $a: String) { run(id: $id) { steps(after: $a) { nodes { stepId } } } }",
            {"id": run_id, "a": after},
        )
        assert error["extensions"]["code"] == "VALIDATION", after
    error = await c.error(f'{{ run(id: "{run_id}") {{ steps(first: 0) {{ nodes {{ stepId }} }} }} }}')
    assert error["extensions"]["code"] == "VALIDATION"


async def test_the_steps_of_many_runs_are_one_call_to_the_coordinator(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = stack.client
    run_ids = [await c.start_run(entry_point="steps-batch") for _ in range(4)]
    await fill_ledger(stack.ledger, run_ids[1])
    backends = stack.gateway.backends
    real, asked = backends.steps_many, []

    async def counted(wanted: Any, timeout_s: float | None = None) -> Any:
        asked.append(list(wanted))
        return await real(wanted, timeout_s)

    monkeypatch.setattr(backends, "steps_many", counted)
    found = (
        await c.data(
            '{ runs(first: 10, filter: {entryPoint: "steps-batch"}) { nodes { id '
            "steps(first: 2) { nodes { stepId } pageInfo { hasNextPage } } } } }"
        )
    )["runs"]["nodes"]

    assert len(asked) == 1 and sorted(r for r, _, _ in asked[0]) == sorted(run_ids)
    steps = {run["id"]: run["steps"] for run in found}
    assert steps[run_ids[1]] == {"nodes": [{"stepId": 4}, {"stepId": 3}], "pageInfo": {"hasNextPage": True}}
    empty = {"nodes": [], "pageInfo": {"hasNextPage": False}}
    assert all(steps[r] == empty for r in run_ids if r != run_ids[1])


async def test_each_step_shows_the_entity_before_and_after_and_the_run_its_revert_progress(
    stack: Stack,
) -> None:
    c = stack.client
    run_id = await c.start_run(entry_point="steps-diff")
    query = """query($id: ID!) { run(id: $id) { revertProgress { total compensated failing pending }
      steps { nodes { stepId status before after } } } }"""
    # The ledger has not seen the run yet: nothing to revert.
    unseen = (await c.data(query, {"id": run_id}, OPERATOR_KEY))["run"]
    assert unseen["revertProgress"] == {"total": 0, "compensated": 0, "failing": 0, "pending": 0}

    await fill_ledger(stack.ledger, run_id)
    renamed = applied(run_id, "documents.rename", "d1", 5)
    renamed = renamed.model_copy(update={"payload": {
        "old_title": "Q3", "new_title": "Q3 (final)",
        "before": {"id": "d1", "title": "Q3", "status": "active"},
        "after": {"id": "d1", "title": "Q3 (final)", "status": "active"}}})
    async with stack.ledger.engine.begin() as conn:
        await LedgerProjector().project_batch(conn, [renamed])

    run = (await c.data(query, {"id": run_id}, OPERATOR_KEY))["run"]
    newest = run["steps"]["nodes"][0]
    assert newest == {"stepId": 5, "status": "APPLIED",
                      "before": {"id": "d1", "title": "Q3", "status": "active"},
                      "after": {"id": "d1", "title": "Q3 (final)", "status": "active"}}
    created = run["steps"]["nodes"][-1]
    assert created["before"] is None and created["after"] == {"id": "d1"}
    # Steps 1 (refused), 2 (undone), 4 and 5 (applied) are the revert's; 3 is egress and never is.
    assert run["revertProgress"] == {"total": 4, "compensated": 1, "failing": 1, "pending": 2}


async def test_before_and_after_are_shown_only_to_a_caller_who_may_read_the_service(stack: Stack) -> None:
    """A write scope is not a read scope: the states on a run's steps are the service's entities, so an
    agent that may write documents but not read them sees null, as it would reading the document itself."""
    c = stack.client
    query = "query($id: ID!) { run(id: $id) { steps { nodes { stepId service before after } } } }"
    states = {"before": {"id": "d1", "title": "Q3"}, "after": {"id": "d1", "title": "Q3 (final)"}}

    async def run_with_states(key: str, entry_point: str) -> str:
        run_id = await c.start_run(key=key, entry_point=entry_point)
        rename = applied(run_id, "documents.rename", "d1", 1)
        rename = rename.model_copy(update={"payload": states})
        email = applied(run_id, "notifier.send_email", "e1", 2)
        email = email.model_copy(update={"payload": {**states, "irreversible": True}})
        async with stack.ledger.engine.begin() as conn:
            await LedgerProjector().project_batch(conn, [rename, email])
        return run_id

    def shown(nodes: list[dict[str, Any]]) -> dict[str, tuple[Any, Any]]:
        return {n["service"]: (n["before"], n["after"]) for n in nodes}

    # agent-2 writes documents and reads nothing: its own run's steps are there, their states are not.
    writer_run = await run_with_states(OTHER_AGENT_KEY, "steps-scoped")
    nodes = (await c.data(query, {"id": writer_run}, OTHER_AGENT_KEY))["run"]["steps"]["nodes"]
    assert [n["stepId"] for n in nodes] == [2, 1]
    assert shown(nodes) == {"notifier": (None, None), "documents": (None, None)}
    # The operator sees every state of the same run.
    operator_view = (await c.data(query, {"id": writer_run}, OPERATOR_KEY))["run"]["steps"]["nodes"]
    assert shown(operator_view) == {
        "notifier": (states["before"], states["after"]), "documents": (states["before"], states["after"])}

    # agent-3 reads documents (`documents:read`) but not the notifier's entities.
    reader_run = await run_with_states(SUPPORT_AGENT_KEY, "support-bot")
    nodes = (await c.data(query, {"id": reader_run}, SUPPORT_AGENT_KEY))["run"]["steps"]["nodes"]
    assert shown(nodes) == {"notifier": (None, None), "documents": (states["before"], states["after"])}


async def test_a_huge_state_is_kept_as_a_note(stack: Stack) -> None:
    # A ledger from before steps carried states gains the columns by migration: tests/integration/migrations.
    c = stack.client
    run_id = await c.start_run(entry_point="steps-huge")
    event = applied(run_id, "documents.edit", "d9", 1)
    event = event.model_copy(update={"payload": {"before": {"body": "x" * 100_000}, "after": {"body": "y"}}})
    async with stack.ledger.engine.begin() as conn:
        await LedgerProjector().project_batch(conn, [event])
    step = (await c.data("query($id: ID!) { run(id: $id) { steps { nodes { before after } } } }",
                         {"id": run_id}, OPERATOR_KEY))["run"]["steps"]["nodes"][0]
    assert "read the entity from its service" in step["before"]["omitted"] and step["after"] == {"body": "y"}
