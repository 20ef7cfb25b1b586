"""The quarantine window: held commands, their release into the outbox, operator release/discard/hold.

A command is published only by moving it into the outbox, always in a transaction that holds its
run's breaker row, so a trip, a hold or a revert committed first always wins over a release.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, exists, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from kinshasa.gateway import store
from kinshasa.gateway.errors import RunClosed
from kinshasa.gateway.policy import EffectivePolicy
from kinshasa.gateway.runs import RunRecord, load_run, run_envelope
from kinshasa.gateway.store import commands, runs
from kinshasa.gateway.uow import Tx
from kinshasa.schemas.envelope import Actor, Envelope, RunEventKind, utcnow
from kinshasa.topics.catalogue import RUNS, commands_topic

UNPUBLISHED = (store.HELD, store.AWAITING_APPROVAL)


async def publish(tx: Tx, rows: Sequence[Any], now: datetime, decided_by: str | None = None) -> int:
    """Move stored commands into the outbox and mark them PUBLISHED; the caller holds the run lock(s)."""
    if not rows:
        return 0
    per_run: dict[str, int] = {}
    for row in rows:
        stored = row["envelope"]
        wire = stored if isinstance(stored, bytes) else stored.encode()
        # The bytes the write stored go out as they are: a release adds nothing (the releasing
        # operator's trace among them), so the receipt and the command row name the same message.
        await tx.emit_serialised(commands_topic(row["service"]), Envelope.model_validate_json(wire), wire)
        per_run[row["run_id"]] = per_run.get(row["run_id"], 0) + 1
    ids = [row["command_id"] for row in rows]
    await tx.conn.execute(
        update(commands)
        .where(commands.c.command_id.in_(ids))
        .values(
            status=store.PUBLISHED,
            published_at=now,
            manual_hold=False,
            discard_at=None,
            **({"decided_by": decided_by} if decided_by else {}),
        )
    )
    for run_id, count in per_run.items():
        await tx.conn.execute(
            update(runs).where(runs.c.run_id == run_id).values(published=runs.c.published + count)
        )
    return len(rows)


async def discard(tx: Tx, run_id: str, statuses: Sequence[str], reason: str, decided_by: str) -> int:
    result = await tx.conn.execute(
        update(commands)
        .where(
            commands.c.run_id == run_id,
            commands.c.status.in_(statuses),
        )
        .values(
            status=store.DISCARDED, reason=reason, decided_by=decided_by, manual_hold=False, discard_at=None
        )
    )
    return int(result.rowcount or 0)


def _why(reason: str | None) -> dict[str, Any]:
    return {"reason": reason} if reason else {}


def _fact(count: int, reason: str | None) -> dict[str, Any]:
    return {"count": count, **_why(reason)}


def _actor(operator_id: str) -> Actor:
    return Actor(kind="operator", id=operator_id)


def closed(run: RunRecord, action: str) -> RunClosed:
    """RUN_CLOSED for an operator action on a run whose revert was requested: what happened, what next."""
    why = f" (revert reason: {run.revert_reason[:200]})" if run.revert_reason else ""
    if run.status == store.REVERTING:
        next_step = "follow the revert with run(id) { status counts }"
    elif run.status == store.REVERT_FAILED:
        next_step = "resolve the failing steps shown by run(id) { steps } and call revertRun again"
    else:
        next_step = "nothing of it is left to decide"
    return RunClosed(
        f"run {run.run_id} is {run.status}{why}: its held and awaiting-approval commands were discarded "
        f"when the revert began, so nothing of it can be {action} any more; {next_step}",
        status=run.status,
    )


def _check_open(run: RunRecord, action: str) -> None:
    if run.reverting_or_done:
        raise closed(run, action)


async def release_run(
    tx: Tx, run_id: str, operator_id: str, reason: str | None = None
) -> tuple[RunRecord, int]:
    """Publish every HELD command of the run now, manual holds included: an operator's decision (its reason,
    if given, goes on the `released` fact)."""
    run = await load_run(tx.conn, run_id, lock=True)
    _check_open(run, "released")
    rows = (
        (
            await tx.conn.execute(
                select(commands)
                .where(
                    commands.c.run_id == run_id,
                    commands.c.status == store.HELD,
                )
                .order_by(commands.c.accepted_at, commands.c.command_id)
            )
        )
        .mappings()
        .all()
    )
    count = await publish(tx, rows, utcnow(), decided_by=operator_id)
    await tx.conn.execute(update(runs).where(runs.c.run_id == run_id).values(on_hold=False))
    if count:
        await tx.emit(
            RUNS, run_envelope(run_id, RunEventKind.RELEASED, _actor(operator_id), _fact(count, reason))
        )
    return await load_run(tx.conn, run_id), count


async def discard_run(
    tx: Tx, run_id: str, operator_id: str, reason: str | None = None
) -> tuple[RunRecord, int]:
    """Discard the run's unpublished commands (held and awaiting approval): nothing downstream saw them.

    Accepted whatever the run's status, a reverting or reverted one included: what an operator asks for
    ("none of this may leave") holds there already, since the revert discarded everything unpublished,
    so the answer is a count of 0 rather than an error; anything still unpublished (left held by a
    gateway from before the doorbell discarded at once) is discarded now.
    """
    await load_run(tx.conn, run_id, lock=True)
    count = await discard(tx, run_id, UNPUBLISHED, reason or "discarded by operator", operator_id)
    if count:
        await tx.emit(
            RUNS, run_envelope(run_id, RunEventKind.DISCARDED, _actor(operator_id), _fact(count, reason))
        )
    return await load_run(tx.conn, run_id), count


async def hold_run(
    tx: Tx, run_id: str, operator_id: str, policy: EffectivePolicy, reason: str | None = None
) -> tuple[RunRecord, int]:
    """Stop the clock: held commands (and later ones) wait for releaseRun; a hold timeout can only discard.
    The reason, if given, is each held command's `reason` until it is decided."""
    run = await load_run(tx.conn, run_id, lock=True)
    _check_open(run, "held")
    now = utcnow()
    discard_at = now + timedelta(seconds=policy.hold_timeout_s) if policy.hold_timeout_s is not None else None
    result = await tx.conn.execute(
        update(commands)
        .where(
            commands.c.run_id == run_id,
            commands.c.status == store.HELD,
            commands.c.manual_hold.is_(False),
        )
        .values(manual_hold=True, discard_at=discard_at, decided_by=operator_id)
    )
    if reason:
        # Every held command carries the reason, those a trip had put on hold already too.
        await tx.conn.execute(
            update(commands)
            .where(commands.c.run_id == run_id, commands.c.status == store.HELD)
            .values(reason=reason, decided_by=operator_id)
        )
    await tx.conn.execute(update(runs).where(runs.c.run_id == run_id).values(on_hold=True))
    return await load_run(tx.conn, run_id), int(result.rowcount or 0)


