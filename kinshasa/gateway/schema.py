"""The public GraphQL schema: reads, operator mutations, and one agent mutation per catalogued operation.

Agent mutations are generated from the operation catalogue: each payload model becomes typed GraphQL
arguments (camelCase), validated by the same pydantic model the services use, so an operation a service
declares appears here without a hand-written resolver. Create operations and payloads of three or more
fields take one `input` object (`createOrder(runId, input: {customer, note})`); smaller updates take flat
arguments (`renameOrder(runId, orderId, name)`).
"""

import enum
import inspect
import json
import logging
import types
import typing
from collections.abc import AsyncGenerator, Callable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, NewType, Union

import annotated_types
import strawberry
from graphql import GraphQLError
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from strawberry.permission import BasePermission
from strawberry.scalars import JSON
from strawberry.schema.config import StrawberryConfig

from kinshasa.gateway import approvals as approvals_mod
from kinshasa.gateway import breaker as breaker_mod
from kinshasa.gateway import durability, egress, idempotency, live, quarantine, store
from kinshasa.gateway import incidents as incidents_mod
from kinshasa.gateway import policy as policy_mod
from kinshasa.gateway import proposals as proposals_mod
from kinshasa.gateway import revert as revert_mod
from kinshasa.gateway import runs as runs_mod
from kinshasa.gateway.alerts import list_alerts
from kinshasa.gateway.backtest import backtest_policy
from kinshasa.gateway.commands import Receipt, get_command, list_commands
from kinshasa.gateway.context import GatewayContext
from kinshasa.gateway.cost import BATCHED, BATCHED_BACKEND, CALLS_BACKEND
from kinshasa.gateway.entity_reads import Entity, ReadWiring, entity_query, typed_reads
from kinshasa.gateway.errors import (
    BackendUnavailable,
    Forbidden,
    Invalid,
    NotFound,
    camel,
    code_errors,
    invalid_from_pydantic,
)
from kinshasa.gateway.incident_types import (
    Incident,
    IncidentConnection,
    IncidentKind,
    PolicyBacktest,
    PolicyProposal,
    connection,
)
from kinshasa.gateway.receipts_view import ReceiptChainReport, receipt_chain_query
from kinshasa.gateway.uow import transaction
from kinshasa.kernel.logs import log_context
from kinshasa.schemas.declaration import ServiceDeclaration
from kinshasa.schemas.envelope import Actor
from kinshasa.schemas.operations import OperationCatalogue, OperationSpec
from kinshasa.schemas.payloads import error_messages

log = logging.getLogger(__name__)

INT32 = 2**31 - 1
SAFE_INT = 2**53 - 1
PAGE_MAX = 200
ID_MAX = 256


def _parse_long(value: Any) -> int:
    # bool is an int in Python; a JSON true is never an amount.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Long must be an integer, got {type(value).__name__}")
    if abs(value) > SAFE_INT:
        raise ValueError("Long must be within ±(2^53 - 1) so every client can represent it exactly")
    return value


Long = NewType("Long", int)
LONG_SCALAR = strawberry.scalar(
    name="Long",
    serialize=int,
    parse_value=_parse_long,
    description="A 53-bit signed integer (GraphQL Int is only 32-bit), e.g. an amount in cents.",
)


# --- enums ---------------------------------------------------------------------------------------------


@strawberry.enum
class RunStatus(enum.Enum):
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    TRIPPED = "TRIPPED"
    REVERTING = "REVERTING"
    REVERTED = "REVERTED"
    REVERT_FAILED = "REVERT_FAILED"


@strawberry.enum
class BreakerState(enum.Enum):
    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


@strawberry.enum(
    description="HELD (in its run's quarantine window) or AWAITING_APPROVAL (egress waiting for an operator),"
    " then PUBLISHED (sent to its service), then APPLIED (a read now sees it) or REJECTED (see "
    "rejectedReason); APPLIED becomes COMPENSATED when a revert undoes it. DISCARDED: dropped before it "
    "was published."
)
class CommandStatus(enum.Enum):
    HELD = "HELD"
    PUBLISHED = "PUBLISHED"
    AWAITING_APPROVAL = "AWAITING_APPROVAL"
    DISCARDED = "DISCARDED"
    APPLIED = "APPLIED"
    REJECTED = "REJECTED"
    COMPENSATED = "COMPENSATED"


strawberry.enum(policy_mod.PolicyScope)  # registers the policy's own enum as a GraphQL enum
PolicyScope = policy_mod.PolicyScope


# --- authorization: checked here, in one place ---------------------------------------------------------


def _ctx(info: strawberry.Info) -> GatewayContext:
    context: GatewayContext = info.context
    return context


class IsAuthenticated(BasePermission):
    message = "authentication required: send 'Authorization: Bearer <key>'"

    def has_permission(self, source: Any, info: strawberry.Info, **kwargs: Any) -> bool:
        _ctx(info).require_principal()
        return True


class IsAgent(BasePermission):
    message = "only agents may call this"

    def has_permission(self, source: Any, info: strawberry.Info, **kwargs: Any) -> bool:
        _ctx(info).require_agent()
        return True


class IsOperator(BasePermission):
    message = "this is an operator action: agents cannot call it"

    def has_permission(self, source: Any, info: strawberry.Info, **kwargs: Any) -> bool:
        _ctx(info).require_operator()
        return True


AUTHENTICATED: list[type[BasePermission]] = [IsAuthenticated]
AGENT: list[type[BasePermission]] = [IsAgent]
OPERATOR: list[type[BasePermission]] = [IsOperator]


def _bounded(value: str | None, name: str, limit: int = ID_MAX) -> None:
    if value is not None and len(value) > limit:
        raise Invalid(f"{name} is longer than {limit} characters", [(name, "too long")])


def _page(first: int) -> int:
    if first < 1 or first > PAGE_MAX:
        raise Invalid(f"first must be between 1 and {PAGE_MAX}", [("first", "out of range")])
    return first


# --- output types --------------------------------------------------------------------------------------


@strawberry.type(description="The run's circuit breaker as of this read.")
class Breaker:
    state: BreakerState
    writes: int
    errors: int
    services_touched: list[str]
    velocity: int = strawberry.field(description="writes inside the current velocity window")
    velocity_window_s: float
    tripped_reason: str | None
    tripped_at: datetime | None
    probes_left: int
    trip_count: int


@strawberry.type
class RunCounts:
    held: int
    awaiting_approval: int
    published: int
    applied: int
    compensated: int
    discarded: int
    rejected: int


