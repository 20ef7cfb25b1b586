"""The ledger projection: service events and run facts, folded idempotently into the per-run ledger.

It reads envelopes only. A forward `*.applied` becomes a step (irreversible when the event says so: egress
is never compensated), `*.rejected` a rejection, `*.compensated` / `*.compensation_failed` settle a step,
and `run.*` facts maintain the run index. Each table's natural key (forward event id, rejection event
id, run-fact message id) is what makes a redelivered event change nothing.

A batch is projected with a handful of statements whatever its size (the ledger sees every event of
every service, and a 10,000-step revert is 20,000 events). Within a batch, run facts are applied first
in order, then forward results, then compensation outcomes in order; per entity that is the order they
happened in, because one entity's events share a partition.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from sqlalchemy import Table, and_, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from kinshasa.coordinator.store import StepStatus, rejections, run_events, runs, steps
from kinshasa.kernel import tracing
from kinshasa.schemas.envelope import Envelope as EnvelopeModel
from kinshasa.schemas.envelope import (
    EventSuffix,
    RunEventKind,
    command_type_of,
    deterministic_id,
    split_type,
)
from kinshasa.schemas.run_status import RunStatus

log = logging.getLogger(__name__)

RUN_SERVICE = "run"
_CHUNK = 500
# The largest entity state (before or after) kept on a step, in bytes of JSON.
STATE_MAX_BYTES = 16_384

# Which run facts may move a run from which statuses: a late `finished` must not hide a revert.
_ADVANCES: dict[RunEventKind, tuple[RunStatus, tuple[RunStatus, ...] | None]] = {
    RunEventKind.FINISHED: (RunStatus.FINISHED, (RunStatus.RUNNING,)),
    RunEventKind.TRIPPED: (RunStatus.TRIPPED, (RunStatus.RUNNING, RunStatus.FINISHED)),
    RunEventKind.REVERT_REQUESTED: (RunStatus.REVERTING, None),
    RunEventKind.REVERTED: (RunStatus.REVERTED, None),
    RunEventKind.REVERT_FAILED: (RunStatus.REVERT_FAILED, None),
}


@dataclass(frozen=True)
class RevertTrigger:
    """A run fact that asks the coordinator to revert: `revert_requested`, the gateway's doorbell."""

    run_id: str
    message_id: str
    source: str  # the run fact kind that triggered it
    published_count: int | None
    reason: str
    requested_by: str
    # The projection span of the request, so the revert's workflow joins its trace (None from the sweeper).
    traceparent: str | None = None


def insert_ignore(conn: AsyncConnection, table: Table) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING for the connection's backend."""
    return postgresql.insert(table) if conn.dialect.name == "postgresql" else sqlite.insert(table)


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _when(value: Any, default: datetime) -> datetime:
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return default
        return parsed.astimezone(UTC) if parsed.tzinfo is not None else default
    return default


def _forward_id(env: EnvelopeModel) -> str | None:
    raw = env.payload.get("forward_event_id")
    try:
        return str(UUID(str(raw))) if raw is not None else None
    except ValueError:
        return None


def domain_state(env: EnvelopeModel, key: str) -> Any:
    """The `before` or `after` a service put on its `.applied` event, as the ledger keeps it for reading.

    A state larger than `STATE_MAX_BYTES` of JSON is kept as a note saying so: the ledger holds one row
    per step of runs of 10,000+ steps, and the operator reads the whole entity from its service anyway.
    """
    value = env.payload.get(key) if isinstance(env.payload, dict) else None
    if value is None:
        return None
    size = len(json.dumps(value, default=str))
    if size > STATE_MAX_BYTES:
        return {"omitted": f"{size} bytes of JSON, over the ledger's {STATE_MAX_BYTES}: read the entity "
                           "from its service"}
    return value


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start:start + _CHUNK]


def trigger_of(env: EnvelopeModel) -> RevertTrigger | None:
    """The revert a run fact asks for: every `revert_requested`, and nothing else.

    A trip is not a request, whatever its `auto_revert` says: with auto-revert the gateway rings its
    doorbell in the trip's transaction, which discards the run's held commands and records
    `revert_requested`. Starting on `tripped` as well would be a second door, one that never saw the
    held commands discarded.
    """
    if env.run_id is None or split_type(env.type)[0] != RUN_SERVICE:
        return None
    if RunEventKind.from_type(env.type) is not RunEventKind.REVERT_REQUESTED:
        return None
    return trigger_from_fact(env.run_id, str(env.message_id), env.payload, env.actor.id)


