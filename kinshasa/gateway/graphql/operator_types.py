"""The GraphQL object types besides runs: approvals, alerts, dead letters, policy, the catalogue, `me`."""

from datetime import datetime
from typing import Any

import strawberry
from strawberry.scalars import JSON

from kinshasa.gateway import policy as policy_mod
from kinshasa.gateway.alert_payloads import read_alert_payload
from kinshasa.gateway.graphql.enums import PolicyScope
from kinshasa.gateway.graphql.types import CommandReceipt, PageInfo


@strawberry.type(description="An egress command waiting for approveEgress or denyEgress, and what it is.")
class Approval:
    command: CommandReceipt
    run_id: strawberry.ID
    agent_id: str
    entry_point: str
    payload: JSON = strawberry.field(description="what the agent asked to send, as its service receives it")


@strawberry.type
class ApprovalEdge:
    cursor: str
    node: Approval


@strawberry.type
class ApprovalConnection:
    edges: list[ApprovalEdge]
    nodes: list[Approval]
    page_info: PageInfo


@strawberry.type
class AlertThreshold:
    name: str
    count: float
    limit: float


@strawberry.type(description="A step a revert could not compensate, as a revert_failed alert lists it.")
class AlertFailingStep:
    step_id: int | None
    forward_event_id: strawberry.ID | None
    forward_type: str | None
    reason: str | None


@strawberry.type(
    description="An operator alert: the gateway's breaker trips (kind run_tripped) and the alerts other "
    "components publish on kinshasa.alerts, such as the coordinator's revert_failed."
)
class Alert:
    id: strawberry.ID
    run_id: strawberry.ID = strawberry.field(description="the run it is about; empty if about no run")
    kind: str = strawberry.field(
        description="what happened: run_tripped, agent_budget, revert_failed, dlq_threshold, ..."
    )
    source: str = strawberry.field(description="the component that raised it: gateway, coordinator, ...")
    created_at: datetime
    summary: str
    agent_id: str | None
    entry_point: str | None
    threshold: AlertThreshold | None
    services_touched: list[str]
    held: int
    awaiting_approval: int
    propagated: int
    auto_revert: bool
    failing_steps: list[AlertFailingStep] = strawberry.field(
        description="revert_failed: the steps not compensated (the first ones; failingCount has the total)"
    )
    failing_count: int | None = strawberry.field(description="revert_failed: how many steps did not settle")
    details: JSON = strawberry.field(description="everything else the alert carries, as its source sent it")
    webhook_status: str | None

    @classmethod
    def of(cls, alert: Any) -> "Alert":
        """An alert record (`alerts.list_alerts`, the alert feed) as operators see it."""
        fields = read_alert_payload(alert.payload)
        threshold = fields.threshold
        return cls(
            id=strawberry.ID(alert.alert_id),
            run_id=strawberry.ID(alert.run_id),
            kind=alert.kind,
            source=alert.source,
            created_at=alert.created_at,
            summary=alert.summary,
            agent_id=fields.agent_id,
            entry_point=fields.entry_point,
            threshold=AlertThreshold(name=threshold.name, count=threshold.count, limit=threshold.limit)
            if threshold is not None
            else None,
            services_touched=fields.services_touched,
            held=fields.held,
            awaiting_approval=fields.awaiting_approval,
            propagated=fields.propagated,
            auto_revert=fields.auto_revert,
            failing_steps=[
                AlertFailingStep(
                    step_id=s.step_id,
                    forward_event_id=strawberry.ID(s.forward_event_id) if s.forward_event_id is not None
                    else None,
                    forward_type=s.forward_type,
                    reason=s.reason,
                )
                for s in fields.failing_steps
            ],
            failing_count=fields.failing_count,
            details=JSON(alert.payload),
            webhook_status=alert.webhook_status,
        )


@strawberry.type
class DlqComponent:
    component: str
    count: int | None
    entries: list[JSON]
    error: str | None


@strawberry.type
class DlqReprocessResult:
    component: str
    results: list[JSON]
    count: int | None