@strawberry.type(description="What an agent gets back for a write, at once.")
class CommandReceipt:
    command_id: strawberry.ID
    run_id: strawberry.ID
    operation: str = strawberry.field(description="command type, e.g. orders.rename")
    mutation: str = strawberry.field(description="the GraphQL mutation that wrote it")
    entity_id: strawberry.ID
    status: CommandStatus
    release_at: datetime | None
    accepted_at: datetime | None
    result: str | None = strawberry.field(
        description="what became of it downstream: APPLIED, REJECTED or COMPENSATED, once known"
    )
    reason: str | None
    applied_at: datetime | None = strawberry.field(description="when the service applied it")
    rejected_reason: str | None = strawberry.field(description="why the service refused it (status REJECTED)")
    compensated_at: datetime | None = strawberry.field(description="when a revert undid it")

    @classmethod
    def of(cls, receipt: Receipt) -> "CommandReceipt":
        return cls(
            command_id=strawberry.ID(receipt.command_id),
            run_id=strawberry.ID(receipt.run_id),
            operation=receipt.operation,
            mutation=receipt.mutation,
            entity_id=strawberry.ID(receipt.entity_id),
            status=CommandStatus(receipt.status),
            release_at=receipt.release_at,
            accepted_at=receipt.accepted_at,
            result=receipt.result,
            reason=receipt.reason,
            applied_at=receipt.applied_at,
            rejected_reason=receipt.rejected_reason,
            compensated_at=receipt.compensated_at,
        )


@strawberry.type
class PageInfo:
    has_next_page: bool
    end_cursor: str | None


@strawberry.enum(description="Where one applied forward step stands on the way back.")
class StepStatus(enum.Enum):
    APPLIED = "applied"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"
    IRREVERSIBLE = "irreversible"


@strawberry.type(name="EntityRef", description="The entity a message is about.")
class EntityRefView:
    service: str
    type: str
    id: strawberry.ID


@strawberry.type(name="Actor", description="Who caused a message: agent, operator, service or system.")
class ActorView:
    kind: str
    id: str


