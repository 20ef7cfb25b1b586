"""The hand-written mutations: run lifecycle for agents (startRun, finishRun) and every operator action.

Their names are the gateway's own: `operator_mutation_names` lists them so no service may declare one.
"""

from typing import Annotated, Any

import strawberry

from kinshasa.gateway import breaker as breaker_mod
from kinshasa.gateway import dlq_sources, egress, idempotency, quarantine
from kinshasa.gateway import policy as policy_mod
from kinshasa.gateway import proposals as proposals_mod
from kinshasa.gateway import revert as revert_mod
from kinshasa.gateway import runs as runs_mod
from kinshasa.gateway.arguments import (
    check_length,
    check_message_ids,
    optional_reason,
    policy_reason,
)
from kinshasa.gateway.commands import Receipt
from kinshasa.gateway.errors import AgentBudgetExceeded, NotFound, camel
from kinshasa.gateway.graphql.enums import BreakerState, PolicyScope
from kinshasa.gateway.graphql.inputs import PolicyInput, RunSelector, policy_layer
from kinshasa.gateway.graphql.operator_types import DlqReprocessResult, PolicyVersion
from kinshasa.gateway.graphql.permissions import AGENT, OPERATOR, ctx
from kinshasa.gateway.graphql.types import CommandReceipt, RevertRunsResult, Run, RunActionResult
from kinshasa.gateway.graphql.writes import in_tx, kill_marker
from kinshasa.gateway.incident_types import PolicyProposal
from kinshasa.schemas.envelope import Actor


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
        principal = ctx(info).require_agent()
        services = ctx(info).services
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
            started: runs_mod.StartOutcome = await in_tx(info, work)
        except Exception as exc:
            if key is None or not idempotency.is_key_race(exc):
                raise
            # The same key committed meanwhile on another replica: now it is found, and its run answered.
            started = await in_tx(info, work)
        for alert in started.alerts:
            services.webhook.send_later(alert)
        if started.refusal is not None:
            if isinstance(started.refusal, AgentBudgetExceeded) and services.budget_refused is not None:
                services.budget_refused(str(started.refusal.details.get("budget")))
            raise started.refusal
        assert started.run is not None
        idempotency.kill_after_commit_if_marked(kill_marker(info), key)
        return Run.of(started.run)

    @strawberry.mutation(
        permission_classes=AGENT, description="Close your run; held commands still wait out their window."
    )
    async def finish_run(self, info: strawberry.Info, run_id: strawberry.ID) -> Run:
        principal = ctx(info).require_agent()
        return Run.of(await in_tx(info, lambda tx: runs_mod.finish_run(tx, principal, str(run_id))))

    @strawberry.mutation(permission_classes=OPERATOR)
    async def revert_run(self, info: strawberry.Info, run_id: strawberry.ID, reason: str) -> Run:
        operator = ctx(info).require_operator()
        why = revert_mod.check_reason(reason)
        actor = Actor(kind="operator", id=operator.id)

        async def work(tx: Any) -> runs_mod.RunRecord:
            run, _ = await revert_mod.revert_one(tx, str(run_id), why, actor)
            return run

        return Run.of(await in_tx(info, work))

    @strawberry.mutation(permission_classes=OPERATOR)
    async def revert_runs(
        self, info: strawberry.Info, selector: RunSelector, reason: str
    ) -> RevertRunsResult:
        operator = ctx(info).require_operator()
        why = revert_mod.check_reason(reason)
        actor = Actor(kind="operator", id=operator.id)
        for name in ("agent_id", "entry_point"):
            check_length(getattr(selector, name), f"selector.{camel(name)}")
        for rid in selector.run_ids or []:
            check_length(str(rid), "selector.runIds")
        sel = revert_mod.Selector(
            run_ids=tuple(str(r) for r in selector.run_ids) if selector.run_ids else None,
            agent_id=selector.agent_id,
            entry_point=selector.entry_point,
            started_after=selector.started_after,
            started_before=selector.started_before,
        )

        async def work(tx: Any) -> RevertRunsResult:
            requested, unchanged = await revert_mod.revert_selection(tx, sel, why, actor)
            return RevertRunsResult(requested=[Run.of(r) for r in requested],
                                    unchanged=[Run.of(r) for r in unchanged])

        result: RevertRunsResult = await in_tx(info, work)
        return result

    @strawberry.mutation(permission_classes=OPERATOR, description="Publish the run's held commands now.")
    async def release_run(
        self, info: strawberry.Info, run_id: strawberry.ID, reason: str | None = None
    ) -> RunActionResult:
        operator = ctx(info).require_operator()
        why = optional_reason(reason)
        run, count = await in_tx(info, lambda tx: quarantine.release_run(tx, str(run_id), operator.id, why))
        return RunActionResult(run=Run.of(run), count=count)

    @strawberry.mutation(permission_classes=OPERATOR, description="Discard the run's unpublished commands.")
    async def discard_run(
        self, info: strawberry.Info, run_id: strawberry.ID, reason: str | None = None
    ) -> RunActionResult:
        operator = ctx(info).require_operator()
        why = optional_reason(reason)
        run, count = await in_tx(info, lambda tx: quarantine.discard_run(tx, str(run_id), operator.id, why))
        return RunActionResult(run=Run.of(run), count=count)

    @strawberry.mutation(permission_classes=OPERATOR, description="Hold the run's commands until releaseRun.")
    async def hold_run(
        self, info: strawberry.Info, run_id: strawberry.ID, reason: str | None = None
    ) -> RunActionResult:
        operator = ctx(info).require_operator()
        services = ctx(info).services
        why = optional_reason(reason)

        async def work(tx: Any) -> Any:
            run = await runs_mod.load_run(tx.conn, str(run_id), lock=True)
            policy = await services.policies.effective(tx.conn, run.agent_id, run.entry_point)
            return await quarantine.hold_run(tx, str(run_id), operator.id, policy, why)

        run, count = await in_tx(info, work)
        return RunActionResult(run=Run.of(run), count=count)

    @strawberry.mutation(permission_classes=OPERATOR)
    async def set_breaker(self, info: strawberry.Info, run_id: strawberry.ID, state: BreakerState) -> Run:
        operator = ctx(info).require_operator()
        services = ctx(info).services
        actor = Actor(kind="operator", id=operator.id)
        run, alert = await in_tx(
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
        operator = ctx(info).require_operator()
        row = await in_tx(info, lambda tx: egress.approve(tx, str(command_id), operator.id))
        return CommandReceipt.of(Receipt.from_row(row))

    @strawberry.mutation(
        permission_classes=OPERATOR, description="Discard an egress command, with the reason."
    )
    async def deny_egress(
        self, info: strawberry.Info, command_id: strawberry.ID, reason: str
    ) -> CommandReceipt:
        operator = ctx(info).require_operator()
        row = await in_tx(info, lambda tx: egress.deny(tx, str(command_id), reason, operator.id))
        return CommandReceipt.of(Receipt.from_row(row))

    @strawberry.mutation(
        permission_classes=OPERATOR,
        description="Accept a proposal: append its policy version, linked to the incident.",
    )
    async def accept_proposal(self, info: strawberry.Info, id: strawberry.ID, reason: str) -> PolicyProposal:
        operator = ctx(info).require_operator()
        proposal = await in_tx(info, lambda tx: proposals_mod.accept(tx.conn, str(id), reason, operator.id))
        return PolicyProposal.of(proposal)

    @strawberry.mutation(permission_classes=OPERATOR, description="Reject a proposal, saying why.")
    async def reject_proposal(self, info: strawberry.Info, id: strawberry.ID, reason: str) -> PolicyProposal:
        operator = ctx(info).require_operator()
        proposal = await in_tx(info, lambda tx: proposals_mod.reject(tx.conn, str(id), reason, operator.id))
        return PolicyProposal.of(proposal)

    @strawberry.mutation(permission_classes=OPERATOR, description="Re-run dead letters of one component.")
    async def reprocess_dlq(
        self, info: strawberry.Info, component: str, message_ids: list[str]
    ) -> DlqReprocessResult:
        ctx(info).require_operator()
        services = ctx(info).services
        check_message_ids(message_ids)
        local_dlq = services.local_dlq
        if dlq_sources.reprocesses_here(local_dlq is not None, component):
            outcomes = await local_dlq.dlq_reprocess(message_ids)
            return DlqReprocessResult(
                component=component,
                results=[o.to_json() for o in outcomes],
                count=await local_dlq.dlq_count(),
            )
        check_length(component, "component", 64)
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
        operator = ctx(info).require_operator()
        services = ctx(info).services
        reason = policy_reason(reason)
        scope_value, _subject, document = policy_layer(info, scope, subject, settings)

        async def work(tx: Any) -> int:
            return await policy_mod.append_version(
                tx.conn, scope_value, (subject or "").strip(), document, operator.id, reason, loosen
            )

        version = await in_tx(info, work)
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
