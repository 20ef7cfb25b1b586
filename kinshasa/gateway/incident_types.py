"""GraphQL types of incidents, policy backtests and proposals; the resolvers in gateway/graphql stay thin.

Reached only through operator fields (`incidents`, `incident`, `backtestPolicy`, `acceptProposal`,
`rejectProposal`), so these types carry no permission of their own.
"""

from __future__ import annotations

import asyncio
import enum
import weakref
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import strawberry

from kinshasa.gateway import incidents as incidents_mod
from kinshasa.gateway import proposals as proposals_mod
from kinshasa.gateway.backtest import Backtest
from kinshasa.gateway.policy import PolicyScope
from kinshasa.gateway.uow import transaction

if TYPE_CHECKING:
    from kinshasa.gateway.graphql.operator_types import PolicySettings
    from kinshasa.gateway.graphql.types import PageInfo

_TYPES = "kinshasa.gateway.graphql.types"
_OPERATOR_TYPES = "kinshasa.gateway.graphql.operator_types"
# One proposal draft at a time per event loop (a gateway process has one; tests start several).
_DRAFTING: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary())


def _drafting() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    semaphore = _DRAFTING.get(loop)
    if semaphore is None:
        semaphore = _DRAFTING[loop] = asyncio.Semaphore(1)
    return semaphore


@strawberry.enum(description="What kind of punch the system absorbed.")
class IncidentKind(enum.Enum):
    TRIP = "TRIP"
    REVERT = "REVERT"
    REVERT_FAILED = "REVERT_FAILED"
    AGENT_BUDGET = "AGENT_BUDGET"
    EGRESS_DENIED = "EGRESS_DENIED"
    DEAD_LETTER = "DEAD_LETTER"


@strawberry.enum
class ProposalStatus(enum.Enum):
    PROPOSED = "PROPOSED"
    ACCEPTED = "ACCEPTED"
    REJECTED = "REJECTED"


@strawberry.type(description="What tripped: the threshold (or budget), the count reached and its limit.")
class IncidentTrigger:
    threshold: str | None
    count: float | None
    limit: float | None


@strawberry.type(description="Writes of one operation that had left the gateway when the incident opened.")
class EscapedOperation:
    operation: str
    count: int


@strawberry.type(description="Recorded runs replayed under the policy that governed them and a candidate.")
class PolicyBacktest:
    runs_replayed: int
    incident_runs_replayed: int
    incident_runs_caught: int
    incident_runs_caught_earlier: int
    escaped_writes_before: int
    escaped_writes_after: int
    good_runs_replayed: int = strawberry.field(description="runs that finished and were never reverted")
    good_runs_tripped: int = strawberry.field(description="good runs the candidate would have stopped")

    @classmethod
    def of(cls, b: Backtest) -> PolicyBacktest:
        return cls(**b.to_json())


def _declared(info: strawberry.Info) -> Mapping[str, float | None]:
    """Each operation's declared default window: a replay resolves windows as the writer does."""
    return {spec.command_type: spec.window_s for spec in info.context.services.catalogue}


@strawberry.type(description="A policy change proposed for an incident, with the backtest behind it.")
class PolicyProposal:
    id: strawberry.ID
    scope: PolicyScope
    subject: str
    settings: Annotated["PolicySettings", strawberry.lazy(_OPERATOR_TYPES)] = strawberry.field(  # noqa: UP037
        description="the fields it changes; accepting applies them to the layer, each the stricter value"
    )
    rationale: str
    backtest: PolicyBacktest
    status: ProposalStatus
    decided_at: datetime | None
    decided_by: str | None
    reason: str | None
    policy_version: int | None = strawberry.field(description="the version accepting it appended")
    incident_id: strawberry.Private[str]

    @classmethod
    def of(cls, p: proposals_mod.Proposal) -> PolicyProposal:
        from kinshasa.gateway.graphql.operator_types import PolicySettings

        return cls(
            id=strawberry.ID(p.proposal_id),
            scope=p.scope,
            subject=p.subject,
            settings=PolicySettings.of(p.settings),
            rationale=p.rationale,
            backtest=PolicyBacktest.of(p.backtest),
            status=ProposalStatus(p.status.value),
            decided_at=p.decided_at,
            decided_by=p.decided_by,
            reason=p.reason,
            policy_version=p.policy_version,
            incident_id=p.incident_id,
        )

    @strawberry.field
    async def incident(self, info: strawberry.Info) -> Incident:
        async with info.context.reads.database() as conn:
            found = await incidents_mod.get_incident(conn, self.incident_id)
            await conn.rollback()
        return Incident.of(found)


