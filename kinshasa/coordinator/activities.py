"""Temporal activities of the revert workflows: the ledger reads, the batched emissions and the ack polling.

All per-step work happens here, in batches, so a 10,000-step revert costs the workflow history a
handful of events. State lives in the ledger, not in the activity: a retried activity (worker killed,
heartbeat lost) re-reads the ledger and carries on, and its emissions reuse their message ids.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity

from kinshasa.coordinator.models import (
    FinishInput,
    ForwardStatus,
    ForwardWaitInput,
    PassInput,
    PassResult,
    RevertOutcome,
)
from kinshasa.coordinator.ordering import CompensationPlan, PlannedStep
from kinshasa.coordinator.receipt_sources import RECEIPTS, compensate_source, emission_source
from kinshasa.coordinator.run_ledger import ClaimedStep, Ledger
from kinshasa.coordinator.store import StepStatus
from kinshasa.coordinator.topic_names import CoordinatorTopics
from kinshasa.kernel import tracing
from kinshasa.kernel.database import OFF_LOOP
from kinshasa.kernel.receipts import payload_digest
from kinshasa.kernel.unit_of_work import UnitOfWork
from kinshasa.schemas.clock import utcnow
from kinshasa.schemas.envelope import (
    Actor,
    CompensatePayload,
    EntityRef,
    Envelope,
    RunEventKind,
    command_type_of,
    compensate_type,
    deterministic_id,
)
from kinshasa.schemas.run_status import RunStatus

log = logging.getLogger(__name__)

COORDINATOR_ACTOR = Actor(kind="system", id="coordinator")
ALERT_TYPE = "alert.revert_failed"
# How many failing steps a revert_failed event and its alert list; the ledger API has them all.
FAILING_STEPS_LISTED = 50


def compensate_message_id(forward_event_id: str, attempt: int) -> UUID:
    """The contract's id: a re-emitted straggler (next attempt) is a new message, a resend is not."""
    return deterministic_id("compensate", forward_event_id, str(attempt))


def compensate_command(run_id: str, step: ClaimedStep, causation_id: UUID | None,
                       now: datetime) -> Envelope:
    """The compensate command for one claimed step, exactly as docs/contracts.md pins it."""
    payload = CompensatePayload(forward_event_id=UUID(step.forward_event_id), forward_type=step.forward_type)
    return Envelope(
        message_id=compensate_message_id(step.forward_event_id, step.attempt),
        type=compensate_type(command_type_of(step.forward_type)),
        run_id=run_id, actor=COORDINATOR_ACTOR, causation_id=causation_id, correlation_id=run_id,
        entity=EntityRef(service=step.service, type=step.entity_type, id=step.entity_id),
        occurred_at=now, payload=payload.model_dump(mode="json"),
        # In an activity, its span: the compensation's handling joins the revert's trace.
        traceparent=tracing.current_traceparent(),
    )


@dataclass
class _Heartbeat:
    """Heartbeats at most every `every` seconds: the SDK throttles too, but building details costs."""

    every: float = 1.0
    _last: float = 0.0

    def __call__(self, *details: Any) -> None:
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            activity.heartbeat(*details)


