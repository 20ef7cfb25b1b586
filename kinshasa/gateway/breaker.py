"""The per-run circuit breaker: the write check, the trip, and the operator's state changes.

CLOSED admits writes within every threshold. A write or an error that would exceed one trips the
breaker to OPEN: the write is refused, held commands move to a manual hold, `run.tripped` goes to
kinshasa.runs and an alert is raised, all in the transaction that holds the run's breaker row; with
auto-revert the revert doorbell (`revert.request_revert`) rings in that transaction as well.
HALF_OPEN is set only by an operator and admits `probe_writes` writes; a probe the service rejects
trips it OPEN again, and once every probe has been applied it closes by itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, select, update

from kinshasa.gateway import store
from kinshasa.gateway.alerts import Alert, record_alert, trip_alert
from kinshasa.gateway.errors import BreakerOpen, Invalid, RunClosed
from kinshasa.gateway.incidents import IncidentKind, by_operation, open_incident, run_commands_at
from kinshasa.gateway.policy import EffectivePolicy
from kinshasa.gateway.revert import request_revert
from kinshasa.gateway.runs import RunRecord, command_counts, load_run, run_envelope
from kinshasa.gateway.store import commands, runs
from kinshasa.gateway.uow import Tx
from kinshasa.schemas.envelope import Actor, RunEventKind, utcnow
from kinshasa.topics.catalogue import RUNS


@dataclass(frozen=True)
class Trip:
    threshold: str
    count: float
    limit: float

    @property
    def reason(self) -> str:
        if self.threshold == "operator":
            return "opened by an operator"
        if self.threshold == "probe":
            return "a probe write was rejected while HALF_OPEN"
        return f"{self.threshold} {self.count:g} exceeded the limit of {self.limit:g}"


@dataclass(frozen=True)
class Verdict:
    accept: bool
    probe: bool = False
    trip: Trip | None = None


def check_write(run: RunRecord, policy: EffectivePolicy, service: str, recent: int) -> Verdict:
    """Would one more write to `service` keep the run within its thresholds? Pure: no I/O."""
    if run.breaker_state == store.OPEN:
        return Verdict(accept=False)
    if run.breaker_state == store.HALF_OPEN:
        return Verdict(accept=run.probes_left > 0, probe=True)
    if run.errors > policy.max_errors:
        return Verdict(False, trip=Trip("errors", run.errors, policy.max_errors))
    if run.writes + 1 > policy.max_writes:
        return Verdict(False, trip=Trip("writes", run.writes + 1, policy.max_writes))
    if recent + 1 > policy.max_velocity:
        return Verdict(False, trip=Trip("velocity", recent + 1, policy.max_velocity))
    if service not in run.services and len(run.services) + 1 > policy.max_services:
        return Verdict(False, trip=Trip("services", len(run.services) + 1, policy.max_services))
    return Verdict(accept=True)


def snapshot(run: RunRecord, recent: int | None = None) -> dict[str, Any]:
    """The breaker as BREAKER_OPEN's extensions show it, so an agent knows why it was stopped."""
    return {
        "state": run.breaker_state,
        "writes": run.writes,
        "errors": run.errors,
        "servicesTouched": list(run.services),
        "velocity": recent,
        "trippedReason": run.tripped_reason,
        "probesLeft": run.probes_left,
    }


def refusal(run: RunRecord, recent: int | None = None) -> BreakerOpen:
    if run.breaker_state == store.HALF_OPEN:
        message = (
            f"run {run.run_id}'s breaker is HALF_OPEN and its probe writes are used up: "
            "wait for an operator to close it"
        )
    else:
        message = (
            f"run {run.run_id}'s circuit breaker is OPEN ({run.tripped_reason or 'tripped'}): "
            "no further writes are accepted; an operator has been alerted"
        )
    return BreakerOpen(message, breaker=snapshot(run, recent))


@dataclass(frozen=True)
class Refused:
    """The write a trip refused: kept on the TRIP incident, so a replay of the run meets it too."""

    operation: str
    service: str