@dataclass
class ReleaseStats:
    released: int = 0
    discarded: int = 0


def _releasable(run: Any) -> bool:
    return (
        run["breaker_state"] != store.OPEN
        and not run["on_hold"]
        and run["status"] not in (store.REVERTING, store.REVERTED, store.REVERT_FAILED)
    )


def _due_release(now: Any) -> Any:
    """Held, not on a manual hold, window elapsed."""
    held = commands.c.status == store.HELD
    return and_(held, commands.c.manual_hold.is_(False), commands.c.release_at <= now)


def _due_discard(now: Any) -> Any:
    """Held on a manual hold whose timeout elapsed."""
    held = commands.c.status == store.HELD
    return and_(held, commands.c.manual_hold.is_(True), commands.c.discard_at <= now)


# Whether a releaser pass has anything to do; run without locks before the pass takes any.
_ANY_DUE = select(
    exists().where(_due_release(bindparam("now", type_=commands.c.release_at.type)))
    | exists().where(_due_discard(bindparam("now", type_=commands.c.release_at.type)))
)


async def any_due(conn: AsyncConnection, now: datetime) -> bool:
    """True if some held command's window or hold timeout has elapsed (its run may still be held)."""
    return bool((await conn.execute(_ANY_DUE, {"now": now})).scalar())


async def release_due(tx: Tx, now: datetime, batch: int) -> ReleaseStats:
    """One releaser pass in one transaction: publish due commands, discard expired manual holds.

    Run rows are locked with SKIP LOCKED: a run busy with a write (or a trip) is simply taken on the
    next pass, and two gateway replicas never wait on each other here.
    """
    stats = ReleaseStats()
    due_release, due_discard = _due_release(now), _due_discard(now)
    run_ids = sorted(
        {r[0] for r in await tx.conn.execute(select(commands.c.run_id).where(due_release).limit(batch))}
        | {r[0] for r in await tx.conn.execute(select(commands.c.run_id).where(due_discard).limit(batch))}
    )
    if not run_ids:
        return stats
    locked = (
        (
            await tx.conn.execute(
                select(runs)
                .where(runs.c.run_id.in_(run_ids))
                .order_by(runs.c.run_id)
                .with_for_update(skip_locked=True)
            )
        )
        .mappings()
        .all()
    )
    eligible = [r["run_id"] for r in locked if _releasable(r)]
    if eligible:
        rows = (
            (
                await tx.conn.execute(
                    select(commands)
                    .where(due_release, commands.c.run_id.in_(eligible))
                    .order_by(commands.c.accepted_at, commands.c.command_id)
                    .limit(batch)
                )
            )
            .mappings()
            .all()
        )
        stats.released = await publish(tx, rows, now)
    for run in locked:
        count = await discard_expired(tx, run["run_id"], now)
        stats.discarded += count
    return stats


async def discard_expired(tx: Tx, run_id: str, now: datetime) -> int:
    result = await tx.conn.execute(
        update(commands)
        .where(
            commands.c.run_id == run_id,
            commands.c.status == store.HELD,
            commands.c.manual_hold.is_(True),
            commands.c.discard_at <= now,
        )
        .values(
            status=store.DISCARDED,
            reason="hold timeout elapsed: discarded, never released",
            manual_hold=False,
        )
    )
    count = int(result.rowcount or 0)
    if count:
        await tx.emit(
            RUNS,
            run_envelope(
                run_id,
                RunEventKind.DISCARDED,
                Actor(kind="system", id="gateway"),
                {"count": count, "reason": "hold_timeout"},
            ),
        )
    return count


def payload_json(row: Any) -> dict[str, Any]:
    return dict(json.loads(row["envelope"]).get("payload", {}))