def _stamp(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _may_read_step(info: strawberry.Info, service: str) -> bool:
    principal = _ctx(info).principal
    return principal is not None and principal.may_read(service)


@strawberry.type(description="One applied forward step of a run, as the coordinator's ledger holds it.")
class RunStep:
    step_id: int = strawberry.field(description="the step's place in the run's apply order, 1 first")
    forward_event_id: strawberry.ID = strawberry.field(description="message id of the *.applied event")
    forward_type: str = strawberry.field(description="that event's type, e.g. orders.rename.applied")
    operation: str = strawberry.field(description="the command type, e.g. orders.rename")
    command_id: strawberry.ID | None = strawberry.field(description="the gateway's commandId it applied")
    service: str
    entity: EntityRefView
    entity_key: str = strawberry.field(description="service:id, the Kafka key of the entity's messages")
    actor: ActorView = strawberry.field(description="who wrote the forward command")
    applied_at: datetime | None
    status: StepStatus
    attempts: int = strawberry.field(description="compensate commands emitted for it so far")
    resolved_at: datetime | None = strawberry.field(description="when it was compensated or refused")
    failure_reason: str | None = strawberry.field(description="why the service refused its inverse")
    # The domain states the service put on its `applied` event: shown only to a caller who may read the
    # service's entities (a write scope is not a read scope), through `before` and `after` below.
    before_state: strawberry.Private[Any]
    after_state: strawberry.Private[Any]

    @strawberry.field(description="the entity as its service showed it before the step; null unless the "
                      "caller may read the service's entities (`<service>:read`, or an operator)")
    def before(self, info: strawberry.Info) -> JSON | None:
        return self.before_state if _may_read_step(info, self.service) else None

    @strawberry.field(description="the entity as its service showed it after the step; null unless the "
                      "caller may read the service's entities (`<service>:read`, or an operator)")
    def after(self, info: strawberry.Info) -> JSON | None:
        return self.after_state if _may_read_step(info, self.service) else None

    @classmethod
    def of(cls, step: dict[str, Any]) -> "RunStep":
        """Parse one step of the ledger API; a shape this gateway cannot read is the backend's fault."""
        try:
            entity, actor = step["entity"], step["actor"]
            forward_type = str(step["forward_type"])
            return cls(
                step_id=int(step["step_id"]),
                forward_event_id=strawberry.ID(str(step["forward_event_id"])),
                forward_type=forward_type,
                operation=forward_type.rsplit(".", 1)[0],
                command_id=strawberry.ID(str(step["command_id"])) if step.get("command_id") else None,
                service=str(step["service"]),
                entity=EntityRefView(
                    service=str(entity["service"]),
                    type=str(entity["type"]),
                    id=strawberry.ID(str(entity["id"])),
                ),
                entity_key=str(step["entity_key"]),
                actor=ActorView(kind=str(actor["kind"]), id=str(actor["id"])),
                applied_at=_stamp(step.get("applied_at")),
                status=StepStatus(step["status"]),
                attempts=int(step.get("attempts") or 0),
                resolved_at=_stamp(step.get("resolved_at")),
                failure_reason=step.get("failure_reason"),
                before_state=step.get("before"),
                after_state=step.get("after"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendUnavailable(
                f"the coordinator's ledger API answered a step this gateway cannot read ({exc!r}): are the "
                "gateway and the coordinator the same version?",
                backend="coordinator",
            ) from exc


@strawberry.type
class RunStepEdge:
    cursor: str
    node: RunStep


@strawberry.type(description="A page of a run's steps, newest first.")
class RunStepConnection:
    edges: list[RunStepEdge]
    nodes: list[RunStep]
    page_info: PageInfo


def _step_cursor(after: str | None) -> int | None:
    """`after` of Run.steps: the cursor of a step (its step id), as pageInfo.endCursor gave it."""
    if after is None:
        return None
    if not after.isdigit() or len(after) > 15 or int(after) < 1:
        raise Invalid(
            "after must be a cursor from a previous page's steps.pageInfo.endCursor",
            [("after", "not a step cursor")],
        )
    return int(after)


@strawberry.type(description="Where a run's applied steps stand on the way back; pending reaches 0 when "
                 "its revert is done. Egress is never compensated, so it is not counted.")
class RevertProgress:
    total: int = strawberry.field(description="applied steps a revert compensates")
    compensated: int
    failing: int = strawberry.field(description="steps whose service refused the inverse")
    pending: int = strawberry.field(description="steps not compensated yet")


@strawberry.type
class Run:
    id: strawberry.ID
    agent_id: str
    entry_point: str
    purpose: str | None
    status: RunStatus
    started_at: datetime
    finished_at: datetime | None
    revert_reason: str | None
    revert_requested_at: datetime | None
    policy_version: int | None = strawberry.field(
        description="the policy version that governed the run's latest breaker decision"
    )
    record: strawberry.Private[runs_mod.RunRecord]

    @classmethod
    def of(cls, record: runs_mod.RunRecord) -> "Run":
        return cls(
            id=strawberry.ID(record.run_id),
            agent_id=record.agent_id,
            entry_point=record.entry_point,
            purpose=record.purpose,
            status=RunStatus(record.status),
            started_at=record.started_at,
            finished_at=record.finished_at,
            revert_reason=record.revert_reason,
            revert_requested_at=record.revert_requested_at,
            policy_version=record.policy_version,
            record=record,
        )

    @strawberry.field(metadata=BATCHED)
    async def breaker(self, info: strawberry.Info) -> Breaker:
        r = self.record
        policy, recent = await _ctx(info).reads.breaker(r.run_id, r.agent_id, r.entry_point)
        return Breaker(
            state=BreakerState(r.breaker_state),
            writes=r.writes,
            errors=r.errors,
            services_touched=list(r.services),
            velocity=recent,
            velocity_window_s=policy.velocity_window_s,
            tripped_reason=r.tripped_reason,
            tripped_at=r.tripped_at,
            probes_left=r.probes_left,
            trip_count=r.trip_count,
        )

    @strawberry.field(metadata=BATCHED)
    async def counts(self, info: strawberry.Info) -> RunCounts:
        by_status = await _ctx(info).reads.command_counts(self.record.run_id)
        r = self.record
        return RunCounts(
            held=by_status.get(store.HELD, 0),
            awaiting_approval=by_status.get(store.AWAITING_APPROVAL, 0),
            published=r.published,
            applied=r.applied,
            compensated=r.compensated,
            discarded=by_status.get(store.DISCARDED, 0),
            rejected=by_status.get(store.REJECTED, 0),
        )

    @strawberry.field(
        description="The run's steps from the coordinator's ledger, newest first, `first` at a time; pass "
        "pageInfo.endCursor as `after` for the next (older) page. Null with a BACKEND_UNAVAILABLE error "
        "when the coordinator cannot be reached.",
        metadata=BATCHED_BACKEND,
    )
    async def steps(
        self, info: strawberry.Info, first: int = 50, after: str | None = None
    ) -> RunStepConnection | None:
        before = _step_cursor(after)
        page = await _ctx(info).reads.steps(self.record.run_id, _page(first), before)
        nodes = [RunStep.of(step) for step in page.steps]
        edges = [RunStepEdge(cursor=str(node.step_id), node=node) for node in nodes]
        return RunStepConnection(
            edges=edges,
            nodes=nodes,
            page_info=PageInfo(
                has_next_page=page.next_before is not None, end_cursor=edges[-1].cursor if edges else None
            ),
        )

    @strawberry.field(
        description="The run's commands in acceptance order; `status` keeps those with that status now (a "
        "published command is APPLIED, REJECTED or COMPENSATED once its service answered).",
        metadata=BATCHED,
    )
    async def commands(
        self,
        info: strawberry.Info,
        status: CommandStatus | None = None,
        first: int = 100,
        after: Annotated[
            str | None, strawberry.argument(description="the commandId of a previous page's last command")
        ] = None,
    ) -> list[CommandReceipt]:
        wanted = status.value if status else None
        if after is None:
            rows = await _ctx(info).reads.commands(self.record.run_id, wanted, _page(first))
        else:
            _bounded(after, "after")
            async with _ctx(info).reads.database() as conn:
                rows = await list_commands(conn, self.record.run_id, wanted, _page(first), after)
                await conn.rollback()
        return [CommandReceipt.of(r) for r in rows]

    @strawberry.field(
        description="The revert's progress from the coordinator's ledger. Null with a BACKEND_UNAVAILABLE "
        "error when the coordinator cannot be reached.",
        metadata=BATCHED_BACKEND,
    )
    async def revert_progress(self, info: strawberry.Info) -> RevertProgress | None:
        p = await _ctx(info).reads.revert_progress(self.record.run_id)
        return RevertProgress(total=p.total, compensated=p.compensated, failing=p.failing, pending=p.pending)


@strawberry.type
class RunEdge:
    cursor: str
    node: Run


@strawberry.type
class RunConnection:
    edges: list[RunEdge]
    nodes: list[Run]
    page_info: PageInfo


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
class RunActionResult:
    run: Run
    count: int = strawberry.field(description="how many commands the action moved")


@strawberry.type
class RevertRunsResult:
    requested: list[Run] = strawberry.field(description="runs whose revert was requested now")
    unchanged: list[Run] = strawberry.field(description="runs already reverting or reverted: left alone")


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


def _operations(info: strawberry.Info) -> list[Operation]:
    """The catalogue as the running schema spells it: argument types come from the schema itself."""
    context = _ctx(info)
    principal = context.require_principal()
    mutation_type = info._raw_info.schema.mutation_type
    fields = mutation_type.fields if mutation_type is not None else {}
    listed: list[Operation] = []
    for spec in context.services.catalogue:
        field = fields.get(spec.graphql_name)
        if field is None:
            continue
        payload_schema = spec.payload_schema or spec.payload_model.model_json_schema()
        # Every write takes an idempotency key, unless a payload field already has that name.
        keyed = IDEMPOTENCY_KEY_ARG not in spec.payload_model.model_fields
        own = {"runId", camel(IDEMPOTENCY_KEY_ARG)} if keyed else {"runId"}
        listed.append(
            Operation(
                service=spec.service,
                operation=spec.command_type,
                mutation=spec.graphql_name,
                description=spec.description,
                egress=spec.egress,
                creates=spec.creates,
                entity_type=spec.entity_type,
                entity_id_field=spec.entity_key,
                input_schema=json.dumps(payload_schema, sort_keys=True),
                input_object=_uses_input_object(spec),
                allowed=principal.is_agent and principal.may_call(spec),
                arguments=[
                    OperationArgument(name=name, type=str(arg.type))
                    for name, arg in field.args.items()
                    if name not in own
                ],
            )
        )
    return listed


@strawberry.type
class Me:
    id: str
    kind: str
    scopes: list[str]
    entry_points: list[str] | None = strawberry.field(
        description="the entry points you may start runs at; null: any"
    )


# --- inputs --------------------------------------------------------------------------------------------


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


# --- generated agent mutations -------------------------------------------------------------------------


def _strip(annotation: Any) -> tuple[Any, bool]:
    """(core type, optional?) of a pydantic annotation: Annotated and Optional removed."""
    optional = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            optional = optional or len(args) < len(typing.get_args(annotation))
            annotation = args[0] if len(args) == 1 else Any
        else:
            return annotation, optional


def _int_fits_32(info: FieldInfo) -> bool:
    low = high = None
    for meta in info.metadata:
        if isinstance(meta, annotated_types.Ge | annotated_types.Gt):
            low = getattr(meta, "ge", getattr(meta, "gt", None))
        if isinstance(meta, annotated_types.Le | annotated_types.Lt):
            high = getattr(meta, "le", getattr(meta, "lt", None))
    return low is not None and high is not None and -INT32 - 1 <= low and high <= INT32


def graphql_type(info: FieldInfo) -> Any:
    """The GraphQL argument type for one pydantic field; constraints stay with pydantic."""
    core, _ = _strip(info.annotation)
    if typing.get_origin(core) is typing.Literal and all(isinstance(v, str) for v in typing.get_args(core)):
        return str  # a declared enum of words: the payload model checks the value
    if core is bool:
        return bool
    if core is int:
        return int if _int_fits_32(info) else Long
    if core is float:
        return float
    if core is str:
        return str
    return JSON


def argument_type(name: str, info: FieldInfo) -> Any:
    # Entity references are IDs to clients, whatever their constraints inside the payload model.
    gql = graphql_type(info)
    return strawberry.ID if gql is str and name.endswith("_id") else gql


def _uses_input_object(spec: OperationSpec) -> bool:
    return spec.creates or len(spec.payload_model.model_fields) > 2


def _pascal(name: str) -> str:
    return name[:1].upper() + name[1:]


def build_input_type(spec: OperationSpec) -> type:
    """`CreateDocumentInput { title: String!, body: String }` from the payload model."""
    annotations: dict[str, Any] = {}
    namespace: dict[str, Any] = {"__module__": __name__}
    for name, info in spec.payload_model.model_fields.items():
        gql = argument_type(name, info)
        if info.is_required():
            annotations[name] = gql
        else:
            annotations[name] = gql | None
            namespace[name] = strawberry.field(default=strawberry.UNSET, description=info.description)
            continue
        if info.description:
            namespace[name] = strawberry.field(description=info.description)
    namespace["__annotations__"] = annotations
    cls = types.new_class(f"{_pascal(spec.graphql_name)}Input", (), {}, lambda ns: ns.update(namespace))
    return strawberry.input(cls, description=f"Input of {spec.graphql_name}: {spec.description}")


def _payload(spec: OperationSpec, values: dict[str, Any], prefix: str) -> BaseModel:
    # Omitted (UNSET) and null optional arguments both mean "use the model's default".
    data = {k: v for k, v in values.items() if v is not strawberry.UNSET and v is not None}
    try:
        return spec.payload_model.model_validate(data)
    except ValidationError as exc:
        if spec.payload_schema is None:
            raise invalid_from_pydantic(exc, prefix) from exc
        # The service's own words (errorMessage in its declared schema) where it gave them.
        fields = [(prefix + (".".join(camel(str(p)) for p in loc) or "input"), message)
                  for loc, message in error_messages(spec.payload_schema, exc)]
        summary = "; ".join(f"{path}: {problem}" for path, problem in fields)
        raise Invalid(f"invalid input: {summary}", fields) from exc


def build_agent_mutation(spec: OperationSpec) -> Any:
    """One Strawberry mutation field for one catalogued operation."""
    fields = spec.payload_model.model_fields
    params = [
        inspect.Parameter("info", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=strawberry.Info),
        inspect.Parameter("run_id", inspect.Parameter.KEYWORD_ONLY, annotation=strawberry.ID),
    ]
    if _uses_input_object(spec):
        input_type = build_input_type(spec)
        params.append(inspect.Parameter("input", inspect.Parameter.KEYWORD_ONLY, annotation=input_type))

        def collect(kwargs: dict[str, Any]) -> tuple[dict[str, Any], str]:
            given = kwargs["input"]
            return {name: getattr(given, name, strawberry.UNSET) for name in fields}, "input."
    else:
        for name, info in fields.items():
            gql = argument_type(name, info)
            if info.is_required():
                params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=gql))
            else:
                params.append(
                    inspect.Parameter(
                        name, inspect.Parameter.KEYWORD_ONLY, annotation=gql | None, default=strawberry.UNSET
                    )
                )

        def collect(kwargs: dict[str, Any]) -> tuple[dict[str, Any], str]:
            return {name: kwargs.get(name, strawberry.UNSET) for name in fields}, ""

    # Every write takes an optional idempotency key (unless a payload field already has that name).
    keyed = IDEMPOTENCY_KEY_ARG not in fields
    if keyed:
        params.append(
            inspect.Parameter(
                IDEMPOTENCY_KEY_ARG,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=str | None,
                default=None,
            )
        )

    async def resolver(info: strawberry.Info, **kwargs: Any) -> CommandReceipt:
        context = _ctx(info)
        principal = context.require_agent()
        if not principal.may_call(spec):
            raise Forbidden(
                f"agent {principal.id} has no scope for {spec.command_type}: ask an operator to grant it"
            )
        run_id = str(kwargs["run_id"])
        values, prefix = collect(kwargs)
        key = idempotency.check_key(kwargs.get(IDEMPOTENCY_KEY_ARG)) if keyed else None
        payload = _payload(spec, values, prefix)
        receipt = await context.services.writer.submit(principal, spec, run_id, payload, key)
        idempotency.kill_after_commit_if_marked(_kill_marker(info), key)
        return CommandReceipt.of(receipt)

    resolver.__name__ = spec.graphql_name
    resolver.__signature__ = inspect.Signature(params, return_annotation=CommandReceipt)  # type: ignore[attr-defined]
    resolver.__annotations__ = {p.name: p.annotation for p in params} | {"return": CommandReceipt}
    return strawberry.mutation(resolver=resolver, name=spec.graphql_name, description=spec.description)


# --- reads ---------------------------------------------------------------------------------------------


def _int_or(value: Any, default: int | None) -> int | None:
    # Alerts of other components are foreign documents: a field of an unexpected type reads as absent.
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= INT32:
        return value
    return default


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _failing_steps(value: Any) -> list[AlertFailingStep]:
    if not isinstance(value, list):
        return []
    return [
        AlertFailingStep(
            step_id=_int_or(s.get("step_id"), None),
            forward_event_id=strawberry.ID(s["forward_event_id"])
            if isinstance(s.get("forward_event_id"), str)
            else None,
            forward_type=_text_or_none(s.get("forward_type")),
            reason=_text_or_none(s.get("reason")),
        )
        for s in value
        if isinstance(s, dict)
    ]


def _threshold(value: Any) -> AlertThreshold | None:
    if not isinstance(value, dict):
        return None
    name, count, limit = value.get("name"), value.get("count"), value.get("limit")
    if not (isinstance(name, str) and isinstance(count, int | float) and isinstance(limit, int | float)):
        return None
    return AlertThreshold(name=name, count=float(count), limit=float(limit))


def _alert(a: Any) -> Alert:
    p = a.payload
    services = p.get("services_touched")
    return Alert(
        id=strawberry.ID(a.alert_id),
        run_id=strawberry.ID(a.run_id),
        kind=a.kind,
        source=a.source,
        created_at=a.created_at,
        summary=a.summary,
        agent_id=_text_or_none(p.get("agent_id")),
        entry_point=_text_or_none(p.get("entry_point")),
        threshold=_threshold(p.get("threshold")),
        services_touched=[str(s) for s in services] if isinstance(services, list) else [],
        held=_int_or(p.get("held"), 0) or 0,
        awaiting_approval=_int_or(p.get("awaiting_approval"), 0) or 0,
        propagated=_int_or(p.get("propagated"), 0) or 0,
        auto_revert=p.get("auto_revert") is True,
        failing_steps=_failing_steps(p.get("failing_steps")),
        failing_count=_int_or(p.get("failing_count"), None),
        details=JSON(p),
        webhook_status=a.webhook_status,
    )


async def _visible_run(info: strawberry.Info, run_id: str) -> runs_mod.RunRecord:
    context = _ctx(info)
    principal = context.require_principal()
    async with context.reads.database() as conn:
        run = await runs_mod.load_run(conn, run_id)
        await conn.rollback()
    runs_mod.check_owner(run, principal)
    return run


@strawberry.type
class Query:
    @strawberry.field(permission_classes=AUTHENTICATED, description="Who the Bearer key belongs to.")
    def me(self, info: strawberry.Info) -> Me:
        p = _ctx(info).require_principal()
        entry_points = sorted(p.entry_points) if p.entry_points is not None else None
        return Me(id=p.id, kind=p.kind, scopes=sorted(p.scopes), entry_points=entry_points)

    @strawberry.field(
        permission_classes=AUTHENTICATED,
        description="The operation catalogue: every agent write this gateway accepts and how to call it.",
    )
    def operations(self, info: strawberry.Info) -> list[Operation]:
        return _operations(info)

    @strawberry.field(permission_classes=AUTHENTICATED)
    async def run(self, info: strawberry.Info, id: strawberry.ID) -> Run:
        return Run.of(await _visible_run(info, str(id)))

    @strawberry.field(
        permission_classes=AUTHENTICATED, description="Runs newest first; agents see only their own."
    )
    async def runs(
        self,
        info: strawberry.Info,
        filter: RunFilter | None = None,
        first: int = 20,
        after: str | None = None,
    ) -> RunConnection:
        context = _ctx(info)
        principal = context.require_principal()
        f = filter or RunFilter()
        for name in ("agent_id", "entry_point"):
            _bounded(getattr(f, name), camel(name))
        _bounded(after, "after", 1024)
        agent_id = principal.id if principal.is_agent else f.agent_id
        if principal.is_agent and f.agent_id not in (None, principal.id):
            return RunConnection(edges=[], nodes=[], page_info=PageInfo(has_next_page=False, end_cursor=None))
        query = runs_mod.RunFilter(
            agent_id=agent_id,
            entry_point=f.entry_point,
            status=f.status.value if f.status else None,
            started_after=f.started_after,
            started_before=f.started_before,
            breaker_state=f.breaker_state.value if f.breaker_state else None,
        )
        async with context.reads.database() as conn:
            rows, more = await runs_mod.list_runs(conn, query, _page(first), after)
            await conn.rollback()
        edges = [RunEdge(cursor=runs_mod.encode_cursor(r), node=Run.of(r)) for r in rows]
        return RunConnection(
            edges=edges,
            nodes=[e.node for e in edges],
            page_info=PageInfo(has_next_page=more, end_cursor=edges[-1].cursor if edges else None),
        )

    @strawberry.field(permission_classes=AUTHENTICATED)
    async def command(self, info: strawberry.Info, id: strawberry.ID) -> CommandReceipt:
        context = _ctx(info)
        async with context.reads.database() as conn:
            row = await get_command(conn, str(id))
            await conn.rollback()
        await _visible_run(info, row["run_id"])
        return CommandReceipt.of(Receipt.from_row(row))

    @strawberry.field(
        permission_classes=OPERATOR,
        description="Each component's dead letters, or only `component`'s.",
        metadata=CALLS_BACKEND,
    )
    async def dlq(
        self, info: strawberry.Info, first: int = 50, component: str | None = None
    ) -> list[DlqComponent]:
        services = _ctx(info).services
        limit = _page(first)
        _bounded(component, "component")
        local = services.local_dlq is not None and component in (None, "gateway")
        results: list[DlqComponent] = []
        if local and services.local_dlq is not None:
            entries = await services.local_dlq.dlq_inspect(limit)
            results.append(
                DlqComponent(
                    component="gateway",
                    count=await services.local_dlq.dlq_count(),
                    entries=[e.to_json() for e in entries],
                    error=None,
                )
            )
        if local and component is not None:
            return results
        for d in await _ctx(info).reads.dlq_all(limit, component):
            if d["component"] == "gateway" and services.local_dlq is not None:
                continue
            results.append(
                DlqComponent(
                    component=d["component"],
                    count=d.get("count"),
                    entries=list(d.get("entries", [])),
                    error=d.get("error"),
                )
            )
        return results

    outbox_status = strawberry.field(
        resolver=durability.outbox_status,
        permission_classes=OPERATOR,
        description="Each component's outbox backlog and dead letters; one that does not answer says why.",
        metadata=CALLS_BACKEND,
    )

    receipts: ReceiptChainReport = strawberry.field(
        resolver=receipt_chain_query,
        permission_classes=OPERATOR,
        description="A component's receipt chain (gateway, coordinator or a service), verified now.",
        metadata=CALLS_BACKEND,
    )

    @strawberry.field(
        permission_classes=OPERATOR,
        description="Operator alerts, newest first: the gateway's own and those of the other components.",
    )
    async def alerts(
        self,
        info: strawberry.Info,
        run_id: strawberry.ID | None = None,
        first: int = 50,
        kind: str | None = None,
    ) -> list[Alert]:
        _bounded(run_id, "runId")
        _bounded(kind, "kind", 64)
        async with _ctx(info).reads.database() as conn:
            found = await list_alerts(conn, str(run_id) if run_id else None, _page(first), kind)
            await conn.rollback()
        return [_alert(a) for a in found]

    @strawberry.field(
        permission_classes=OPERATOR,
        description="Every egress command AWAITING_APPROVAL across runs, oldest first; pass "
        "pageInfo.endCursor as `after` for the next page.",
    )
    async def approvals(
        self, info: strawberry.Info, first: int = 50, after: str | None = None
    ) -> ApprovalConnection:
        _bounded(after, "after", 1024)
        async with _ctx(info).reads.database() as conn:
            found, more = await approvals_mod.awaiting_approval(conn, _page(first), after)
            await conn.rollback()
        edges = [
            ApprovalEdge(
                cursor=a.cursor,
                node=Approval(
                    command=CommandReceipt.of(a.receipt),
                    run_id=strawberry.ID(a.receipt.run_id),
                    agent_id=a.agent_id,
                    entry_point=a.entry_point,
                    payload=JSON(a.payload),
                ),
            )
            for a in found
        ]
        return ApprovalConnection(
            edges=edges,
            nodes=[e.node for e in edges],
            page_info=PageInfo(has_next_page=more, end_cursor=edges[-1].cursor if edges else None),
        )

    @strawberry.field(permission_classes=OPERATOR, description="Incidents, newest first.")
    async def incidents(
        self,
        info: strawberry.Info,
        first: int = 20,
        after: str | None = None,
        kind: IncidentKind | None = None,
    ) -> IncidentConnection:
        _bounded(after, "after", 1024)
        wanted = incidents_mod.IncidentKind(kind.value) if kind is not None else None
        async with _ctx(info).reads.database() as conn:
            found, more = await incidents_mod.list_incidents(conn, _page(first), after, wanted)
            await conn.rollback()
        return connection(found, more)

    @strawberry.field(permission_classes=OPERATOR)
    async def incident(self, info: strawberry.Info, id: strawberry.ID) -> Incident:
        _bounded(id, "id")
        async with _ctx(info).reads.database() as conn:
            found = await incidents_mod.get_incident(conn, str(id))
            await conn.rollback()
        return Incident.of(found)

    @strawberry.field(
        permission_classes=OPERATOR,
        description="Replay the runs recorded since `since` (those the layer applies to) under the policy "
        "that governed them and under the policy with this layer: what it would have caught and stopped.",
    )
    async def backtest_policy(
        self,
        info: strawberry.Info,
        scope: PolicyScope,
        settings: PolicyInput,
        since: datetime,
        subject: str | None = None,
        loosen: bool = False,
    ) -> PolicyBacktest:
        scope_value, subject_value, document = _policy_layer(info, scope, subject, settings)
        since = since if since.tzinfo is not None else since.replace(tzinfo=UTC)  # no zone given: UTC
        services = _ctx(info).services
        declared = {spec.command_type: spec.window_s for spec in services.catalogue}
        async with _ctx(info).reads.database() as conn:
            found = await backtest_policy(conn, declared, scope_value, subject_value, document, since, loosen)
            await conn.rollback()
        return PolicyBacktest.of(found)

    @strawberry.field(permission_classes=OPERATOR, description="The breaker and quarantine policy.")
    async def policy(
        self, info: strawberry.Info, agent_id: str | None = None, entry_point: str | None = None
    ) -> PolicyView:
        _bounded(agent_id, "agentId")
        _bounded(entry_point, "entryPoint")
        services = _ctx(info).services
        async with _ctx(info).reads.database() as conn:
            effective = await services.policies.effective(conn, agent_id or "", entry_point or "")
            past = await policy_mod.history(conn)
            await conn.rollback()
        return PolicyView(
            version=effective.version,
            effective=PolicySettings.of(effective.document()),
            layers=[PolicyVersion.of(v) for v in services.policies.layers()],
            history=[PolicyVersion.of(v) for v in past],
        )


@strawberry.type(description="Operator only, over graphql-transport-ws; connection_init's payload carries "
                 '{"authorization": "Bearer <operator key>"}.')
class Subscription:
    @strawberry.subscription(
        permission_classes=OPERATOR,
        description="Each alert as it is raised, those of the 30 s before subscribing first, so listing "
        "`alerts` and then subscribing misses none (an alert may come twice: dedupe by id).",
    )
    async def alert_raised(self, info: strawberry.Info) -> AsyncGenerator[Alert, None]:
        context = _ctx(info)
        async with context.services.alert_feed.subscribe() as queue:
            while True:
                yield _alert(await queue.get())

    @strawberry.subscription(
        permission_classes=OPERATOR, description="The run now, then each time it changes (its revert too)."
    )
    async def run_changed(self, info: strawberry.Info, id: strawberry.ID) -> AsyncGenerator[Run, None]:
        context = _ctx(info)
        _bounded(str(id), "id")
        connect = lambda: context.reads.database()  # noqa: E731 - the reads of the event being resolved
        async for record in live.run_changes(connect, context.services.backends, str(id)):
            context.renew()
            yield Run.of(record)


# --- mutations -----------------------------------------------------------------------------------------


IDEMPOTENCY_KEY_ARG = "idempotency_key"


def _reason(reason: str | None) -> str | None:
    """An operator's optional reason for releaseRun, discardRun or holdRun: recorded when given."""
    if reason is None or not reason.strip():
        return None
    if len(reason.strip()) > revert_mod.REASON_MAX:
        raise Invalid(f"reason must be at most {revert_mod.REASON_MAX} characters", [("reason", "too long")])
    return reason.strip()


def _kill_marker(info: strawberry.Info) -> str | None:
    """TEST ONLY: the idempotency key whose commit kills this process (idempotency.kill_after_commit...)."""
    return _ctx(info).services.settings.test_kill_after_commit_key


async def _in_tx(info: strawberry.Info, work: Callable[[Any], Any]) -> Any:
    services = _ctx(info).services
    async with transaction(services.engine, services.wake_relay) as tx:
        result = await work(tx)
        await tx.commit()
    return result


def _policy_layer(
    info: strawberry.Info, scope: Any, subject: str | None, settings: "PolicyInput"
) -> tuple[policy_mod.PolicyScope, str, policy_mod.PolicyDocument]:
    """A layer as setPolicy and backtestPolicy take it, checked: its scope, subject and document."""
    services = _ctx(info).services
    scope_value = policy_mod.PolicyScope(scope)
    if scope_value is not policy_mod.PolicyScope.DEFAULT and not (subject and subject.strip()):
        raise Invalid(
            f"scope {scope_value.value} needs a subject (the agent id or entry point)",
            [("subject", "required")],
        )
    _bounded(subject, "subject")
    raw = {name: getattr(settings, name) for name in policy_mod.PolicyDocument.model_fields}
    if raw.get("operation_windows") is not None:
        unknown = (
            [op for op in raw["operation_windows"] if op not in services.catalogue]
            if isinstance(raw["operation_windows"], dict)
            else ["(not an object)"]
        )
        if unknown:
            raise Invalid(
                f"operationWindows names unknown operations: {', '.join(map(str, unknown))}",
                [("settings.operationWindows", "unknown operation")],
            )
    gates = [op for op in raw.get("operation_gates") or () if op not in services.catalogue]
    if gates:
        raise Invalid(
            f"operationGates names unknown operations: {', '.join(gates)}: name command types from "
            "the operations query",
            [("settings.operationGates", "unknown operation")],
        )
    try:
        document = policy_mod.PolicyDocument.model_validate(raw)
    except ValidationError as exc:
        raise invalid_from_pydantic(exc, "settings.") from exc
    misplaced = [(f"settings.{camel(name)}", problem) for name, problem in
                 policy_mod.scope_problems(scope_value, document)]
    if misplaced:
        raise Invalid(
            "agent budgets (maxConcurrentRuns, maxRunsPerHour, maxAgentWritesPerHour) bound an agent "
            "across all its runs: set them at scope DEFAULT or AGENT, not ENTRY_POINT",
            misplaced,
        )
    return scope_value, (subject or "").strip(), document


@strawberry.type
class OperatorMutations:
    """Hand-written mutations: run lifecycle for agents, and every operator action."""

    @strawberry.mutation(
        permission_classes=AGENT,
        description="Mint a run id bound to you and an entry point. Send an idempotencyKey and send it again "
        "with a retry: within 24 hours the retry gets the same run and starts none (so does every write's).",
    )
    async def start_run(
        self,
        info: strawberry.Info,
        entry_point: str,
        purpose: str | None = None,
        idempotency_key: str | None = None,
    ) -> Run:
        principal = _ctx(info).require_agent()
        services = _ctx(info).services
        key = idempotency.check_key(idempotency_key)

        async def work(tx: Any) -> runs_mod.StartOutcome:
            return await runs_mod.start_run(
                tx,
                principal,
                entry_point,
                purpose,
                services.policies,
                idempotency_key=key,
                webhook=services.webhook.url is not None,
            )

        try:
            started: runs_mod.StartOutcome = await _in_tx(info, work)
        except Exception as exc:
            if key is None or not idempotency.is_key_race(exc):
                raise
            # The same key committed meanwhile on another replica: now it is found, and its run answered.
            started = await _in_tx(info, work)
        for alert in started.alerts:
            services.webhook.send_later(alert)
        if started.refusal is not None:
            raise started.refusal
        assert started.run is not None
        idempotency.kill_after_commit_if_marked(_kill_marker(info), key)
        return Run.of(started.run)

    @strawberry.mutation(
        permission_classes=AGENT, description="Close your run; held commands still wait out their window."
    )
    async def finish_run(self, info: strawberry.Info, run_id: strawberry.ID) -> Run:
        principal = _ctx(info).require_agent()
        return Run.of(await _in_tx(info, lambda tx: runs_mod.finish_run(tx, principal, str(run_id))))

    @strawberry.mutation(permission_classes=OPERATOR)
    async def revert_run(self, info: strawberry.Info, run_id: strawberry.ID, reason: str) -> Run:
        operator = _ctx(info).require_operator()
        why = revert_mod.check_reason(reason)
        actor = Actor(kind="operator", id=operator.id)

        async def work(tx: Any) -> runs_mod.RunRecord:
            run, _ = await revert_mod.request_revert(tx, str(run_id), why, actor)
            return run

        return Run.of(await _in_tx(info, work))

    @strawberry.mutation(permission_classes=OPERATOR)
    async def revert_runs(
        self, info: strawberry.Info, selector: RunSelector, reason: str
    ) -> RevertRunsResult:
        operator = _ctx(info).require_operator()
        why = revert_mod.check_reason(reason)
        actor = Actor(kind="operator", id=operator.id)
        for name in ("agent_id", "entry_point"):
            _bounded(getattr(selector, name), f"selector.{camel(name)}")
        for rid in selector.run_ids or []:
            _bounded(str(rid), "selector.runIds")
        sel = revert_mod.Selector(
            run_ids=tuple(str(r) for r in selector.run_ids) if selector.run_ids else None,
            agent_id=selector.agent_id,
            entry_point=selector.entry_point,
            started_after=selector.started_after,
            started_before=selector.started_before,
        )

        async def work(tx: Any) -> RevertRunsResult:
            requested: list[Run] = []
            unchanged: list[Run] = []
            for rid in await revert_mod.select_runs(tx, sel):
                run, rung = await revert_mod.request_revert(tx, rid, why, actor)
                (requested if rung else unchanged).append(Run.of(run))
            return RevertRunsResult(requested=requested, unchanged=unchanged)

        result: RevertRunsResult = await _in_tx(info, work)
        return result

    @strawberry.mutation(permission_classes=OPERATOR, description="Publish the run's held commands now.")
    async def release_run(
        self, info: strawberry.Info, run_id: strawberry.ID, reason: str | None = None
    ) -> RunActionResult:
        operator = _ctx(info).require_operator()
        why = _reason(reason)
        run, count = await _in_tx(info, lambda tx: quarantine.release_run(tx, str(run_id), operator.id, why))
        return RunActionResult(run=Run.of(run), count=count)

    @strawberry.mutation(permission_classes=OPERATOR, description="Discard the run's unpublished commands.")
    async def discard_run(
        self, info: strawberry.Info, run_id: strawberry.ID, reason: str | None = None
    ) -> RunActionResult:
        operator = _ctx(info).require_operator()
        why = _reason(reason)
        run, count = await _in_tx(info, lambda tx: quarantine.discard_run(tx, str(run_id), operator.id, why))
        return RunActionResult(run=Run.of(run), count=count)

    @strawberry.mutation(permission_classes=OPERATOR, description="Hold the run's commands until releaseRun.")
    async def hold_run(
        self, info: strawberry.Info, run_id: strawberry.ID, reason: str | None = None
    ) -> RunActionResult:
        operator = _ctx(info).require_operator()
        services = _ctx(info).services
        why = _reason(reason)

        async def work(tx: Any) -> Any:
            run = await runs_mod.load_run(tx.conn, str(run_id), lock=True)
            policy = await services.policies.effective(tx.conn, run.agent_id, run.entry_point)
            return await quarantine.hold_run(tx, str(run_id), operator.id, policy, why)

        run, count = await _in_tx(info, work)
        return RunActionResult(run=Run.of(run), count=count)

    @strawberry.mutation(permission_classes=OPERATOR)
    async def set_breaker(self, info: strawberry.Info, run_id: strawberry.ID, state: BreakerState) -> Run:
        operator = _ctx(info).require_operator()
        services = _ctx(info).services
        actor = Actor(kind="operator", id=operator.id)
        run, alert = await _in_tx(
            info,
            lambda tx: breaker_mod.set_state(
                tx,
                str(run_id),
                state.value,
                services.policies.effective,
                actor,
                services.webhook.url is not None,
            ),
        )
        if alert is not None:
            services.webhook.send_later(alert)
        return Run.of(run)

    @strawberry.mutation(
        permission_classes=OPERATOR, description="Publish an egress command awaiting approval."
    )
    async def approve_egress(self, info: strawberry.Info, command_id: strawberry.ID) -> CommandReceipt:
        operator = _ctx(info).require_operator()
        row = await _in_tx(info, lambda tx: egress.approve(tx, str(command_id), operator.id))
        return CommandReceipt.of(Receipt.from_row(row))

    @strawberry.mutation(
        permission_classes=OPERATOR, description="Discard an egress command, with the reason."
    )
    async def deny_egress(
        self, info: strawberry.Info, command_id: strawberry.ID, reason: str
    ) -> CommandReceipt:
        operator = _ctx(info).require_operator()
        row = await _in_tx(info, lambda tx: egress.deny(tx, str(command_id), reason, operator.id))
        return CommandReceipt.of(Receipt.from_row(row))

    @strawberry.mutation(
        permission_classes=OPERATOR,
        description="Accept a proposal: append its policy version, linked to the incident.",
    )
    async def accept_proposal(self, info: strawberry.Info, id: strawberry.ID, reason: str) -> PolicyProposal:
        operator = _ctx(info).require_operator()
        proposal = await _in_tx(info, lambda tx: proposals_mod.accept(tx.conn, str(id), reason, operator.id))
        return PolicyProposal.of(proposal)

    @strawberry.mutation(permission_classes=OPERATOR, description="Reject a proposal, saying why.")
    async def reject_proposal(self, info: strawberry.Info, id: strawberry.ID, reason: str) -> PolicyProposal:
        operator = _ctx(info).require_operator()
        proposal = await _in_tx(info, lambda tx: proposals_mod.reject(tx.conn, str(id), reason, operator.id))
        return PolicyProposal.of(proposal)

    @strawberry.mutation(permission_classes=OPERATOR, description="Re-run dead letters of one component.")
    async def reprocess_dlq(
        self, info: strawberry.Info, component: str, message_ids: list[str]
    ) -> DlqReprocessResult:
        _ctx(info).require_operator()
        services = _ctx(info).services
        if not message_ids or len(message_ids) > 1000 or any(len(m) > ID_MAX for m in message_ids):
            raise Invalid(
                "messageIds must list 1-1000 ids from the dlq query", [("messageIds", "bad length")]
            )
        if component == "gateway" and services.local_dlq is not None:
            outcomes = await services.local_dlq.dlq_reprocess(message_ids)
            return DlqReprocessResult(
                component=component,
                results=[o.to_json() for o in outcomes],
                count=await services.local_dlq.dlq_count(),
            )
        _bounded(component, "component", 64)
        answer = await services.backends.reprocess(component, message_ids)
        return DlqReprocessResult(
            component=component, results=list(answer.get("results", [])), count=answer.get("count")
        )

    @strawberry.mutation(permission_classes=OPERATOR, description="Append a policy version for one layer.")
    async def set_policy(
        self,
        info: strawberry.Info,
        scope: PolicyScope,
        settings: PolicyInput,
        reason: str,
        subject: str | None = None,
        loosen: Annotated[
            bool,
            strawberry.argument(
                description="Let this AGENT or ENTRY_POINT layer loosen the layers below it: its fields then "
                "replace theirs. Without it a layer can only tighten (each limit resolves to the strictest). "
                "Recorded in the version."
            ),
        ] = False,
    ) -> PolicyVersion:
        operator = _ctx(info).require_operator()
        services = _ctx(info).services
        reason = reason.strip()
        if not reason or len(reason) > 2000:
            raise Invalid(
                "reason must be 1-2000 characters saying why the policy changes", [("reason", "required")]
            )
        scope_value, _subject, document = _policy_layer(info, scope, subject, settings)

        async def work(tx: Any) -> int:
            return await policy_mod.append_version(
                tx.conn, scope_value, (subject or "").strip(), document, operator.id, reason, loosen
            )

        version = await _in_tx(info, work)
        async with services.engine.connect() as conn:
            for pv in await policy_mod.history(conn, limit=50):
                if pv.version == version:
                    await conn.rollback()
                    return PolicyVersion.of(pv)
        raise NotFound(f"policy version {version} vanished")  # pragma: no cover - append-only table


def operator_mutation_names() -> frozenset[str]:
    """The gateway's own mutations (startRun, revertRun, ...): names no service may declare."""
    definition = OperatorMutations.__strawberry_definition__  # type: ignore[attr-defined]
    return frozenset(f.graphql_name or camel(f.python_name) for f in definition.fields)


def build_mutation_type(catalogue: OperationCatalogue) -> type:
    namespace: dict[str, Any] = {"__module__": __name__}
    for spec in catalogue:
        namespace[spec.graphql_name] = build_agent_mutation(spec)
    cls = types.new_class("Mutation", (OperatorMutations,), {}, lambda ns: ns.update(namespace))
    return strawberry.type(cls)


class GatewaySchema(strawberry.Schema):
    """Strawberry's schema with coded, masked errors instead of a traceback logged per error.

    Strawberry calls `process_errors` for every result, pre-execution failures included. A refused
    write (BREAKER_OPEN, VALIDATION, ...) is the gateway working, not an incident: only errors it
    masks as INTERNAL are logged.
    """

    def process_errors(self, errors: list[GraphQLError], execution_context: Any = None) -> None:
        # The run a failed request named (as a variable; a literal is not worth parsing for) goes on
        # the log line of an unexpected error, so it can be found by run id.
        variables = getattr(execution_context, "variables", None)
        run_id = variables.get("runId") if isinstance(variables, dict) else None
        with log_context(run_id=run_id if isinstance(run_id, str) else None):
            code_errors(errors, log)


def _static_type_names() -> set[str]:
    names = {"Query", "Mutation", "Subscription", "Entity", "EntityVersion", "JSON", "Long"}
    for value in list(globals().values()):
        definition = getattr(value, "__strawberry_definition__", None)
        if definition is not None:
            names.add(definition.name)
    return names


def _backends(info: strawberry.Info) -> Any:
    return _ctx(info).reads


def build_query_type(declarations: Mapping[str, ServiceDeclaration]) -> type:
    """Query: the hand-written reads, `entity`, and the reads generated from each service's read models."""
    wiring = ReadWiring(
        permission=AUTHENTICATED, long_type=Long, visible_run=_visible_run, backends=_backends
    )
    taken = {f.graphql_name or camel(f.python_name)
             for f in Query.__strawberry_definition__.fields} | {"entity"}  # type: ignore[attr-defined]
    namespace: dict[str, Any] = {"__module__": __name__, "entity": entity_query(wiring)}
    namespace.update(typed_reads(declarations, taken, _static_type_names(), wiring))
    cls = types.new_class("Query", (Query,), {}, lambda ns: ns.update(namespace))
    return strawberry.type(cls)


def build_schema(
    catalogue: OperationCatalogue,
    *,
    dev_mode: bool,
    extensions: list[Any],
    declarations: Mapping[str, ServiceDeclaration] | None = None,
) -> strawberry.Schema:
    """The gateway schema for a catalogue and the declarations it came from; hardening extensions are
    passed in by the app."""
    return GatewaySchema(
        query=build_query_type(declarations or {}),
        mutation=build_mutation_type(catalogue),
        subscription=Subscription,
        types=[Entity],
        extensions=extensions,
        config=StrawberryConfig(disable_field_suggestions=not dev_mode, scalar_map={Long: LONG_SCALAR}),
    )
