"""The GraphQL object types of runs: a run, its breaker, counts, commands and steps, and their pages.

The types map plain records (`runs.RunRecord`, `commands.Receipt`, `run_steps.LedgerStep`) to what the
schema shows; the fields that read more (`breaker`, `steps`, `commands`, ...) resolve through the
request's batched reads.
"""

from datetime import datetime
from typing import Annotated, Any

import strawberry
from strawberry.scalars import JSON

from kinshasa.gateway import run_steps, store
from kinshasa.gateway import runs as runs_mod
from kinshasa.gateway.arguments import check_length, check_page, step_cursor
from kinshasa.gateway.commands import Receipt, list_commands
from kinshasa.gateway.cost import BATCHED, BATCHED_BACKEND
from kinshasa.gateway.graphql.enums import BreakerState, CommandStatus, RunStatus, StepStatus
from kinshasa.gateway.graphql.permissions import ctx
from kinshasa.gateway.visibility import may_read_step_states


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


@strawberry.type(name="EntityRef", description="The entity a message is about.")
class EntityRefView:
    service: str
    type: str
    id: strawberry.ID


@strawberry.type(name="Actor", description="Who caused a message: agent, operator, service or system.")
class ActorView:
    kind: str
    id: str


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
        return self.before_state if may_read_step_states(ctx(info).principal, self.service) else None

    @strawberry.field(description="the entity as its service showed it after the step; null unless the "
                      "caller may read the service's entities (`<service>:read`, or an operator)")
    def after(self, info: strawberry.Info) -> JSON | None:
        return self.after_state if may_read_step_states(ctx(info).principal, self.service) else None

    @classmethod
    def of(cls, step: run_steps.LedgerStep) -> "RunStep":
        return cls(
            step_id=step.step_id,
            forward_event_id=strawberry.ID(step.forward_event_id),
            forward_type=step.forward_type,
            operation=step.operation,
            command_id=strawberry.ID(step.command_id) if step.command_id is not None else None,
            service=step.service,
            entity=EntityRefView(
                service=step.entity_service, type=step.entity_type, id=strawberry.ID(step.entity_id)
            ),
            entity_key=step.entity_key,
            actor=ActorView(kind=step.actor_kind, id=step.actor_id),
            applied_at=step.applied_at,
            status=step.status,
            attempts=step.attempts,
            resolved_at=step.resolved_at,
            failure_reason=step.failure_reason,
            before_state=step.before,
            after_state=step.after,
        )


@strawberry.type
class RunStepEdge:
    cursor: str
    node: RunStep


@strawberry.type(description="A page of a run's steps, newest first.")
class RunStepConnection:
    edges: list[RunStepEdge]
    nodes: list[RunStep]
    page_info: PageInfo


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
        policy, recent = await ctx(info).reads.breaker(r.run_id, r.agent_id, r.entry_point)
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
        by_status = await ctx(info).reads.command_counts(self.record.run_id)
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
        before = step_cursor(after)
        page = await ctx(info).reads.steps(self.record.run_id, check_page(first), before)
        nodes = [RunStep.of(run_steps.parse_step(step)) for step in page.steps]
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
            rows = await ctx(info).reads.commands(self.record.run_id, wanted, check_page(first))
        else:
            check_length(after, "after")
            async with ctx(info).reads.database() as conn:
                rows = await list_commands(conn, self.record.run_id, wanted, check_page(first), after)
                await conn.rollback()
        return [CommandReceipt.of(r) for r in rows]

    @strawberry.field(
        description="The revert's progress from the coordinator's ledger. Null with a BACKEND_UNAVAILABLE "
        "error when the coordinator cannot be reached.",
        metadata=BATCHED_BACKEND,
    )
    async def revert_progress(self, info: strawberry.Info) -> RevertProgress | None:
        p = await ctx(info).reads.revert_progress(self.record.run_id)
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


@strawberry.type
class RunActionResult:
    run: Run
    count: int = strawberry.field(description="how many commands the action moved")


@strawberry.type
class RevertRunsResult:
    requested: list[Run] = strawberry.field(description="runs whose revert was requested now")
    unchanged: list[Run] = strawberry.field(description="runs already reverting or reverted: left alone")