@strawberry.type
class PolicySettings:
    max_writes: int | None
    max_errors: int | None
    max_services: int | None
    max_velocity: int | None
    velocity_window_s: float | None
    quarantine_window_s: float | None
    operation_windows: JSON | None
    probe_writes: int | None
    hold_timeout_s: float | None
    auto_revert: bool | None
    operation_gates: list[str] | None = strawberry.field(
        description="operations that wait for approveEgress like egress does; they keep their inverse"
    )
    max_concurrent_runs: int | None = strawberry.field(
        description="RUNNING runs the agent may have at once; null: no budget"
    )
    max_runs_per_hour: int | None = strawberry.field(
        description="runs the agent may start in any hour; null: no budget"
    )
    max_agent_writes_per_hour: int | None = strawberry.field(
        description="writes the agent may make over all its runs in any hour; null: no budget"
    )

    @classmethod
    def of(cls, doc: Any) -> "PolicySettings":
        return cls(
            max_concurrent_runs=doc.max_concurrent_runs,
            max_runs_per_hour=doc.max_runs_per_hour,
            max_agent_writes_per_hour=doc.max_agent_writes_per_hour,
            max_writes=doc.max_writes,
            max_errors=doc.max_errors,
            max_services=doc.max_services,
            max_velocity=doc.max_velocity,
            velocity_window_s=doc.velocity_window_s,
            quarantine_window_s=doc.quarantine_window_s,
            operation_windows=doc.operation_windows,
            probe_writes=doc.probe_writes,
            hold_timeout_s=doc.hold_timeout_s,
            auto_revert=doc.auto_revert,
            operation_gates=doc.operation_gates,
        )


@strawberry.type
class PolicyVersion:
    version: int
    scope: PolicyScope
    subject: str
    settings: PolicySettings
    author: str
    reason: str
    created_at: datetime
    loosen: bool = strawberry.field(
        description="set with loosen: true, so this layer may loosen the layers below it (the DEFAULT "
        "layer always sets the base); otherwise it can only tighten them"
    )
    incident_id: strawberry.ID | None = strawberry.field(
        default=None, description="the incident whose accepted proposal appended this version"
    )

    @classmethod
    def of(cls, pv: policy_mod.PolicyVersion) -> "PolicyVersion":
        return cls(
            loosen=pv.loosen,
            version=pv.version,
            scope=pv.scope,
            subject=pv.subject,
            settings=PolicySettings.of(pv.document),
            author=pv.author,
            reason=pv.reason,
            created_at=pv.created_at,
            incident_id=strawberry.ID(pv.incident_id) if pv.incident_id else None,
        )


@strawberry.type
class PolicyView:
    version: int
    effective: PolicySettings = strawberry.field(
        description="what applies to the agent and entry point asked"
    )
    layers: list[PolicyVersion] = strawberry.field(description="the latest version of every layer")
    history: list[PolicyVersion] = strawberry.field(description="every version, newest first")


@strawberry.type
class OperationArgument:
    name: str = strawberry.field(description="the GraphQL argument: a payload field in camelCase, or input")
    type: str = strawberry.field(description="its GraphQL type: ID!, String!, the mutation's input type...")


@strawberry.type(description="One write an agent may ask for, from the operation catalogue: what SDKs and "
                 "the MCP server generate their calls and tools from.")
class Operation:
    service: str
    operation: str = strawberry.field(description="the command type, <service>.<operation>")
    mutation: str = strawberry.field(description="the GraphQL mutation that writes it")
    description: str
    egress: bool = strawberry.field(description="irreversible: held for an operator's approval")
    creates: bool = strawberry.field(description="creates its entity; the gateway mints the id")
    entity_type: str
    entity_id_field: str | None = strawberry.field(
        description="the payload field (snake_case) naming the entity it writes; null when it creates one"
    )
    input_schema: str = strawberry.field(
        description="the declared payload JSON Schema, as JSON text (snake_case properties)"
    )
    input_object: bool = strawberry.field(
        description="true: the payload goes in one `input` argument with camelCase keys; false: each "
        "payload field is its own camelCase argument"
    )
    allowed: bool = strawberry.field(description="whether your key's scopes permit this write")
    arguments: list[OperationArgument] = strawberry.field(
        description="the mutation's arguments besides runId (ID!) and idempotencyKey (String)"
    )


@strawberry.type
class Me:
    id: str
    kind: str
    scopes: list[str]
    entry_points: list[str] | None = strawberry.field(
        description="the entry points you may start runs at; null: any"
    )
