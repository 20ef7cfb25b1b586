"""Reads and revert-side writes of the per-run ledger: run index, steps, counts, compensation bookkeeping.

One SQL implementation serves SQLite and PostgreSQL (SQLAlchemy Core); the projection that fills the
ledger lives in `projector.py`. Nothing here knows a service's schema: a step is a forward event id,
its type and its entity key.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kinshasa.coordinator.models import FailingStep
from kinshasa.coordinator.store import (
    SETTLED,
    StepStatus,
    reader_for,
    rejections,
    run_events,
    runs,
    steps,
)
from kinshasa.schemas.clock import as_utc as utc
from kinshasa.schemas.run_status import RunStatus

# Bound parameters per IN (...) list: far below SQLite's and asyncpg's limits.
_CHUNK = 500
_OPEN = [StepStatus.APPLIED.value, StepStatus.COMPENSATING.value, StepStatus.COMPENSATION_FAILED.value]


class CursorError(ValueError):
    """A pagination cursor that this ledger did not hand out."""


@dataclass(frozen=True)
class OpenStep:
    """A step not yet settled: what a compensation pass needs to order and emit it."""

    step_id: int
    entity_key: str
    status: str
    attempt: int
    pass_token: str | None


@dataclass(frozen=True)
class ClaimedStep:
    """A step just marked `compensating` for an attempt: what its compensate command is built from."""

    step_id: int
    attempt: int
    forward_event_id: str
    forward_type: str
    service: str
    entity_type: str
    entity_id: str


@dataclass(frozen=True)
class Settlement:
    """A step's state as of its last settlement."""

    step_id: int
    status: str
    attempt: int
    failure_reason: str | None


