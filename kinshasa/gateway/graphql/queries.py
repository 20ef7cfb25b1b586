"""The hand-written reads: `me`, the catalogue, runs and commands, and the operator's views.

The reads generated from each service's read models (`entity`, `<type>(id)`) are added to this Query
by `graphql.schema.build_query_type`.
"""

import json
from datetime import datetime

import strawberry
from strawberry.scalars import JSON

from kinshasa.gateway import approvals as approvals_mod
from kinshasa.gateway import dlq_sources, durability, visibility
from kinshasa.gateway import incidents as incidents_mod
from kinshasa.gateway import policy as policy_mod
from kinshasa.gateway import runs as runs_mod
from kinshasa.gateway.agent_writes import own_arguments, uses_input_object
from kinshasa.gateway.alerts import list_alerts
from kinshasa.gateway.arguments import as_utc, check_length, check_page
from kinshasa.gateway.backtest import backtest_policy
from kinshasa.gateway.commands import Receipt, get_command
from kinshasa.gateway.cost import CALLS_BACKEND
from kinshasa.gateway.errors import camel
from kinshasa.gateway.graphql.enums import PolicyScope
from kinshasa.gateway.graphql.inputs import PolicyInput, RunFilter, policy_layer
from kinshasa.gateway.graphql.operator_types import (
    Alert,
    Approval,
    ApprovalConnection,
    ApprovalEdge,
    DlqComponent,
    Me,
    Operation,
    OperationArgument,
    PolicySettings,
    PolicyVersion,
    PolicyView,
)
from kinshasa.gateway.graphql.permissions import AUTHENTICATED, OPERATOR, ctx, visible_run
from kinshasa.gateway.graphql.types import CommandReceipt, PageInfo, Run, RunConnection, RunEdge
from kinshasa.gateway.incident_types import (
    Incident,
    IncidentConnection,
    IncidentKind,
    PolicyBacktest,
    connection,
)
from kinshasa.gateway.receipts_view import ReceiptChainReport, receipt_chain_query


