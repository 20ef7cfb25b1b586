"""The GraphQL input types operators send: run filters and selectors, and a policy layer's settings."""

from datetime import datetime
from typing import Any

import strawberry
from strawberry.scalars import JSON

from kinshasa.gateway import policy as policy_mod
from kinshasa.gateway.graphql.enums import BreakerState, RunStatus
from kinshasa.gateway.graphql.permissions import ctx
from kinshasa.gateway.policy_input import check_layer


@strawberry.input
class RunFilter:
    agent_id: str | None = None
    entry_point: str | None = None
    status: RunStatus | None = None
    started_after: datetime | None = None
    started_before: datetime | None = None
    breaker_state: BreakerState | None = None


@strawberry.input
class RunSelector:
    run_ids: list[strawberry.ID] | None = None
    agent_id: str | None = None
    entry_point: str | None = None
    started_after: datetime | None = None
    started_before: datetime | None = None


@strawberry.input(
    description="Fields left null inherit from the layer below (defaults < agent < entry point). The AGENT "
    "and ENTRY_POINT layers resolve every limit to the strictest of the layers unless set with loosen: true. "
    "The agent budgets (maxConcurrentRuns, maxRunsPerHour, maxAgentWritesPerHour) are set at the DEFAULT "
    "and AGENT scopes only."
)
class PolicyInput:
    max_writes: int | None = None
    max_errors: int | None = None
    max_services: int | None = None
    max_velocity: int | None = None
    velocity_window_s: float | None = None
    quarantine_window_s: float | None = None
    operation_windows: JSON | None = None
    probe_writes: int | None = None
    hold_timeout_s: float | None = None
    auto_revert: bool | None = None
    max_concurrent_runs: int | None = None
    max_runs_per_hour: int | None = None
    max_agent_writes_per_hour: int | None = None
    operation_gates: list[str] | None = None


def policy_layer(
    info: strawberry.Info, scope: Any, subject: str | None, settings: PolicyInput
) -> tuple[policy_mod.PolicyScope, str, policy_mod.PolicyDocument]:
    """A layer as setPolicy and backtestPolicy take it, checked against the running catalogue."""
    return check_layer(ctx(info).services.catalogue, scope, subject, vars(settings))