@dataclass(frozen=True)
class RunCounts:
    """Per-run counts: steps by status, rejections, and results (forward commands answered)."""

    steps: int = 0
    applied: int = 0
    compensating: int = 0
    compensated: int = 0
    compensation_failed: int = 0
    irreversible: int = 0
    rejected: int = 0
    results: int = 0

    @property
    def unsettled(self) -> int:
        return self.applied + self.compensating + self.compensation_failed


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    agent_id: str | None
    entry_point: str | None
    purpose: str | None
    status: str
    started_at: datetime | None
    finished_at: datetime | None
    published_count: int
    final_count: int | None
    revert_reason: str | None
    revert_requested_by: str | None
    revert_requested_at: datetime | None
    reverted_at: datetime | None
    revert_failure: dict[str, Any] | None
    trip_reason: str | None
    last_event_at: datetime | None
    counts: RunCounts = field(default_factory=RunCounts)

    def to_json(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        c = self.counts
        return {
            "run_id": self.run_id, "agent_id": self.agent_id, "entry_point": self.entry_point,
            "purpose": self.purpose, "status": self.status, "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at), "published_count": self.published_count,
            "final_count": self.final_count, "trip_reason": self.trip_reason,
            "revert": {
                "reason": self.revert_reason, "requested_by": self.revert_requested_by,
                "requested_at": iso(self.revert_requested_at), "reverted_at": iso(self.reverted_at),
                "failure": self.revert_failure,
            },
            "counts": {
                "steps": c.steps, "applied": c.applied, "compensating": c.compensating,
                "compensated": c.compensated, "compensation_failed": c.compensation_failed,
                "irreversible": c.irreversible, "rejected": c.rejected, "results": c.results,
            },
            "last_event_at": iso(self.last_event_at),
        }


def encode_cursor(parts: Sequence[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(parts), separators=(",", ":")).encode()).decode()


def decode_cursor(cursor: str, arity: int) -> list[Any]:
    try:
        parts = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise CursorError(f"cursor {cursor!r} is not one this API returned: pass `next` from a previous "
                          "page, or omit it to start from the first page") from None
    if not isinstance(parts, list) or len(parts) != arity:
        raise CursorError(f"cursor {cursor!r} is not one this API returned: omit it to start over")
    return parts


def _chunks(items: Sequence[int], size: int = _CHUNK) -> Iterable[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _summary(row: Any, counts: RunCounts) -> RunSummary:
    return RunSummary(
        run_id=row.run_id, agent_id=row.agent_id, entry_point=row.entry_point, purpose=row.purpose,
        status=row.status, started_at=utc(row.started_at), finished_at=utc(row.finished_at),
        published_count=row.published_count, final_count=row.final_count,
        revert_reason=row.revert_reason, revert_requested_by=row.revert_requested_by,
        revert_requested_at=utc(row.revert_requested_at), reverted_at=utc(row.reverted_at),
        revert_failure=row.revert_failure, trip_reason=row.trip_reason,
        last_event_at=utc(row.last_event_at), counts=counts,
    )


class Ledger:
    """The coordinator's ledger store; every method opens its own connection unless given one."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.reader = reader_for(engine)

    async def close(self) -> None:
        if self.reader is not self.engine:
            await self.reader.dispose()

    # counts and progress

    async def counts(self, run_id: str, conn: AsyncConnection | None = None) -> RunCounts:
        if conn is None:
            async with self.reader.connect() as own:
                return await self.counts(run_id, own)
        by_status = {row.status: int(row.n) for row in await conn.execute(
            select(steps.c.status, func.count().label("n")).where(steps.c.run_id == run_id)
            .group_by(steps.c.status))}
        seen = (await conn.execute(select(func.count()).select_from(steps).where(
            steps.c.run_id == run_id, steps.c.forward_seen.is_(True)))).scalar_one()
        rejected = (await conn.execute(select(func.count()).select_from(rejections)
                                       .where(rejections.c.run_id == run_id))).scalar_one()
        return RunCounts(
            steps=sum(by_status.values()),
            applied=by_status.get(StepStatus.APPLIED.value, 0),
            compensating=by_status.get(StepStatus.COMPENSATING.value, 0),
            compensated=by_status.get(StepStatus.COMPENSATED.value, 0),
            compensation_failed=by_status.get(StepStatus.COMPENSATION_FAILED.value, 0),
            irreversible=by_status.get(StepStatus.IRREVERSIBLE.value, 0),
            rejected=int(rejected), results=int(seen) + int(rejected),
        )

    async def published(self, run_id: str) -> tuple[str | None, int, int | None]:
        """(status, highest published count reported, final count) of a run; (None, 0, None) if unknown.

        The final count comes with `revert_requested` or `tripped`: the gateway publishes nothing more
        for the run after it.
        """
        async with self.reader.connect() as conn:
            row = (await conn.execute(select(runs.c.status, runs.c.published_count, runs.c.final_count)
                                      .where(runs.c.run_id == run_id))).first()
        if row is None:
            return None, 0, None
        return row.status, int(row.published_count), row.final_count

    async def status(self, run_id: str) -> str | None:
        async with self.reader.connect() as conn:
            return (await conn.execute(select(runs.c.status).where(runs.c.run_id == run_id))).scalar()

    # compensation bookkeeping

    async def open_steps(self, run_id: str) -> list[OpenStep]:
        """Every unsettled step of a run, newest first."""
        async with self.reader.connect() as conn:
            rows = await conn.execute(
                select(steps.c.step_id, steps.c.entity_key, steps.c.status, steps.c.attempt,
                       steps.c.pass_token)
                .where(steps.c.run_id == run_id, steps.c.status.in_(_OPEN))
                .order_by(steps.c.step_id.desc()))
            return [OpenStep(r.step_id, r.entity_key, r.status, r.attempt, r.pass_token) for r in rows]

    async def claim(self, conn: AsyncConnection, run_id: str, step_ids: Sequence[int], pass_token: str,
                    now: datetime) -> list[ClaimedStep]:
        """Mark steps `compensating` for this pass, in the caller's transaction; returns what to emit.

        A step already settled is skipped (its ack won the race). A step claimed before by the same
        pass keeps its attempt number, so a retried activity re-emits the same message id; any other
        claim is a new attempt, hence a new compensate message id.
        """
        claimed: list[ClaimedStep] = []
        for chunk in _chunks(list(step_ids)):
            same_pass = and_(steps.c.pass_token == pass_token,
                             steps.c.status == StepStatus.COMPENSATING.value)
            result = await conn.execute(
                update(steps)
                .where(steps.c.run_id == run_id, steps.c.step_id.in_(list(chunk)), steps.c.status.in_(_OPEN))
                .values(status=StepStatus.COMPENSATING.value,
                        attempt=case((same_pass, steps.c.attempt), else_=steps.c.attempt + 1),
                        pass_token=pass_token, emitted_at=now)
                .returning(steps.c.step_id, steps.c.attempt, steps.c.forward_event_id, steps.c.forward_type,
                           steps.c.service, steps.c.entity_type, steps.c.entity_id))
            claimed.extend(ClaimedStep(r.step_id, r.attempt, r.forward_event_id, r.forward_type, r.service,
                                       r.entity_type, r.entity_id) for r in result)
        claimed.sort(key=lambda c: -c.step_id)
        return claimed

    async def settle_cursor(self, run_id: str) -> int:
        """The run's settlement counter now: `settled_since(cursor)` returns what settles after it."""
        async with self.reader.connect() as conn:
            value = (await conn.execute(
                select(runs.c.settle_counter).where(runs.c.run_id == run_id))).scalar()
            return int(value or 0)

    async def settled_since(self, run_id: str, cursor: int) -> tuple[list[Settlement], int]:
        """Steps that settled (compensated or refused) after `cursor`, in order, and the new cursor."""
        async with self.reader.connect() as conn:
            rows = (await conn.execute(
                select(steps.c.step_id, steps.c.status, steps.c.attempt, steps.c.failure_reason,
                       steps.c.settle_seq)
                .where(steps.c.run_id == run_id, steps.c.settle_seq > cursor)
                .order_by(steps.c.settle_seq))).all()
        out = [Settlement(r.step_id, r.status, r.attempt, r.failure_reason) for r in rows]
        return out, (int(rows[-1].settle_seq) if rows else cursor)

    async def failing_steps(self, run_id: str, limit: int = 50,
                            conn: AsyncConnection | None = None) -> tuple[list[FailingStep], int]:
        """Unsettled steps with the reason each is stuck, newest first (at most `limit`), and their total.

        Refused compensations come first: they are what the operator must resolve.
        """
        if conn is None:
            async with self.reader.connect() as own:
                return await self.failing_steps(run_id, limit, own)
        failed_first = case((steps.c.status == StepStatus.COMPENSATION_FAILED.value, 0), else_=1)
        rows = (await conn.execute(
            select(steps).where(steps.c.run_id == run_id, steps.c.status.in_(_OPEN))
            .order_by(failed_first, steps.c.step_id.desc()).limit(limit))).all()
        total = (await conn.execute(select(func.count()).select_from(steps).where(
            steps.c.run_id == run_id, steps.c.status.in_(_OPEN)))).scalar_one()
        # The newest unsettled step of each listed entity: an older one behind it was held back.
        keys = list({r.entity_key for r in rows})
        newest: dict[str, int] = {}
        for start in range(0, len(keys), _CHUNK):
            found = await conn.execute(
                select(steps.c.entity_key, func.max(steps.c.step_id))
                .where(steps.c.run_id == run_id, steps.c.status.in_(_OPEN),
                       steps.c.entity_key.in_(keys[start:start + _CHUNK]))
                .group_by(steps.c.entity_key))
            newest.update({k: int(v) for k, v in found})
        out = []
        for r in rows:
            if r.status == StepStatus.COMPENSATION_FAILED.value:
                reason = f"compensation refused by {r.service}: {r.failure_reason or 'no reason given'}"
            elif r.status == StepStatus.COMPENSATING.value:
                reason = (f"no answer from {r.service} to the compensate command after {r.attempt} "
                          f"attempt(s): check that the service runs and its DLQ")
            elif newest.get(r.entity_key, r.step_id) > r.step_id:
                reason = ("not compensated: a newer step of the same entity did not settle, so this older "
                          "one was held back")
            else:
                reason = ("not compensated yet: its forward event reached the ledger after the last pass; "
                          "revert the run again")
            out.append(FailingStep(step_id=r.step_id, forward_event_id=r.forward_event_id,
                                   forward_type=r.forward_type, entity=r.entity_key, attempts=r.attempt,
                                   reason=reason))
        return out, int(total)

    async def set_outcome(self, conn: AsyncConnection, run_id: str, status: RunStatus, at: datetime,
                          failure: dict[str, Any] | None) -> None:
        values: dict[str, Any] = {"status": status.value, "revert_failure": failure}
        if status is RunStatus.REVERTED:
            values["reverted_at"] = at
        await conn.execute(update(runs).where(runs.c.run_id == run_id).values(**values))

    # reads for the HTTP API and the bulk revert

    async def summary(self, run_id: str) -> RunSummary | None:
        async with self.reader.connect() as conn:
            row = (await conn.execute(select(runs).where(runs.c.run_id == run_id))).first()
            if row is None:
                return None
            return _summary(row, await self.counts(run_id, conn))

    async def steps_page(self, run_id: str, limit: int = 100,
                         before: int | None = None) -> tuple[list[dict[str, Any]], int | None]:
        """Steps newest first; the second value is the `before` of the next page (None at the end)."""
        async with self.reader.connect() as conn:
            return await self._steps_page(conn, run_id, limit, before)

    async def steps_pages(self, wanted: Sequence[tuple[str, int, int | None]]
                          ) -> list[tuple[list[dict[str, Any]], int | None] | None]:
        """`steps_page` of many runs, (run id, limit, before) each, on one connection and in order;
        None for a run the ledger has not seen. The gateway asks this once for all the runs of a query."""
        async with self.reader.connect() as conn:
            known: set[str] = set()
            ids = sorted({run_id for run_id, _, _ in wanted})
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start:start + _CHUNK]
                found = await conn.execute(select(runs.c.run_id).where(runs.c.run_id.in_(chunk)))
                known.update(found.scalars())
            return [await self._steps_page(conn, run_id, limit, before) if run_id in known else None
                    for run_id, limit, before in wanted]

    @staticmethod
    async def _steps_page(conn: AsyncConnection, run_id: str, limit: int,
                          before: int | None) -> tuple[list[dict[str, Any]], int | None]:
        query = select(steps).where(steps.c.run_id == run_id)
        if before is not None:
            query = query.where(steps.c.step_id < before)
        rows = (await conn.execute(query.order_by(steps.c.step_id.desc()).limit(limit + 1))).all()
        more = len(rows) > limit
        rows = rows[:limit]
        page = [{
            "step_id": r.step_id, "forward_event_id": r.forward_event_id, "forward_type": r.forward_type,
            "command_id": r.command_id, "service": r.service,
            "entity": {"service": r.service, "type": r.entity_type, "id": r.entity_id},
            "entity_key": r.entity_key, "actor": {"kind": r.actor_kind, "id": r.actor_id},
            "applied_at": utc(r.applied_at).isoformat() if r.applied_at else None,
            "status": r.status, "attempts": r.attempt,
            "resolved_at": utc(r.resolved_at).isoformat() if r.resolved_at else None,
            "failure_reason": r.failure_reason, "before": r.before_state, "after": r.after_state,
        } for r in rows]
        return page, (rows[-1].step_id if more and rows else None)

    async def counts_many(self, run_ids: Sequence[str]) -> list[RunCounts | None]:
        """`counts` of many runs on one connection, in order; None for a run the ledger has not seen."""
        async with self.reader.connect() as conn:
            known: set[str] = set()
            ids = sorted(set(run_ids))
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start:start + _CHUNK]
                found = await conn.execute(select(runs.c.run_id).where(runs.c.run_id.in_(chunk)))
                known.update(found.scalars())
            return [await self.counts(run_id, conn) if run_id in known else None for run_id in run_ids]

    async def rejections(self, run_id: str, limit: int = 100) -> list[dict[str, Any]]:
        async with self.reader.connect() as conn:
            rows = await conn.execute(select(rejections).where(rejections.c.run_id == run_id)
                                      .order_by(rejections.c.rejected_at.desc()).limit(limit))
            return [{"event_id": r.event_id, "command_id": r.command_id, "command_type": r.command_type,
                     "entity_key": r.entity_key, "code": r.code, "reason": r.reason,
                     "rejected_at": utc(r.rejected_at).isoformat()}
                    for r in rows]

    async def run_facts(self, run_id: str) -> list[dict[str, Any]]:
        """The run's lifecycle facts in order, for the timeline."""
        async with self.reader.connect() as conn:
            rows = await conn.execute(select(run_events).where(run_events.c.run_id == run_id)
                                      .order_by(run_events.c.occurred_at, run_events.c.message_id))
            return [{"message_id": r.message_id, "type": r.type,
                     "actor": {"kind": r.actor_kind, "id": r.actor_id},
                     "occurred_at": utc(r.occurred_at).isoformat(),
                     "payload": r.payload} for r in rows]

    @staticmethod
    def _filtered(query: Any, *, agent_id: str | None, entry_point: str | None, status: str | None,
                  started_after: datetime | None, started_before: datetime | None) -> Any:
        if agent_id is not None:
            query = query.where(runs.c.agent_id == agent_id)
        if entry_point is not None:
            query = query.where(runs.c.entry_point == entry_point)
        if status is not None:
            query = query.where(runs.c.status == status)
        if started_after is not None:
            query = query.where(runs.c.started_at >= started_after)
        if started_before is not None:
            query = query.where(runs.c.started_at < started_before)
        return query

    async def search_runs(self, *, agent_id: str | None = None, entry_point: str | None = None,
                          status: str | None = None, started_after: datetime | None = None,
                          started_before: datetime | None = None, limit: int = 50,
                          after: str | None = None) -> tuple[list[RunSummary], str | None]:
        """Runs newest first with their counts; the second value is the cursor of the next page."""
        query = self._filtered(select(runs), agent_id=agent_id, entry_point=entry_point, status=status,
                               started_after=started_after, started_before=started_before)
        if after is not None:
            when, run_id = decode_cursor(after, 2)
            try:
                at = datetime.fromisoformat(when)
            except (TypeError, ValueError):
                raise CursorError(f"cursor {after!r} is not one this API returned: omit it to start over") \
                    from None
            query = query.where(or_(runs.c.started_at < at,
                                    and_(runs.c.started_at == at, runs.c.run_id < run_id)))
        query = query.order_by(runs.c.started_at.desc(), runs.c.run_id.desc()).limit(limit + 1)
        async with self.reader.connect() as conn:
            rows = (await conn.execute(query)).all()
            more = len(rows) > limit
            rows = rows[:limit]
            out = [_summary(r, await self.counts(r.run_id, conn)) for r in rows]
        cursor = None
        if more and rows:
            last = rows[-1]
            cursor = encode_cursor([last.started_at.isoformat(), last.run_id])
        return out, cursor


def settled_statuses() -> list[str]:
    return [s.value for s in SETTLED]