def list_operations(info: strawberry.Info) -> list[Operation]:
    """The catalogue as the running schema spells it: argument types come from the schema itself."""
    context = ctx(info)
    principal = context.require_principal()
    mutation_type = info._raw_info.schema.mutation_type
    fields = mutation_type.fields if mutation_type is not None else {}
    listed: list[Operation] = []
    for spec in context.services.catalogue:
        field = fields.get(spec.graphql_name)
        if field is None:
            continue
        payload_schema = spec.payload_schema or spec.payload_model.model_json_schema()
        own = own_arguments(spec)
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
                input_object=uses_input_object(spec),
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
class Query:
    @strawberry.field(permission_classes=AUTHENTICATED, description="Who the Bearer key belongs to.")
    def me(self, info: strawberry.Info) -> Me:
        p = ctx(info).require_principal()
        entry_points = sorted(p.entry_points) if p.entry_points is not None else None
        return Me(id=p.id, kind=p.kind, scopes=sorted(p.scopes), entry_points=entry_points)

    @strawberry.field(
        permission_classes=AUTHENTICATED,
        description="The operation catalogue: every agent write this gateway accepts and how to call it.",
    )
    def operations(self, info: strawberry.Info) -> list[Operation]:
        return list_operations(info)

    @strawberry.field(permission_classes=AUTHENTICATED)
    async def run(self, info: strawberry.Info, id: strawberry.ID) -> Run:
        return Run.of(await visible_run(info, str(id)))

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
        context = ctx(info)
        principal = context.require_principal()
        f = filter or RunFilter()
        for name in ("agent_id", "entry_point"):
            check_length(getattr(f, name), camel(name))
        check_length(after, "after", 1024)
        if visibility.sees_no_runs(principal, f.agent_id):
            return RunConnection(edges=[], nodes=[], page_info=PageInfo(has_next_page=False, end_cursor=None))
        query = runs_mod.RunFilter(
            agent_id=visibility.runs_agent(principal, f.agent_id),
            entry_point=f.entry_point,
            status=f.status.value if f.status else None,
            started_after=f.started_after,
            started_before=f.started_before,
            breaker_state=f.breaker_state.value if f.breaker_state else None,
        )
        async with context.reads.database() as conn:
            rows, more = await runs_mod.list_runs(conn, query, check_page(first), after)
            await conn.rollback()
        edges = [RunEdge(cursor=runs_mod.encode_cursor(r), node=Run.of(r)) for r in rows]
        return RunConnection(
            edges=edges,
            nodes=[e.node for e in edges],
            page_info=PageInfo(has_next_page=more, end_cursor=edges[-1].cursor if edges else None),
        )

    @strawberry.field(permission_classes=AUTHENTICATED)
    async def command(self, info: strawberry.Info, id: strawberry.ID) -> CommandReceipt:
        context = ctx(info)
        async with context.reads.database() as conn:
            row = await get_command(conn, str(id))
            await conn.rollback()
        await visible_run(info, row["run_id"])
        return CommandReceipt.of(Receipt.from_row(row))

    @strawberry.field(
        permission_classes=OPERATOR,
        description="Each component's dead letters, or only `component`'s.",
        metadata=CALLS_BACKEND,
    )
    async def dlq(
        self, info: strawberry.Info, first: int = 50, component: str | None = None
    ) -> list[DlqComponent]:
        services = ctx(info).services
        limit = check_page(first)
        check_length(component, "component")
        local_dlq = services.local_dlq
        has_local = local_dlq is not None
        results: list[DlqComponent] = []
        if dlq_sources.reads_here(has_local, component):
            entries = await local_dlq.dlq_inspect(limit)
            results.append(
                DlqComponent(
                    component=dlq_sources.GATEWAY,
                    count=await local_dlq.dlq_count(),
                    entries=[e.to_json() for e in entries],
                    error=None,
                )
            )
        if not dlq_sources.asks_backends(has_local, component):
            return results
        for d in await ctx(info).reads.dlq_all(limit, component):
            if not dlq_sources.keeps_backend_answer(has_local, d["component"]):
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
        check_length(run_id, "runId")
        check_length(kind, "kind", 64)
        async with ctx(info).reads.database() as conn:
            found = await list_alerts(conn, str(run_id) if run_id else None, check_page(first), kind)
            await conn.rollback()
        return [Alert.of(a) for a in found]

    @strawberry.field(
        permission_classes=OPERATOR,
        description="Every egress command AWAITING_APPROVAL across runs, oldest first; pass "
        "pageInfo.endCursor as `after` for the next page.",
    )
    async def approvals(
        self, info: strawberry.Info, first: int = 50, after: str | None = None
    ) -> ApprovalConnection:
        check_length(after, "after", 1024)
        async with ctx(info).reads.database() as conn:
            found, more = await approvals_mod.awaiting_approval(conn, check_page(first), after)
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
        check_length(after, "after", 1024)
        wanted = incidents_mod.IncidentKind(kind.value) if kind is not None else None
        async with ctx(info).reads.database() as conn:
            found, more = await incidents_mod.list_incidents(conn, check_page(first), after, wanted)
            await conn.rollback()
        return connection(found, more)

    @strawberry.field(permission_classes=OPERATOR)
    async def incident(self, info: strawberry.Info, id: strawberry.ID) -> Incident:
        check_length(id, "id")
        async with ctx(info).reads.database() as conn:
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
        scope_value, subject_value, document = policy_layer(info, scope, subject, settings)
        services = ctx(info).services
        declared = {spec.command_type: spec.window_s for spec in services.catalogue}
        async with ctx(info).reads.database() as conn:
            found = await backtest_policy(
                conn, declared, scope_value, subject_value, document, as_utc(since), loosen
            )
            await conn.rollback()
        return PolicyBacktest.of(found)

    @strawberry.field(permission_classes=OPERATOR, description="The breaker and quarantine policy.")
    async def policy(
        self, info: strawberry.Info, agent_id: str | None = None, entry_point: str | None = None
    ) -> PolicyView:
        check_length(agent_id, "agentId")
        check_length(entry_point, "entryPoint")
        services = ctx(info).services
        async with ctx(info).reads.database() as conn:
            effective = await services.policies.effective(conn, agent_id or "", entry_point or "")
            past = await policy_mod.history(conn)
            await conn.rollback()
        return PolicyView(
            version=effective.version,
            effective=PolicySettings.of(effective.document()),
            layers=[PolicyVersion.of(v) for v in services.policies.layers()],
            history=[PolicyVersion.of(v) for v in past],
        )
