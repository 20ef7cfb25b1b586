"""A run's steps as the coordinator's ledger API returns them: read, or a backend fault when unreadable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from kinshasa.gateway.errors import BackendUnavailable
from kinshasa.gateway.run_steps import StepStatus, parse_step, stamp


def _step(**changes: Any) -> dict[str, Any]:
    step: dict[str, Any] = {
        "step_id": 2,
        "forward_event_id": "evt-2",
        "forward_type": "documents.rename.applied",
        "command_id": "cmd-2",
        "service": "documents",
        "entity": {"service": "documents", "type": "document", "id": "d1"},
        "entity_key": "documents:d1",
        "actor": {"kind": "agent", "id": "a1"},
        "applied_at": "2026-01-02T03:04:05Z",
        "status": "compensated",
        "attempts": 1,
        "resolved_at": "2026-01-02T03:05:00+00:00",
        "failure_reason": None,
        "before": {"title": "old"},
        "after": {"title": "new"},
    }
    step.update(changes)
    return step


def test_a_ledger_step_reads_with_its_operation_and_moments() -> None:
    step = parse_step(_step())
    assert (step.step_id, step.operation, step.command_id, step.status) == (
        2, "documents.rename", "cmd-2", StepStatus.COMPENSATED)
    assert (step.entity_service, step.entity_type, step.entity_id, step.entity_key) == (
        "documents", "document", "d1", "documents:d1")
    assert (step.actor_kind, step.actor_id) == ("agent", "a1")
    assert step.applied_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert (step.before, step.after) == ({"title": "old"}, {"title": "new"})


def test_optional_parts_of_a_step_may_be_missing() -> None:
    raw = _step(command_id="")
    for name in ("attempts", "resolved_at", "applied_at", "before", "after"):
        del raw[name]
    step = parse_step(raw)
    assert step.command_id is None and step.attempts == 0
    assert step.applied_at is None and step.resolved_at is None and step.before is None


def test_a_moment_keeps_its_offset() -> None:
    assert stamp(None) is None
    two_hours_east = timezone(timedelta(hours=2))
    assert stamp("2026-01-02T03:04:05+02:00") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=two_hours_east)


@pytest.mark.parametrize(
    "broken",
    [{"status": "lost"}, {"step_id": "two"}, {"entity": None}, {"applied_at": "yesterday"}],
)
def test_a_step_this_gateway_cannot_read_is_the_backends_fault(broken: dict[str, Any]) -> None:
    with pytest.raises(BackendUnavailable, match="same version") as exc:
        parse_step(_step(**broken))
    assert exc.value.extensions["backend"] == "coordinator"


def test_a_step_without_its_entity_is_the_backends_fault() -> None:
    raw = _step()
    del raw["entity"]
    with pytest.raises(BackendUnavailable, match="KeyError"):
        parse_step(raw)
