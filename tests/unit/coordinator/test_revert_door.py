"""The coordinator has one way in for a revert: the gateway's `run.revert_requested`, and no side door."""

from __future__ import annotations

import uuid
from typing import Any, cast

from fastapi.routing import APIRoute

from kinshasa.coordinator.api import ledger_router
from kinshasa.coordinator.projector import trigger_of
from kinshasa.coordinator.run_ledger import Ledger
from kinshasa.coordinator.worker import WORKFLOWS
from kinshasa.schemas.envelope import Actor, Envelope, RunEventKind, utcnow

GATEWAY = Actor(kind="system", id="gateway")


def _fact(kind: RunEventKind, payload: dict[str, Any], actor: Actor = GATEWAY) -> Envelope:
    return Envelope(message_id=uuid.uuid4(), type=kind.type, run_id="run-1", actor=actor,
                    correlation_id="run-1", occurred_at=utcnow(), payload=payload)


def test_a_trip_never_starts_a_revert_whatever_its_auto_revert_says() -> None:
    for auto_revert in (True, False, None):
        payload = {"reason": "writes 11 exceeded the limit of 10", "published_count": 5}
        if auto_revert is not None:
            payload["auto_revert"] = auto_revert
        assert trigger_of(_fact(RunEventKind.TRIPPED, payload)) is None


def test_only_revert_requested_starts_one_with_the_gateways_count_reason_and_requester() -> None:
    fact = _fact(RunEventKind.REVERT_REQUESTED,
                 {"reason": "automatic revert after a trip: writes", "requested_by": "gateway",
                  "published_count": 7})
    trigger = trigger_of(fact)
    assert trigger is not None
    assert (trigger.run_id, trigger.message_id, trigger.source, trigger.published_count) == (
        "run-1", str(fact.message_id), "revert_requested", 7)
    assert (trigger.reason, trigger.requested_by) == ("automatic revert after a trip: writes", "gateway")
    bare = trigger_of(_fact(RunEventKind.REVERT_REQUESTED, {}, Actor(kind="operator", id="op-1")))
    assert bare is not None and (bare.reason, bare.requested_by, bare.published_count) == (
        "revert requested", "op-1", None)
    for kind in (RunEventKind.STARTED, RunEventKind.FINISHED, RunEventKind.DISCARDED, RunEventKind.REVERTED):
        assert trigger_of(_fact(kind, {"published_count": 3})) is None


def test_the_worker_runs_only_the_per_run_revert_workflow() -> None:
    assert [w.__temporal_workflow_definition.name for w in WORKFLOWS] == ["RevertRun"]  # type: ignore[attr-defined]


def test_the_coordinator_api_has_no_way_to_start_a_revert() -> None:
    router = ledger_router(cast(Ledger, object()))
    routes = {(route.path, method) for route in router.routes if isinstance(route, APIRoute)
              for method in route.methods or ()}
    assert not any(path.startswith("/reverts") for path, _ in routes)
    revert_routes = {(path, method) for path, method in routes if "revert" in path}
    assert revert_routes == {("/runs/{run_id}/revert", "GET")}  # its progress, a read
