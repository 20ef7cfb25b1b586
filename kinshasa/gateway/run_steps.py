"""A run's applied steps as the coordinator's ledger API returns them, read for the gateway's `Run.steps`.

The ledger is another process's answer: a step this gateway cannot read means the two disagree on the
API, a backend fault (BACKEND_UNAVAILABLE) the operator fixes by deploying matching versions.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kinshasa.gateway.errors import BackendUnavailable


class StepStatus(enum.Enum):
    """Where one applied forward step stands on the way back, as the ledger spells it."""

    APPLIED = "applied"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"
    IRREVERSIBLE = "irreversible"


@dataclass(frozen=True)
class LedgerStep:
    step_id: int
    forward_event_id: str
    forward_type: str
    operation: str
    command_id: str | None
    service: str
    entity_service: str
    entity_type: str
    entity_id: str
    entity_key: str
    actor_kind: str
    actor_id: str
    applied_at: datetime | None
    status: StepStatus
    attempts: int
    resolved_at: datetime | None
    failure_reason: str | None
    before: Any
    after: Any


def stamp(value: Any) -> datetime | None:
    """An ISO 8601 moment of the ledger API (`Z` or an offset), or None."""
    return None if value is None else datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def parse_step(step: Mapping[str, Any]) -> LedgerStep:
    """One step of the ledger API; a shape this gateway cannot read is the backend's fault."""
    try:
        entity, actor = step["entity"], step["actor"]
        forward_type = str(step["forward_type"])
        return LedgerStep(
            step_id=int(step["step_id"]),
            forward_event_id=str(step["forward_event_id"]),
            forward_type=forward_type,
            operation=forward_type.rsplit(".", 1)[0],
            command_id=str(step["command_id"]) if step.get("command_id") else None,
            service=str(step["service"]),
            entity_service=str(entity["service"]),
            entity_type=str(entity["type"]),
            entity_id=str(entity["id"]),
            entity_key=str(step["entity_key"]),
            actor_kind=str(actor["kind"]),
            actor_id=str(actor["id"]),
            applied_at=stamp(step.get("applied_at")),
            status=StepStatus(step["status"]),
            attempts=int(step.get("attempts") or 0),
            resolved_at=stamp(step.get("resolved_at")),
            failure_reason=step.get("failure_reason"),
            before=step.get("before"),
            after=step.get("after"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BackendUnavailable(
            f"the coordinator's ledger API answered a step this gateway cannot read ({exc!r}): are the "
            "gateway and the coordinator the same version?",
            backend="coordinator",
        ) from exc