def trigger_from_fact(run_id: str, message_id: str, payload: Any, actor_id: str) -> RevertTrigger:
    """The trigger a recorded `revert_requested` stands for: from the envelope, or from its ledger row."""
    payload = payload if isinstance(payload, dict) else {}
    return RevertTrigger(
        run_id=run_id, message_id=message_id, source=RunEventKind.REVERT_REQUESTED.value,
        published_count=_int(payload.get("published_count")),
        reason=_text(payload.get("reason")) or "revert requested",
        requested_by=_text(payload.get("requested_by")) or actor_id)


class LedgerProjector:
    """Applies envelopes to the ledger inside the caller's transaction."""

    async def project(self, conn: AsyncConnection, env: EnvelopeModel) -> RevertTrigger | None:
        """Fold one envelope; returns the revert it asks for, if any (also on redelivery)."""
        triggers = await self.project_batch(conn, [env])
        return triggers[0] if triggers else None

    async def project_batch(self, conn: AsyncConnection,
                            envelopes: Sequence[EnvelopeModel]) -> list[RevertTrigger]:
        """Fold a batch; returns the reverts its run facts ask for, in order."""
        # One projection span per envelope, in its own trace, covering the fold of the batch it came in.
        spans = [tracing.start_span(f"project {env.type}", parent=env.traceparent, kind="consumer")
                 for env in envelopes]
        try:
            triggers = await self._fold(conn, envelopes)
        except BaseException as exc:
            tracing.end(spans, exc)
            raise
        tracing.end(spans)
        if not triggers:
            return triggers
        traces = {str(env.message_id): tracing.traceparent_of(started) or env.traceparent
                  for env, started in zip(envelopes, spans, strict=True)}
        return [replace(t, traceparent=traces.get(t.message_id)) for t in triggers]

    async def _fold(self, conn: AsyncConnection, envelopes: Sequence[EnvelopeModel]) -> list[RevertTrigger]:
        facts: list[EnvelopeModel] = []
        applied: list[EnvelopeModel] = []
        rejected: list[EnvelopeModel] = []
        outcomes: list[EnvelopeModel] = []
        for env in envelopes:
            if env.run_id is None:
                continue  # not part of any agent run: nothing to revert
            service, _, suffix = split_type(env.type)
            if service == RUN_SERVICE:
                facts.append(env)
            elif suffix == EventSuffix.APPLIED:
                applied.append(env)
            elif suffix == EventSuffix.REJECTED:
                rejected.append(env)
            elif suffix in (EventSuffix.COMPENSATED, EventSuffix.COMPENSATION_FAILED):
                outcomes.append(env)
        relevant = [*facts, *applied, *rejected, *outcomes]
        if not relevant:
            return []
        await self._ensure_runs(conn, relevant)
        triggers = []
        for env in facts:
            await self._run_fact(conn, env)
            trigger = trigger_of(env)
            if trigger is not None:
                triggers.append(trigger)
        await self._applied(conn, applied)
        await self._rejected(conn, rejected)
        await self._outcomes(conn, outcomes)
        await self._touch(conn, relevant)
        return triggers

    # runs

    async def _ensure_runs(self, conn: AsyncConnection, envs: Sequence[EnvelopeModel]) -> None:
        first: dict[str, datetime] = {}
        for env in envs:
            assert env.run_id is not None
            seen = first.get(env.run_id)
            first[env.run_id] = env.occurred_at if seen is None else min(seen, env.occurred_at)
        # Until `run.started` arrives, the first fact seen stands in for the start time.
        rows = [{"run_id": run_id, "status": RunStatus.RUNNING.value, "published_count": 0, "next_step_id": 1,
                 "settle_counter": 0, "started_at": at, "first_seen_at": at, "last_event_at": at}
                for run_id, at in first.items()]
        await conn.execute(insert_ignore(conn, runs).on_conflict_do_nothing(index_elements=[runs.c.run_id]),
                           rows)

    async def _touch(self, conn: AsyncConnection, envs: Sequence[EnvelopeModel]) -> None:
        last: dict[str, datetime] = {}
        for env in envs:
            assert env.run_id is not None
            last[env.run_id] = max(last.get(env.run_id, env.occurred_at), env.occurred_at)
        stmt = (update(runs)
                .where(runs.c.run_id == bindparam("b_run"), runs.c.last_event_at < bindparam("b_at"))
                .values(last_event_at=bindparam("b_at")))
        await conn.execute(stmt, [{"b_run": r, "b_at": at} for r, at in last.items()])

    async def _run_fact(self, conn: AsyncConnection, env: EnvelopeModel) -> None:
        assert env.run_id is not None
        run_id = env.run_id
        inserted = await conn.execute(
            insert_ignore(conn, run_events).values(
                message_id=str(env.message_id), run_id=run_id, type=env.type, actor_kind=env.actor.kind,
                actor_id=env.actor.id, occurred_at=env.occurred_at, payload=dict(env.payload),
            ).on_conflict_do_nothing(index_elements=[run_events.c.message_id]))
        if not inserted.rowcount:
            return  # a redelivered fact: already folded in
        kind = RunEventKind.from_type(env.type)
        payload = env.payload
        values: dict[str, Any] = {}
        count = _int(payload.get("published_count"))
        if kind is RunEventKind.STARTED:
            values.update(agent_id=_text(payload.get("agent_id")) or env.actor.id,
                          entry_point=_text(payload.get("entry_point")),
                          purpose=_text(payload.get("purpose")),
                          started_at=_when(payload.get("started_at"), env.occurred_at))
        elif kind is RunEventKind.FINISHED:
            values.update(finished_at=env.occurred_at)
        elif kind is RunEventKind.TRIPPED:
            values.update(trip_reason=_text(payload.get("reason")))
        elif kind is RunEventKind.REVERT_REQUESTED:
            values.update(revert_reason=_text(payload.get("reason")),
                          revert_requested_by=_text(payload.get("requested_by")) or env.actor.id,
                          revert_requested_at=env.occurred_at)
        elif kind is RunEventKind.REVERTED:
            values.update(reverted_at=env.occurred_at, revert_failure=None)
        elif kind is RunEventKind.REVERT_FAILED:
            values.update(revert_failure={"failing_steps": payload.get("failing_steps", [])})
        if values:
            await conn.execute(update(runs).where(runs.c.run_id == run_id).values(**values))
        if count is not None:
            await conn.execute(update(runs).where(runs.c.run_id == run_id, runs.c.published_count < count)
                               .values(published_count=count))
            if kind in (RunEventKind.TRIPPED, RunEventKind.REVERT_REQUESTED):
                # After these the gateway publishes nothing more for the run (breaker open, held discarded).
                await conn.execute(update(runs).where(
                    runs.c.run_id == run_id, runs.c.final_count.is_(None) | (runs.c.final_count < count),
                ).values(final_count=count))
        advance = _ADVANCES.get(kind)
        if advance is not None:
            status, allowed_from = advance
            stmt = update(runs).where(runs.c.run_id == run_id).values(status=status.value)
            if allowed_from is not None:
                stmt = stmt.where(runs.c.status.in_([s.value for s in allowed_from]))
            await conn.execute(stmt)

    async def _allocate(self, conn: AsyncConnection, counter: Any, wanted: dict[str, int]) -> dict[str, int]:
        """Reserve `wanted[run]` consecutive values of a per-run counter; returns the first of each range."""
        first = {}
        for run_id, n in wanted.items():
            if n <= 0:
                continue
            row = (await conn.execute(update(runs).where(runs.c.run_id == run_id)
                                      .values({counter: counter + n}).returning(counter))).one()
            first[run_id] = int(row[0]) - n
        return first

    # steps

    async def _steps_by_forward_id(self, conn: AsyncConnection, ids: Sequence[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for chunk in _chunks(ids):
            rows = await conn.execute(
                select(steps.c.forward_event_id, steps.c.run_id, steps.c.step_id, steps.c.status,
                       steps.c.attempt, steps.c.forward_seen)
                .where(steps.c.forward_event_id.in_(list(chunk))))
            for row in rows:
                found[row.forward_event_id] = row
        return found

    async def _applied(self, conn: AsyncConnection, envs: Sequence[EnvelopeModel]) -> None:
        unique: dict[str, EnvelopeModel] = {}
        for env in envs:
            if env.entity is None:
                log.warning("ledger: %s %s has no entity; it cannot be compensated and is not recorded",
                            env.type, env.message_id)
                continue
            unique.setdefault(str(env.message_id), env)
        if not unique:
            return
        existing = await self._steps_by_forward_id(conn, list(unique))
        late = [(existing[i], env) for i, env in unique.items()
                if i in existing and not existing[i].forward_seen]
        if late:
            # Their compensation was projected first; now the forward fact arrived too.
            await conn.execute(
                update(steps)
                .where(steps.c.run_id == bindparam("b_run"), steps.c.step_id == bindparam("b_step"))
                .values(forward_seen=True, applied_at=bindparam("b_at"), command_id=bindparam("b_cmd"),
                        before_state=bindparam("b_before"), after_state=bindparam("b_after")),
                [{"b_run": row.run_id, "b_step": row.step_id, "b_at": env.occurred_at,
                  "b_cmd": str(env.causation_id) if env.causation_id else None,
                  "b_before": domain_state(env, "before"), "b_after": domain_state(env, "after")}
                 for row, env in late])
        new = [env for i, env in unique.items() if i not in existing]
        if not new:
            return
        wanted: dict[str, int] = defaultdict(int)
        for env in new:
            assert env.run_id is not None
            wanted[env.run_id] += 1
        next_id = await self._allocate(conn, runs.c.next_step_id, wanted)
        rows = []
        for env in new:
            assert env.run_id is not None and env.entity is not None
            # The service says so on the event (docs/service-contract.md): egress is never compensated.
            irreversible = isinstance(env.payload, dict) and env.payload.get("irreversible") is True
            status = StepStatus.IRREVERSIBLE if irreversible else StepStatus.APPLIED
            step_id = next_id[env.run_id]
            next_id[env.run_id] += 1
            rows.append({
                "run_id": env.run_id, "step_id": step_id, "forward_event_id": str(env.message_id),
                "command_id": str(env.causation_id) if env.causation_id else None, "forward_type": env.type,
                "service": env.entity.service, "entity_type": env.entity.type, "entity_id": env.entity.id,
                "entity_key": env.entity.key, "actor_kind": env.actor.kind, "actor_id": env.actor.id,
                "applied_at": env.occurred_at, "status": status.value, "forward_seen": True, "attempt": 0,
                "before_state": domain_state(env, "before"), "after_state": domain_state(env, "after"),
            })
        await conn.execute(steps.insert(), rows)

    async def _rejected(self, conn: AsyncConnection, envs: Sequence[EnvelopeModel]) -> None:
        if not envs:
            return
        rows = [{
            "event_id": str(env.message_id), "run_id": env.run_id,
            "command_id": str(env.causation_id) if env.causation_id else None,
            "command_type": command_type_of(env.type), "entity_key": env.entity.key if env.entity else None,
            "actor_kind": env.actor.kind, "actor_id": env.actor.id, "code": _text(env.payload.get("code")),
            "reason": _text(env.payload.get("reason")), "rejected_at": env.occurred_at,
        } for env in envs]
        await conn.execute(insert_ignore(conn, rejections)
                           .on_conflict_do_nothing(index_elements=[rejections.c.event_id]), rows)

    async def _outcomes(self, conn: AsyncConnection, envs: Sequence[EnvelopeModel]) -> None:
        """Settle steps: compensated is final; a refusal counts only if it answers the current attempt."""
        by_step: dict[str, list[EnvelopeModel]] = {}
        for env in envs:
            forward_id = _forward_id(env)
            if forward_id is None:
                log.warning("ledger: %s %s names no forward_event_id; ignored", env.type, env.message_id)
                continue
            by_step.setdefault(forward_id, []).append(env)
        if not by_step:
            return
        existing = await self._steps_by_forward_id(conn, list(by_step))
        settled: list[tuple[str, str, EnvelopeModel, str | None]] = []  # (run, forward id, event, reason)
        orphans: list[tuple[str, EnvelopeModel]] = []
        for forward_id, events in by_step.items():
            row = existing.get(forward_id)
            if row is None:
                done = next((e for e in events if split_type(e.type)[2] == EventSuffix.COMPENSATED), None)
                if done is not None and done.entity is not None:
                    orphans.append((forward_id, done))
                continue
            state: str = row.status
            final: tuple[EnvelopeModel, str | None] | None = None
            for env in events:
                if split_type(env.type)[2] == EventSuffix.COMPENSATED:
                    if state != StepStatus.COMPENSATED.value:
                        state, final = StepStatus.COMPENSATED.value, (env, None)
                    continue
                if state in (StepStatus.COMPENSATED.value, StepStatus.IRREVERSIBLE.value):
                    continue
                current = deterministic_id("compensate", forward_id, str(row.attempt))
                if env.causation_id is not None and row.attempt > 0 and env.causation_id != current:
                    continue  # the answer to an older attempt; the newer one is in flight and decides
                refusal = _text(env.payload.get("reason")) or "the service refused the compensation"
                state, final = StepStatus.COMPENSATION_FAILED.value, (env, refusal)
            if final is not None:
                settled.append((row.run_id, forward_id, final[0], final[1]))
        wanted: dict[str, int] = defaultdict(int)
        for run_id, *_ in settled:
            wanted[run_id] += 1
        for _, env in orphans:
            assert env.run_id is not None
            wanted[env.run_id] += 1
        seq = await self._allocate(conn, runs.c.settle_counter, wanted)
        params = []
        for run_id, forward_id, env, reason in settled:
            seq[run_id] += 1
            status = StepStatus.COMPENSATED if reason is None else StepStatus.COMPENSATION_FAILED
            params.append({
                "b_run": run_id, "b_step": existing[forward_id].step_id, "b_status": status.value,
                "b_at": env.occurred_at, "b_event": str(env.message_id), "b_reason": reason,
                "b_seq": seq[run_id],
            })
        if params:
            # Never overwrite compensated: an activity's claim may have raced this batch on PostgreSQL.
            await conn.execute(
                update(steps).where(and_(steps.c.run_id == bindparam("b_run"),
                                         steps.c.step_id == bindparam("b_step"),
                                         steps.c.status != StepStatus.COMPENSATED.value))
                .values(status=bindparam("b_status"), resolved_at=bindparam("b_at"),
                        outcome_event_id=bindparam("b_event"), failure_reason=bindparam("b_reason"),
                        settle_seq=bindparam("b_seq")),
                params)
        if orphans:
            await self._orphans(conn, orphans, seq)

    async def _orphans(self, conn: AsyncConnection, orphans: list[tuple[str, EnvelopeModel]],
                       seq: dict[str, int]) -> None:
        """Compensations that outran their forward event (a re-partitioned topic, a replay): keep the fact,
        so the step is known settled when its `.applied` arrives."""
        wanted: dict[str, int] = defaultdict(int)
        for _, env in orphans:
            assert env.run_id is not None
            wanted[env.run_id] += 1
        next_id = await self._allocate(conn, runs.c.next_step_id, wanted)
        rows = []
        for forward_id, env in orphans:
            assert env.run_id is not None and env.entity is not None
            seq[env.run_id] += 1
            step_id = next_id[env.run_id]
            next_id[env.run_id] += 1
            forward_type = _text(env.payload.get("forward_type")) or f"{command_type_of(env.type)}.applied"
            rows.append({
                "run_id": env.run_id, "step_id": step_id, "forward_event_id": forward_id, "command_id": None,
                "forward_type": forward_type, "service": env.entity.service, "entity_type": env.entity.type,
                "entity_id": env.entity.id, "entity_key": env.entity.key, "actor_kind": env.actor.kind,
                "actor_id": env.actor.id, "applied_at": env.occurred_at,
                "status": StepStatus.COMPENSATED.value, "forward_seen": False, "attempt": 0,
                "resolved_at": env.occurred_at, "outcome_event_id": str(env.message_id),
                "settle_seq": seq[env.run_id],
            })
        await conn.execute(steps.insert(), rows)