async def trip(
    tx: Tx,
    run: RunRecord,
    cause: Trip,
    policy: EffectivePolicy,
    actor: Actor,
    webhook: bool,
    at: datetime | None = None,
    refused: Refused | None = None,
) -> tuple[RunRecord, Alert]:
    """Open the breaker in the caller's transaction, which must hold the run's row lock.

    `at` is the moment of the decision (the refused write's acceptance time, the rejection's arrival):
    the run's `tripped_at` and its TRIP incident, with what had escaped and what was held then.

    Held commands move to a manual hold (a hold timeout, if any, discards them later: never releases),
    and `run.tripped` plus the alert are emitted through the outbox with the same commit. With
    auto-revert (the policy's default; never for an operator's OPEN) the revert doorbell rings in that
    commit too: the run is REVERTING and its unpublished commands are discarded.
    """
    now = at or utcnow()
    out, waiting = await run_commands_at(tx.conn, run.run_id)
    discard_at = now + timedelta(seconds=policy.hold_timeout_s) if policy.hold_timeout_s is not None else None
    await tx.conn.execute(
        update(commands)
        .where(
            commands.c.run_id == run.run_id,
            commands.c.status == store.HELD,
            commands.c.manual_hold.is_(False),
        )
        .values(manual_hold=True, discard_at=discard_at)
    )
    await open_incident(
        tx.conn,
        IncidentKind.TRIP,
        now,
        run_id=run.run_id,
        agent_id=run.agent_id,
        entry_point=run.entry_point,
        policy_version=policy.version,
        threshold=cause.threshold,
        count=cause.count,
        limit=cause.limit,
        write_index=run.writes + 1,
        escaped=by_operation(list(out)),
        held=len(waiting),
        services=list(run.services),
        detail={
            "reason": cause.reason,
            "escaped_ids": [r["command_id"] for r in out],
            "held_ids": [r["command_id"] for r in waiting],
            "refused": {"operation": refused.operation, "service": refused.service, "at": now.isoformat()}
            if refused is not None
            else None,
        },
    )
    status = run.status if run.reverting_or_done else store.TRIPPED
    await tx.conn.execute(
        update(runs)
        .where(runs.c.run_id == run.run_id)
        .values(
            breaker_state=store.OPEN,
            status=status,
            tripped_reason=cause.reason,
            tripped_at=now,
            trip_count=runs.c.trip_count + 1,
            probes_left=0,
            policy_version=policy.version,
        )
    )
    by_status = await command_counts(tx.conn, run.run_id)
    counts = {
        "held": by_status.get(store.HELD, 0),
        "awaiting_approval": by_status.get(store.AWAITING_APPROVAL, 0),
        "published": run.published,
        "writes": run.writes,
        "errors": run.errors,
    }
    auto_revert = policy.auto_revert and cause.threshold != "operator"
    await tx.emit(
        RUNS,
        run_envelope(
            run.run_id,
            RunEventKind.TRIPPED,
            actor,
            {
                "reason": cause.reason,
                "threshold": cause.threshold,
                "counts": counts,
                "thresholds": policy.thresholds(),
                "services_touched": list(run.services),
                "held": counts["held"],
                "published_count": run.published,
                "auto_revert": auto_revert,
            },
        ),
    )
    alert = trip_alert(
        run.run_id,
        run.agent_id,
        run.entry_point,
        cause.threshold,
        cause.count,
        cause.limit,
        cause.reason,
        list(run.services),
        counts,
        auto_revert,
    )
    await record_alert(tx, alert, webhook)
    if auto_revert and not run.reverting_or_done:
        # The same doorbell as an operator's revertRun, in this commit: the held and awaiting commands
        # are discarded now, never left on a manual hold that nothing could clear once the run is REVERTED.
        await request_revert(tx, run.run_id, f"automatic revert after a trip: {cause.reason}", actor)
    return await load_run(tx.conn, run.run_id), alert


async def set_state(
    tx: Tx, run_id: str, state: str, policy_for: Any, operator: Actor, webhook: bool
) -> tuple[RunRecord, Alert | None]:
    """An operator's setBreaker. OPEN trips (with alert); HALF_OPEN grants probes; CLOSED resumes."""
    if state not in (store.CLOSED, store.OPEN, store.HALF_OPEN):
        raise Invalid(
            f"unknown breaker state {state!r}: use CLOSED, OPEN or HALF_OPEN", [("state", "unknown")]
        )
    run = await load_run(tx.conn, run_id, lock=True)
    if run.reverting_or_done:
        raise RunClosed(f"run {run_id} is {run.status}: its breaker stays OPEN")
    policy: EffectivePolicy = await policy_for(tx.conn, run.agent_id, run.entry_point)
    if state == store.OPEN:
        if run.breaker_state == store.OPEN:
            return run, None
        return await trip(tx, run, Trip("operator", run.writes, policy.max_writes), policy, operator, webhook)
    if state == store.HALF_OPEN:
        if run.breaker_state != store.OPEN:
            raise Invalid(
                f"run {run_id}'s breaker is {run.breaker_state}: only an OPEN breaker can go HALF_OPEN",
                [("state", "breaker is not OPEN")],
            )
        await tx.conn.execute(
            update(runs)
            .where(runs.c.run_id == run_id)
            .values(breaker_state=store.HALF_OPEN, probes_left=policy.probe_writes)
        )
        return await load_run(tx.conn, run_id), None
    status = store.RUNNING if run.status == store.TRIPPED and run.finished_at is None else run.status
    if run.status == store.TRIPPED and run.finished_at is not None:
        status = store.FINISHED
    await tx.conn.execute(
        update(runs)
        .where(runs.c.run_id == run_id)
        .values(breaker_state=store.CLOSED, status=status, probes_left=0)
    )
    return await load_run(tx.conn, run_id), None


async def probes_settled(tx: Tx, run: RunRecord) -> bool:
    """True when a HALF_OPEN run used all its probes and every one was applied: the breaker may close."""
    if run.breaker_state != store.HALF_OPEN or run.probes_left > 0:
        return False
    pending = (
        await tx.conn.execute(
            select(func.count())
            .select_from(commands)
            .where(
                and_(
                    commands.c.run_id == run.run_id,
                    commands.c.probe.is_(True),
                    commands.c.result.is_(None),
                    commands.c.status != store.DISCARDED,
                )
            )
        )
    ).scalar_one()
    return int(pending) == 0


def services_after(run: RunRecord, service: str) -> str:
    return json.dumps(sorted({*run.services, service}))