@strawberry.type(
    description="One incident: a trip, a revert, a failed revert, an agent over budget, a denied egress or a "
    "dead-lettered command, with the policy version in force."
)
class Incident:
    id: strawberry.ID
    kind: IncidentKind
    run_id: strawberry.ID | None
    agent_id: str | None
    entry_point: str | None
    policy_version: int | None
    trigger: IncidentTrigger | None
    write_index_at_trip: int | None = strawberry.field(
        description="the 1-based index of the first write the breaker stopped (TRIP)"
    )
    escaped: list[EscapedOperation]
    held: int = strawberry.field(description="commands still unpublished (held, awaiting approval) then")
    services_touched: list[str]
    opened_at: datetime
    decided_at: datetime | None
    decision: str | None
    record: strawberry.Private[incidents_mod.Incident]

    @classmethod
    def of(cls, i: incidents_mod.Incident) -> Incident:
        trigger = (
            IncidentTrigger(threshold=i.threshold, count=i.count, limit=i.limit)
            if i.threshold is not None
            else None
        )
        return cls(
            id=strawberry.ID(i.incident_id),
            kind=IncidentKind(i.kind.value),
            run_id=strawberry.ID(i.run_id) if i.run_id else None,
            agent_id=i.agent_id,
            entry_point=i.entry_point,
            policy_version=i.policy_version,
            trigger=trigger,
            write_index_at_trip=i.write_index if i.kind is incidents_mod.IncidentKind.TRIP else None,
            escaped=[EscapedOperation(operation=op, count=n) for op, n in i.escaped],
            held=i.held,
            services_touched=list(i.services),
            opened_at=i.opened_at,
            decided_at=i.decided_at,
            decision=i.decision,
            record=i,
        )

    @strawberry.field(description="Policy changes the recorded runs justify; computed on the first read.")
    async def proposals(self, info: strawberry.Info) -> list[PolicyProposal]:
        services = info.context.services
        if self.record.proposed:
            async with info.context.reads.database() as conn:
                found = await proposals_mod.list_proposals(conn, self.record.incident_id)
                await conn.rollback()
            return [PolicyProposal.of(p) for p in found]
        # One draft at a time per process: each loads up to the backtest's history bound, and a list of
        # a hundred undrafted incidents would otherwise hold a hundred histories at once.
        async with _drafting():
            async with info.context.reads.database() as conn:
                stored = await proposals_mod.list_proposals(conn, self.record.incident_id)
                await conn.rollback()
            if stored:  # drafted meanwhile, by the request this one waited for
                return [PolicyProposal.of(p) for p in stored]
            async with services.engine.connect() as conn:
                drafts = await proposals_mod.draft(conn, self.record, _declared(info))
                await conn.rollback()
            async with transaction(services.engine) as tx:
                found = await proposals_mod.store_drafts(tx.conn, self.record, drafts)
                await tx.commit()
        return [PolicyProposal.of(p) for p in found]


@strawberry.type
class IncidentEdge:
    cursor: str
    node: Incident


@strawberry.type
class IncidentConnection:
    edges: list[IncidentEdge]
    nodes: list[Incident]
    page_info: Annotated["PageInfo", strawberry.lazy(_TYPES)]  # noqa: UP037


def connection(found: list[incidents_mod.Incident], more: bool) -> IncidentConnection:
    from kinshasa.gateway.graphql.types import PageInfo

    edges = [IncidentEdge(cursor=incidents_mod.encode_cursor(i), node=Incident.of(i)) for i in found]
    return IncidentConnection(
        edges=edges,
        nodes=[e.node for e in edges],
        page_info=PageInfo(has_next_page=more, end_cursor=edges[-1].cursor if edges else None),
    )
