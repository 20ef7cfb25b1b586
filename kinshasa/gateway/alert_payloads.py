"""Reading an alert's payload for operators: the fields the `Alert` type shows, from a foreign document.

Alerts of other components (the coordinator's revert_failed, ...) are documents this gateway did not
write: a field that is missing or of an unexpected type reads as absent, never as an error, so one odd
alert cannot hide the others from the `alerts` query or the `alertRaised` subscription.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kinshasa.gateway.arguments import INT32


@dataclass(frozen=True)
class Threshold:
    name: str
    count: float
    limit: float


@dataclass(frozen=True)
class FailingStep:
    step_id: int | None
    forward_event_id: str | None
    forward_type: str | None
    reason: str | None


@dataclass(frozen=True)
class AlertFields:
    """What an alert's payload says, each field read as absent when it is not of the expected type."""

    agent_id: str | None
    entry_point: str | None
    threshold: Threshold | None
    services_touched: list[str]
    held: int
    awaiting_approval: int
    propagated: int
    auto_revert: bool
    failing_steps: list[FailingStep]
    failing_count: int | None


def int_or(value: Any, default: int | None) -> int | None:
    """An integer a GraphQL Int can carry, else `default`."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= INT32:
        return value
    return default


def text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def failing_steps(value: Any) -> list[FailingStep]:
    if not isinstance(value, list):
        return []
    return [
        FailingStep(
            step_id=int_or(s.get("step_id"), None),
            forward_event_id=text_or_none(s.get("forward_event_id")),
            forward_type=text_or_none(s.get("forward_type")),
            reason=text_or_none(s.get("reason")),
        )
        for s in value
        if isinstance(s, dict)
    ]


def threshold(value: Any) -> Threshold | None:
    if not isinstance(value, dict):
        return None
    name, count, limit = value.get("name"), value.get("count"), value.get("limit")
    if not (isinstance(name, str) and isinstance(count, int | float) and isinstance(limit, int | float)):
        return None
    return Threshold(name=name, count=float(count), limit=float(limit))


def read_alert_payload(payload: Mapping[str, Any]) -> AlertFields:
    services = payload.get("services_touched")
    return AlertFields(
        agent_id=text_or_none(payload.get("agent_id")),
        entry_point=text_or_none(payload.get("entry_point")),
        threshold=threshold(payload.get("threshold")),
        services_touched=[str(s) for s in services] if isinstance(services, list) else [],
        held=int_or(payload.get("held"), 0) or 0,
        awaiting_approval=int_or(payload.get("awaiting_approval"), 0) or 0,
        propagated=int_or(payload.get("propagated"), 0) or 0,
        auto_revert=payload.get("auto_revert") is True,
        failing_steps=failing_steps(payload.get("failing_steps")),
        failing_count=int_or(payload.get("failing_count"), None),
    )
