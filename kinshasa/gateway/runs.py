"""Runs: minted by `startRun`, bound to one agent and entry point; every write names one."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from kinshasa.gateway import budgets, idempotency, store
from kinshasa.gateway.alerts import Alert
from kinshasa.gateway.errors import Forbidden, GatewayError, Invalid, RunClosed, RunNotFound
from kinshasa.gateway.policy import LATEST_VERSION, PolicyBook
from kinshasa.gateway.principals import ENTRY_POINT_MAX, Principal
from kinshasa.gateway.store import commands, runs
from kinshasa.gateway.uow import Tx
from kinshasa.schemas.envelope import Actor, Envelope, RunEventKind, new_id, utcnow
from kinshasa.topics.catalogue import RUNS

PURPOSE_MAX = 2_000
RUN_ID_MAX = 64


@dataclass(frozen=True)
class RunRecord:
    """One row of gw_runs, its breaker columns included."""

    run_id: str
    agent_id: str
    entry_point: str
    purpose: str | None
    status: str
    started_at: datetime
    finished_at: datetime | None
    breaker_state: str
    writes: int
    errors: int
    services: tuple[str, ...]
    probes_left: int
    tripped_reason: str | None
    tripped_at: datetime | None
    trip_count: int
    on_hold: bool
    published: int
    applied: int
    compensated: int
    revert_reason: str | None
    revert_requested_at: datetime | None
    # The policy version that governed the run's latest breaker decision (None: it has not written yet
    # and was started without a policy lookup).
    policy_version: int | None = None

    @classmethod
    def from_row(cls, row: Any) -> RunRecord:
        m = row._mapping if hasattr(row, "_mapping") else row
        return cls(
            run_id=m["run_id"],
            agent_id=m["agent_id"],
            entry_point=m["entry_point"],
            purpose=m["purpose"],
            status=m["status"],
            started_at=m["started_at"],
            finished_at=m["finished_at"],
            breaker_state=m["breaker_state"],
            writes=m["writes"],
            errors=m["errors"],
            services=tuple(json.loads(m["services"] or "[]")),
            probes_left=m["probes_left"],
            tripped_reason=m["tripped_reason"],
            tripped_at=m["tripped_at"],
            trip_count=m["trip_count"],
            on_hold=bool(m["on_hold"]),
            published=m["published"],
            applied=m["applied"],
            compensated=m["compensated"],
            revert_reason=m["revert_reason"],
            revert_requested_at=m["revert_requested_at"],
            policy_version=m.get("policy_version"),
        )

    @property
    def reverting_or_done(self) -> bool:
        return self.status in (store.REVERTING, store.REVERTED, store.REVERT_FAILED)


def run_envelope(run_id: str, kind: RunEventKind, actor: Actor, payload: dict[str, Any]) -> Envelope:
    return Envelope(
        message_id=new_id(),
        type=kind.type,
        run_id=run_id,
        actor=actor,
        correlation_id=run_id,
        occurred_at=utcnow(),
        payload=payload,
    )


def check_run_id(run_id: str) -> str:
    if not run_id or len(run_id) > RUN_ID_MAX:
        raise RunNotFound(f"run {run_id[:80]!r} does not exist: start one with startRun and use its id")
    return run_id


# Built once: the compiled form is cached by SQLAlchemy, and the hot path builds no statement objects.
_LOAD_FOR_WRITE = (
    select(runs, LATEST_VERSION.label("latest_policy_version"))
    .where(runs.c.run_id.in_(bindparam("run_ids", expanding=True)))
    # Sorted, so two writers locking several runs (on any replica) take the row locks in one order.
    .order_by(runs.c.run_id)
    .with_for_update(of=runs)
)
_VELOCITY = (
    select(commands.c.run_id, func.count())
    .where(
        commands.c.run_id.in_(bindparam("run_ids", expanding=True)),
        commands.c.accepted_at > bindparam("since", type_=store.UtcDateTime),
    )
    .group_by(commands.c.run_id)
)


async def load_runs_for_write(
    conn: AsyncConnection, run_ids: Sequence[str]
) -> tuple[dict[str, RunRecord], int | None]:
    """Runs by id with their breaker rows locked, and the latest policy version, in one statement (hot path).

    PostgreSQL locks the rows FOR UPDATE in run-id order; SQLite's BEGIN IMMEDIATE already holds the
    database's write lock. Ids that name no run are simply absent from the result, and with no run
    found there is no policy version either (None).
    """
    rows = (await conn.execute(_LOAD_FOR_WRITE, {"run_ids": sorted(set(run_ids))})).all()
    policy_version = int(rows[0]._mapping["latest_policy_version"]) if rows else None
    return {row._mapping["run_id"]: RunRecord.from_row(row) for row in rows}, policy_version


async def load_run(conn: AsyncConnection, run_id: str, *, lock: bool = False) -> RunRecord:
    """The run, or RUN_NOT_FOUND. With lock=True it holds the breaker row until the transaction ends.

    PostgreSQL: SELECT ... FOR UPDATE. SQLite: the engine begins every transaction IMMEDIATE, which
    already holds the database write lock, so FOR UPDATE is unnecessary (and not rendered).
    """
    query = select(runs).where(runs.c.run_id == check_run_id(run_id))
    if lock:
        query = query.with_for_update()
    row = (await conn.execute(query)).first()
    if row is None:
        raise RunNotFound(f"run {run_id!r} does not exist: start one with startRun and use its id")
    return RunRecord.from_row(row)


def check_owner(run: RunRecord, principal: Principal) -> None:
    if principal.is_agent and run.agent_id != principal.id:
        raise Forbidden(f"run {run.run_id} belongs to another agent: write only to runs you started")


@dataclass
class StartOutcome:
    """What one startRun decided: the run (new, or the one its idempotency key first started), or the
    budget refusal; and the alerts to send once the transaction committed (a refusal commits its alert)."""

    run: RunRecord | None
    refusal: GatewayError | None = None
    alerts: list[Alert] = field(default_factory=list)


async def start_run(
    tx: Tx,
    principal: Principal,
    entry_point: str,
    purpose: str | None,
    policies: PolicyBook | None = None,
    *,
    idempotency_key: str | None = None,
    webhook: bool = False,
) -> StartOutcome:
    """Mint a run, in one transaction with its idempotency key and the agent's run budgets.

    Order: the input, then the agent's allowed entry points (FORBIDDEN), then the idempotency key (a
    retry gets the run it started, whatever the budgets say now), then maxConcurrentRuns and
    maxRunsPerHour, checked and counted under the agent's budget row lock.
    """
    entry_point = entry_point.strip()
    problems = []
    if not entry_point or len(entry_point) > ENTRY_POINT_MAX:
        problems.append(("entryPoint", f"must be 1-{ENTRY_POINT_MAX} characters naming what started the run"))
    if purpose is not None and len(purpose) > PURPOSE_MAX:
        problems.append(("purpose", f"must be at most {PURPOSE_MAX} characters"))
    if problems:
        raise Invalid("invalid startRun input: " + "; ".join(f"{p}: {m}" for p, m in problems), problems)
    if not principal.may_start_at(entry_point):
        allowed = ", ".join(sorted(principal.entry_points or ())) or "none"
        raise Forbidden(
            f"agent {principal.id} may not start runs at entry point {entry_point!r}: its entry points are "
            f"{allowed}. Entry points are the operator's to grant: ask one to add it to your credentials"
        )
    now = utcnow()
    request = idempotency.digest("startRun", {"entryPoint": entry_point, "purpose": purpose})
    if idempotency_key is not None:
        known = await idempotency.recall(tx.conn, principal.id, [idempotency_key], now)
        if idempotency_key in known:
            answer = known[idempotency_key].replay(request)
            return StartOutcome(await load_run(tx.conn, str(answer["runId"])))
    policy_version: int | None = None
    if policies is not None:
        policy = await policies.effective(tx.conn, principal.id, entry_point)
        policy_version = policy.version
        overrun, alert = await budgets.check_start(tx, principal.id, entry_point, policy, now, webhook)
        if overrun is not None:
            return StartOutcome(None, overrun.refusal(), [alert] if alert is not None else [])
    run_id = str(uuid.uuid4())
    await tx.conn.execute(
        insert(runs).values(
            run_id=run_id,
            agent_id=principal.id,
            entry_point=entry_point,
            purpose=purpose,
            status=store.RUNNING,
            started_at=now,
            breaker_state=store.CLOSED,
            writes=0,
            errors=0,
            services="[]",
            probes_left=0,
            trip_count=0,
            on_hold=False,
            published=0,
            applied=0,
            compensated=0,
            policy_version=policy_version,
        )
    )
    if idempotency_key is not None:
        await idempotency.remember(
            tx.conn, [idempotency.row(principal.id, idempotency_key, request, {"runId": run_id}, now)]
        )
    await tx.emit(
        RUNS,
        run_envelope(
            run_id,
            RunEventKind.STARTED,
            Actor(kind="agent", id=principal.id),
            {
                "agent_id": principal.id,
                "entry_point": entry_point,
                "purpose": purpose,
                "started_at": now.isoformat(),
            },
        ),
    )
    return StartOutcome(await load_run(tx.conn, run_id))


async def finish_run(tx: Tx, principal: Principal, run_id: str) -> RunRecord:
    run = await load_run(tx.conn, run_id, lock=True)
    check_owner(run, principal)
    if run.status != store.RUNNING:
        raise RunClosed(f"run {run_id} is {run.status}, not RUNNING: only a running run can be finished")
    await tx.conn.execute(
        update(runs).where(runs.c.run_id == run_id).values(status=store.FINISHED, finished_at=utcnow())
    )
    # Held commands still wait out their window; published_count here is what has left so far.
    await tx.emit(
        RUNS,
        run_envelope(
            run_id,
            RunEventKind.FINISHED,
            Actor(kind="agent", id=principal.id),
            {"published_count": run.published},
        ),
    )
    return await load_run(tx.conn, run_id)


async def command_counts(conn: AsyncConnection, run_id: str) -> dict[str, int]:
    """Commands of a run by status, with rejected results counted from the events consumed."""
    rows = await conn.execute(
        select(commands.c.status, func.count()).where(commands.c.run_id == run_id).group_by(commands.c.status)
    )
    return {status: int(count) for status, count in rows}


async def velocities(conn: AsyncConnection, run_ids: Sequence[str], since: datetime) -> dict[str, int]:
    """Commands accepted after `since`, per run (runs without any are absent): the velocity counts."""
    rows = await conn.execute(_VELOCITY, {"run_ids": sorted(set(run_ids)), "since": since})
    return {run_id: int(count) for run_id, count in rows}


async def velocity(conn: AsyncConnection, run_id: str, since: datetime) -> int:
    return int(
        (
            await conn.execute(
                select(func.count())
                .select_from(commands)
                .where(commands.c.run_id == run_id, commands.c.accepted_at > since)
            )
        ).scalar_one()
    )


@dataclass(frozen=True)
class RunFilter:
    agent_id: str | None = None
    entry_point: str | None = None
    status: str | None = None
    started_after: datetime | None = None
    started_before: datetime | None = None
    run_ids: tuple[str, ...] | None = None
    breaker_state: str | None = None


def encode_cursor(run: RunRecord) -> str:
    raw = json.dumps([run.started_at.isoformat(), run.run_id]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        started, run_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(started), str(run_id)
    except (ValueError, TypeError) as exc:
        raise Invalid(
            "invalid cursor: pass the endCursor of a previous page unchanged",
            [("after", "not a cursor this gateway issued")],
        ) from exc


def filter_clause(f: RunFilter) -> list[Any]:
    clause: list[Any] = []
    if f.agent_id is not None:
        clause.append(runs.c.agent_id == f.agent_id)
    if f.entry_point is not None:
        clause.append(runs.c.entry_point == f.entry_point)
    if f.status is not None:
        clause.append(runs.c.status == f.status)
    if f.started_after is not None:
        clause.append(runs.c.started_at >= f.started_after)
    if f.started_before is not None:
        clause.append(runs.c.started_at < f.started_before)
    if f.breaker_state is not None:
        clause.append(runs.c.breaker_state == f.breaker_state)
    if f.run_ids is not None:
        clause.append(runs.c.run_id.in_(f.run_ids))
    return clause


async def list_runs(
    conn: AsyncConnection, f: RunFilter, first: int, after: str | None
) -> tuple[list[RunRecord], bool]:
    """Newest first, keyset-paginated on (started_at, run_id) so pages stay stable as runs start."""
    clause = filter_clause(f)
    if after:
        started, run_id = decode_cursor(after)
        clause.append(
            or_(runs.c.started_at < started, and_(runs.c.started_at == started, runs.c.run_id < run_id))
        )
    query = (
        select(runs).where(*clause).order_by(runs.c.started_at.desc(), runs.c.run_id.desc()).limit(first + 1)
    )
    rows = [RunRecord.from_row(r) for r in await conn.execute(query)]
    return rows[:first], len(rows) > first