class RevertActivities:
    """The revert activities, built with the coordinator's database."""

    def __init__(self, engine: AsyncEngine, *, ledger: Ledger | None = None,
                 topics: CoordinatorTopics | None = None, on_emit: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.topics = topics or CoordinatorTopics()
        self.ledger = ledger or Ledger(engine)
        # Wakes the in-process outbox relay, so compensate commands leave without waiting out its idle sleep.
        self.on_emit = on_emit

    # (1) wait for the forward results

    @activity.defn(name="await_forward_results")
    async def await_forward_results(self, params: ForwardWaitInput) -> ForwardStatus:
        """Wait until the ledger holds a result for every command the gateway published for the run.

        The target is the largest count known: the request's, the ledger's final count (from
        `revert_requested`, or `tripped`), or, should neither have come with one, the count reported
        when the run finished. A run still writing with no count at all waits for one; after `wait_s`
        the revert goes on with what has landed.
        """
        beat = _Heartbeat()
        deadline = time.monotonic() + params.wait_s
        while True:
            status, published, final = await self.ledger.published(params.run_id)
            known = [c for c in (params.target, final) if c is not None]
            if not known and status not in (None, RunStatus.RUNNING.value):
                known.append(published)
            target = max(known) if known else None
            results = (await self.ledger.counts(params.run_id)).results
            if target is not None and results >= target:
                return ForwardStatus(results=results, target=target, complete=True)
            if time.monotonic() >= deadline:
                return ForwardStatus(results=results, target=target, complete=target is None)
            beat({"results": results, "target": target})
            await asyncio.sleep(params.poll_s)

    # (2) + (3) emit newest first, collect acks

    @activity.defn(name="compensate_pass")
    async def compensate_pass(self, params: PassInput) -> PassResult:
        """One pass: emit compensations wave by wave (newest first per entity) and collect the acks.

        Ends when every step settled or was fenced behind a refusal, or when no ack arrived for
        `straggler_timeout_s`; what is left is for the next pass (a new attempt, a new message id).
        """
        policy = params.policy
        beat = _Heartbeat()
        causation = UUID(params.causation_id) if params.causation_id else None
        cursor = await self.ledger.settle_cursor(params.run_id)
        open_steps = await self.ledger.open_steps(params.run_id)
        plan = CompensationPlan.from_steps([
            PlannedStep(s.step_id, s.entity_key,
                        claimed_by_this_pass=(s.status == StepStatus.COMPENSATING.value
                                              and s.pass_token == params.pass_token))
            for s in open_steps], depth=1 if params.strict else policy.entity_depth)
        emitted = 0
        last_progress = time.monotonic()
        while True:
            wave = plan.next_wave()
            if wave:
                emitted += await self._emit(params.run_id, wave, params.pass_token, plan, causation,
                                            policy.batch_size)
                last_progress = time.monotonic()
            if plan.done:
                break
            if time.monotonic() - last_progress > policy.straggler_timeout_s:
                log.warning("revert of %s: %d compensation(s) unanswered for %.0fs; next pass re-emits them",
                            params.run_id, len(plan.in_flight), policy.straggler_timeout_s)
                break
            await asyncio.sleep(policy.poll_interval_s)
            settled, cursor = await self.ledger.settled_since(params.run_id, cursor)
            for s in settled:
                if s.status in (StepStatus.COMPENSATED.value, StepStatus.COMPENSATION_FAILED.value) \
                        and plan.settle(s.step_id, s.status):
                    last_progress = time.monotonic()
            beat({"settled": plan.settled, "in_flight": len(plan.in_flight), "queued": plan.queued})
        counts = await self.ledger.counts(params.run_id)
        failed, failed_count = await self.ledger.failing_steps(params.run_id, FAILING_STEPS_LISTED)
        return PassResult(
            emitted=emitted, compensated=counts.compensated, irreversible=counts.irreversible,
            remaining=counts.unsettled, failed=failed, failed_count=failed_count,
            stragglers=len(plan.in_flight),
        )

    async def _emit(self, run_id: str, wave: list[int], pass_token: str, plan: CompensationPlan,
                    causation: UUID | None, batch_size: int) -> int:
        """Claim and emit a wave in outbox transactions of `batch_size`: claim and emission commit as one."""
        emitted = 0
        for start in range(0, len(wave), batch_size):
            chunk = wave[start:start + batch_size]
            now = utcnow()
            async with UnitOfWork(self.engine, on_commit=self.on_emit) as uow:
                claimed = await self.ledger.claim(uow.conn, run_id, chunk, pass_token, now)
                receipts = []
                for step in claimed:
                    command = compensate_command(run_id, step, causation, now)
                    wire = uow.emit(self.topics.commands(step.service), command)
                    receipts.append((compensate_source(run_id, step), str(command.message_id),
                                     payload_digest(wire)))
                # Each compensation's receipt commits with its outbox row, in one statement per chunk.
                await RECEIPTS.append_many(uow.conn, receipts)
                await uow.commit()
            got = {c.step_id for c in claimed}
            plan.drop(s for s in chunk if s not in got)
            emitted += len(claimed)
            # A first wave of a wide run is thousands of rows: keep the heartbeat alive while it goes out.
            activity.heartbeat({"emitted": emitted, "wave": len(wave)})
        return emitted

    # (4) / (5) the outcome

    @activity.defn(name="finish_revert")
    async def finish_revert(self, params: FinishInput) -> RevertOutcome:
        """Record REVERTED or REVERT_FAILED in the ledger and on kinshasa.runs (and alert), one commit."""
        now = utcnow()
        # Counting a wide run's steps may run long: on SQLite, off the event loop (the worker's heartbeats).
        async with UnitOfWork(self.engine.execution_options(**{OFF_LOOP: True}),
                              on_commit=self.on_emit) as uow:
            counts = await self.ledger.counts(params.run_id, uow.conn)
            failing, failing_count = await self.ledger.failing_steps(
                params.run_id, FAILING_STEPS_LISTED, uow.conn)
            ok = counts.unsettled == 0 and params.missing_results == 0
            kind = RunEventKind.REVERTED if ok else RunEventKind.REVERT_FAILED
            message_id = deterministic_id(kind.type, params.run_id, params.outcome_token)
            if ok:
                payload: dict[str, Any] = {"compensated": counts.compensated,
                                           "irreversible": counts.irreversible}
                await self.ledger.set_outcome(uow.conn, params.run_id, RunStatus.REVERTED, now, None)
            else:
                listed = [{"step_id": f.step_id, "forward_event_id": f.forward_event_id,
                           "forward_type": f.forward_type, "reason": f.reason} for f in failing]
                payload = {"failing_steps": listed}
                failure = {"failing_steps": listed, "failing_count": failing_count,
                           "missing_results": params.missing_results}
                await self.ledger.set_outcome(uow.conn, params.run_id, RunStatus.REVERT_FAILED, now, failure)
                uow.emit(self.topics.alerts,
                         self._alert(params, now, listed, failing_count, counts.compensated))
            uow.emit(self.topics.runs, Envelope(
                message_id=message_id, type=kind.type, run_id=params.run_id, actor=COORDINATOR_ACTOR,
                correlation_id=params.run_id, occurred_at=now, payload=payload))
            await RECEIPTS.append_many(uow.conn, [
                (emission_source(m.topic, params.run_id, m.message_id), str(m.message_id),
                 payload_digest(m.value)) for m in uow.pending_messages])
            await uow.commit()
        return RevertOutcome(
            run_id=params.run_id, status="REVERTED" if ok else "REVERT_FAILED",
            compensated=counts.compensated, irreversible=counts.irreversible,
            failing_steps=[] if ok else failing, failing_count=0 if ok else failing_count,
            missing_results=params.missing_results, passes=params.passes)

    @staticmethod
    def _alert(params: FinishInput, now: datetime, listed: list[dict[str, Any]], failing_count: int,
               compensated: int) -> Envelope:
        first = listed[0] if listed else None
        parts = [f"revert of run {params.run_id} failed after {params.passes} pass(es): "
                 f"{failing_count} step(s) not compensated, {compensated} compensated."]
        if first is not None:
            parts.append(f"First failing step {first['step_id']} ({first['forward_type']}): "
                         f"{first['reason']}.")
        if params.missing_results:
            parts.append(f"{params.missing_results} published command(s) have no result in the ledger "
                         "(check the services' DLQs).")
        parts.append("Resolve the conflict, then revert the run again (kinshasa revert --run "
                     f"{params.run_id} --reason ...); steps already compensated are not touched again.")
        return Envelope(
            message_id=deterministic_id(ALERT_TYPE, params.run_id, params.outcome_token),
            type=ALERT_TYPE, run_id=params.run_id, actor=COORDINATOR_ACTOR, correlation_id=params.run_id,
            occurred_at=now, payload={
                "alert_id": str(deterministic_id(ALERT_TYPE, params.run_id, params.outcome_token)),
                "run_id": params.run_id, "kind": "revert_failed", "created_at": now.isoformat(),
                "summary": " ".join(parts), "failing_steps": listed, "failing_count": failing_count,
                "missing_results": params.missing_results, "compensated": compensated,
            })
