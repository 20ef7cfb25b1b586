"""Policy proposals: what an incident should change, each proved by replaying the recorded runs.

For a trip, the tripped threshold lowered to the highest limit that would have stopped the run before
its first escaped write, kept low enough only while at most 1% of the good runs replayed would have
tripped; and, for each operation that escaped, a window long enough to have held it until the trip. For
a revert that failed, an approval gate on each operation whose compensation failed (it stays revertible
and waits for `approveEgress`). Proposals target the ENTRY_POINT layer of the incident's run: an entry
point is the operator's name for one kind of work, so a punch thrown there by one agent will be thrown
there by another, and the runs that backtest it are that entry point's. A tightening layer can only
make the policy stricter, which is all a proposal ever does. Each carries its backtest and one sentence
an operator can read; accepting one appends a policy version linked to the incident, rejecting one
records why.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from kinshasa.gateway import incidents as incidents_mod
from kinshasa.gateway.backtest import (
    Backtest,
    Candidate,
    Governing,
    HistoricRun,
    PolicyHistory,
    compare,
    load_history,
    load_policy_history,
    off_the_loop,
    rate_bound,
    summarise,
)
from kinshasa.gateway.errors import Invalid, NotFound
from kinshasa.gateway.incidents import Incident, IncidentKind
from kinshasa.gateway.policy import EffectivePolicy, PolicyDocument, PolicyScope, append_version, lock_policy
from kinshasa.gateway.replay import Outcome, replay
from kinshasa.gateway.store import incidents, proposals
from kinshasa.schemas.envelope import utcnow

# How far back a proposal's backtest looks from its incident.
LOOKBACK = timedelta(days=7)
# The share of good runs a proposal may trip.
GOOD_RUNS_SHARE = 0.01
REASON_MAX = 2_000

# The tripped threshold and the policy field that sets its limit, and its lowest legal value.
_LIMITS: dict[str, tuple[str, int]] = {
    "writes": ("max_writes", 1),
    "velocity": ("max_velocity", 1),
    "services": ("max_services", 1),
    "errors": ("max_errors", 0),
}


class ProposalStatus(StrEnum):
    PROPOSED = "PROPOSED"
    ACCEPTED = "ACCEPTED"
    REJECTED = "REJECTED"


@dataclass(frozen=True)
class Proposal:
    proposal_id: str
    incident_id: str
    scope: PolicyScope
    subject: str
    settings: PolicyDocument
    rationale: str
    backtest: Backtest
    status: ProposalStatus
    created_at: datetime
    decided_at: datetime | None = None
    decided_by: str | None = None
    reason: str | None = None
    policy_version: int | None = None

    @classmethod
    def from_row(cls, row: Any) -> Proposal:
        return cls(
            proposal_id=row["proposal_id"],
            incident_id=row["incident_id"],
            scope=PolicyScope(row["scope"]),
            subject=row["subject"],
            settings=PolicyDocument.model_validate(json.loads(row["settings"])),
            rationale=row["rationale"],
            backtest=Backtest.from_json(json.loads(row["backtest"])),
            status=ProposalStatus(row["status"]),
            created_at=row["created_at"],
            decided_at=row["decided_at"],
            decided_by=row["decided_by"],
            reason=row["reason"],
            policy_version=row["policy_version"],
        )


@dataclass(frozen=True)
class Draft:
    """A proposal before it is stored: the change to the DEFAULT layer, its backtest and its sentence."""

    key: str
    settings: PolicyDocument
    rationale: str
    backtest: Backtest


def merge(base: PolicyDocument, change: PolicyDocument) -> PolicyDocument:
    """The layer `base` with `change` applied, each changed field the stricter of the two.

    A proposal only ever tightens: a limit it lowers stays lowered even if the layer moved lower since,
    a window it lengthens stays at least as long, a gate it adds joins the gates already there.
    """
    merged = base.model_dump()
    for name, value in change.model_dump(exclude_none=True).items():
        below = merged.get(name)
        if below is None:
            merged[name] = value
        elif name == "operation_windows":
            merged[name] = {**below, **{op: max(below.get(op, 0.0), w) for op, w in value.items()}}
        elif name == "operation_gates":
            merged[name] = sorted({*below, *value})
        else:
            merged[name] = min(below, value)
    return PolicyDocument.model_validate(merged)


class Proposer:
    """Drafts the proposals for one incident from the recorded runs since `since`."""

    def __init__(
        self,
        history: PolicyHistory,
        runs: Sequence[HistoricRun],
        incident: Incident,
        since: datetime,
    ) -> None:
        self.scope, self.subject = target_layer(incident)
        self.history = history
        self.runs = list(runs)
        self.incident = incident
        self.since = since
        self.governing = Governing(history)
        self.base = history.layers_at(None).get((self.scope, self.subject))
        self.good = [h for h in self.runs if h.good]
        self.bound = rate_bound(len(self.good), GOOD_RUNS_SHARE)
        self.target = next((h for h in self.runs if h.record.run_id == incident.run_id), None)

    def _candidate(self, change: PolicyDocument) -> Candidate:
        base = self.base.document if self.base is not None else PolicyDocument()
        # The layer keeps its kind: one an operator set to loosen stays so, now tighter than it was.
        loosen = self.base is not None and self.base.replaces and self.scope is not PolicyScope.DEFAULT
        return Candidate(self.history, self.scope, self.subject, merge(base, change), loosen)

    def _today(self) -> EffectivePolicy:
        """The policy in force now for the incident's run."""
        assert self.target is not None
        record = self.target.record
        return self._candidate(PolicyDocument()).policy_for(record.agent_id, record.entry_point)

    def _backtest(self, change: PolicyDocument) -> Backtest:
        return summarise(compare(self.runs, self.governing, self._candidate(change)))

    def drafts(self) -> list[Draft]:
        if self.target is None:
            return []
        if self.incident.kind is IncidentKind.TRIP:
            before = replay(self.target.recorded, self.governing.policy_for(self.target.recorded))
            found = [d for d in (self._threshold(before),) if d is not None]
            if self.incident.threshold == "errors":
                # Errors are learnt only from what was published: a longer window delays the lesson,
                # it does not hold the writes that teach it.
                return found
            return found + self._windows(before)
        if self.incident.kind is IncidentKind.REVERT_FAILED:
            gate = self._gate()
            return [gate] if gate is not None else []
        return []

    def _threshold(self, before: Outcome) -> Draft | None:
        threshold = self.incident.threshold or ""
        if threshold not in _LIMITS or not before.escaped or self.target is None:
            return None
        name, lowest = _LIMITS[threshold]
        target = self.target
        # From the policy in force now, which earlier lessons may already have tightened: a proposal
        # says what it changes today, and is made only if today's policy still lets this run escape.
        today = self._today()
        current = int(getattr(today, name))
        if current <= lowest or not replay(target.recorded, today).escaped:
            return None

        def change(limit: int) -> PolicyDocument:
            return PolicyDocument.model_validate({name: limit})

        def escaped(limit: int) -> Outcome:
            candidate = self._candidate(change(limit))
            policy = candidate.policy_for(target.record.agent_id, target.record.entry_point)
            return replay(target.recorded, policy)

        def good_tripped(limit: int) -> int:
            candidate = self._candidate(change(limit))
            return sum(
                1
                for h in self.good
                if replay(h.recorded, candidate.policy_for(h.record.agent_id, h.record.entry_point)).tripped
            )

        # Escapes only shrink as the limit falls and good-run trips only grow, so both edges are found
        # by bisection: the highest limit with nothing escaped, the lowest with good runs within bound.
        stop = _highest(lowest, current - 1, lambda limit: not escaped(limit).escaped)
        floor = _lowest(lowest, current - 1, lambda limit: good_tripped(limit) <= self.bound)
        if floor is None:
            return None
        chosen = stop if stop is not None and stop >= floor else floor
        after = escaped(chosen)
        if len(after.escaped) >= len(before.escaped):
            return None
        backtest = self._backtest(change(chosen))
        label = threshold if threshold != "errors" else "errors"
        rationale = (
            f"{label} {current} → {chosen} would have tripped this run at write {after.write_index} with "
            f"{_writes(len(after.escaped))} escaped instead of {len(before.escaped)}; "
            f"{backtest.good_runs_tripped} of {backtest.good_runs_replayed} good runs since "
            f"{_when(self.since)} would have tripped"
        )
        return Draft(f"limit:{name}", change(chosen), rationale, backtest)

    def _windows(self, before: Outcome) -> list[Draft]:
        target = self.target
        if target is None or before.tripped_at is None or not before.escaped:
            return []
        policy = self._today()
        needed: dict[str, float] = {}
        escaped = set(before.escaped)
        for write in target.recorded.writes:
            if write.command_id not in escaped or write.egress or policy.gated(write.operation):
                continue
            # Held until the trip, in whole seconds with at least one to spare: the same punch thrown a
            # little slower must still meet a held write.
            held_for = (before.tripped_at - write.accepted_at).total_seconds()
            window = float(math.ceil(held_for) + 1)
            current = policy.window_for(write.operation, write.declared_window_s)
            if window > current:
                needed[write.operation] = max(needed.get(write.operation, 0.0), window)
        drafts: list[Draft] = []
        for operation, window in sorted(needed.items()):
            change = PolicyDocument(operation_windows={operation: window})
            backtest = self._backtest(change)
            count = sum(1 for op in before.escaped_operations if op == operation)
            rationale = (
                f"a {window:g} s window on {operation} would have held its {count} escaped writes of this "
                f"run until the trip; over {backtest.incident_runs_replayed} incident runs since "
                f"{_when(self.since)} escaped writes go {backtest.escaped_writes_before} → "
                f"{backtest.escaped_writes_after}, and {backtest.good_runs_tripped} of "
                f"{backtest.good_runs_replayed} good runs would have tripped (a window delays, never trips)"
            )
            drafts.append(Draft(f"window:{operation}", change, rationale, backtest))
        return drafts

    def _gate(self) -> Draft | None:
        outcome = self.incident.detail.get("outcome") or {}
        steps = outcome.get("failing_steps") if isinstance(outcome, dict) else None
        operations = sorted(
            {
                str(step["forward_type"]).rsplit(".", 1)[0]
                for step in steps or ()
                if isinstance(step, dict) and isinstance(step.get("forward_type"), str)
            }
        )
        if not operations:
            return None
        change = PolicyDocument(operation_gates=operations)
        backtest = self._backtest(change)
        rationale = (
            f"gating {', '.join(operations)} behind approveEgress would have kept them from leaving without "
            f"an operator's approval, since their compensation failed; escaped writes over "
            f"{backtest.incident_runs_replayed} incident runs since {_when(self.since)} go "
            f"{backtest.escaped_writes_before} → {backtest.escaped_writes_after}, and "
            f"{backtest.good_runs_tripped} of {backtest.good_runs_replayed} good runs would have tripped"
        )
        return Draft("gate", change, rationale, backtest)


def target_layer(incident: Incident) -> tuple[PolicyScope, str]:
    """The layer a proposal for this incident changes: its run's entry point (DEFAULT without one)."""
    if incident.entry_point:
        return PolicyScope.ENTRY_POINT, incident.entry_point
    return PolicyScope.DEFAULT, ""


def _highest(lo: int, hi: int, ok: Callable[[int], bool]) -> int | None:
    """The highest value in [lo, hi] where `ok` holds, for an `ok` that holds below some point."""
    if hi < lo or not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _lowest(lo: int, hi: int, ok: Callable[[int], bool]) -> int | None:
    """The lowest value in [lo, hi] where `ok` holds, for an `ok` that holds above some point."""
    if hi < lo or not ok(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _writes(count: int) -> str:
    return f"{count} write" if count == 1 else f"{count} writes"


def _when(moment: datetime) -> str:
    return moment.strftime("%A %Y-%m-%d %H:%M UTC")


# The kinds of incident `Proposer.drafts` proposes for.
_PROPOSING = (IncidentKind.TRIP, IncidentKind.REVERT_FAILED)


def proposal_id(incident_id: str, key: str) -> str:
    """Deterministic: proposing twice for one incident yields the same rows."""
    return str(uuid.uuid5(uuid.UUID(incident_id), key))


async def draft(
    conn: AsyncConnection, incident: Incident, declared: Mapping[str, float | None]
) -> list[Draft]:
    """The proposals the recorded runs justify for this incident: reads only, so it runs outside any
    write transaction (replaying a week of runs must not hold the writers' lock)."""
    if incident.kind not in _PROPOSING:
        return []  # nothing to learn from the history: do not read it
    since = incident.opened_at - LOOKBACK
    scope, subject = target_layer(incident)
    # Bounded like any backtest; a busy entry point's proposals learn from its newest runs that fit.
    runs = await load_history(
        conn, declared, since, entry_point=subject if scope is PolicyScope.ENTRY_POINT else None,
        newest_only=True,
    )
    if incident.run_id is not None and all(h.record.run_id != incident.run_id for h in runs):
        runs += await load_history(conn, declared, datetime.min.replace(tzinfo=since.tzinfo),
                                   run_ids=[incident.run_id], newest_only=True)
    history = await load_policy_history(conn)
    return await off_the_loop(Proposer(history, runs, incident, since).drafts)


async def store_drafts(conn: AsyncConnection, incident: Incident, drafts: Sequence[Draft]) -> list[Proposal]:
    """Store the drafts as the incident's proposals unless another reader did first; the caller commits."""
    proposed = (
        await conn.execute(
            select(incidents.c.proposed)
            .where(incidents.c.incident_id == incident.incident_id)
            .with_for_update()
        )
    ).scalar_one()
    if not proposed:
        scope, subject = target_layer(incident)
        now = utcnow()
        for d in drafts:
            await conn.execute(
                insert(proposals).values(
                    proposal_id=proposal_id(incident.incident_id, d.key),
                    incident_id=incident.incident_id,
                    scope=scope.value,
                    subject=subject,
                    settings=json.dumps(d.settings.model_dump(exclude_none=True), sort_keys=True),
                    rationale=d.rationale,
                    backtest=json.dumps(d.backtest.to_json()),
                    status=ProposalStatus.PROPOSED.value,
                    created_at=now,
                )
            )
        await incidents_mod.mark_proposed(conn, incident.incident_id)
    return await list_proposals(conn, incident.incident_id)


async def list_proposals(conn: AsyncConnection, incident_id: str) -> list[Proposal]:
    rows = await conn.execute(
        select(proposals).where(proposals.c.incident_id == incident_id).order_by(proposals.c.proposal_id)
    )
    return [Proposal.from_row(r) for r in rows.mappings()]


async def get_proposal(conn: AsyncConnection, proposal_id_: str, lock: bool = False) -> Proposal:
    try:
        checked = str(uuid.UUID(proposal_id_))
    except ValueError:
        checked = ""
    query = select(proposals).where(proposals.c.proposal_id == checked)
    if lock:
        query = query.with_for_update()
    row = (await conn.execute(query)).mappings().first() if checked else None
    if row is None:
        raise NotFound(
            f"proposal {proposal_id_[:80]!r} does not exist: pass an id from an incident's proposals"
        )
    return Proposal.from_row(row)


def _check_reason(reason: str) -> str:
    reason = reason.strip()
    if not reason or len(reason) > REASON_MAX:
        raise Invalid(
            f"reason must be 1-{REASON_MAX} characters saying why you decide so", [("reason", "required")]
        )
    return reason


def _check_open(proposal: Proposal) -> None:
    if proposal.status is not ProposalStatus.PROPOSED:
        raise Invalid(
            f"proposal {proposal.proposal_id} is already {proposal.status.value}: a proposal is decided once",
            [("id", "already decided")],
        )


async def accept(conn: AsyncConnection, proposal_id_: str, reason: str, operator_id: str) -> Proposal:
    """Append the DEFAULT layer with the proposal applied (linked to its incident); the caller commits."""
    reason = _check_reason(reason)
    proposal = await get_proposal(conn, proposal_id_, lock=True)
    _check_open(proposal)
    # Before the layer is read: another accept (or a setPolicy) of this layer appends first or waits.
    await lock_policy(conn)
    history = await load_policy_history(conn)
    base = history.layers_at(None).get((proposal.scope, proposal.subject))
    document = merge(base.document if base is not None else PolicyDocument(), proposal.settings)
    loosen = base is not None and base.replaces and proposal.scope is not PolicyScope.DEFAULT
    version = await append_version(
        conn,
        proposal.scope,
        proposal.subject,
        document,
        operator_id,
        f"{reason} (proposal {proposal.proposal_id} for incident {proposal.incident_id})",
        loosen=loosen,
        incident_id=proposal.incident_id,
    )
    now = utcnow()
    await _decide(conn, proposal, ProposalStatus.ACCEPTED, reason, operator_id, now, version)
    await incidents_mod.mark_decided(
        conn, proposal.incident_id, f"accepted proposal {proposal.proposal_id}: policy version {version}", now
    )
    return await get_proposal(conn, proposal.proposal_id)


async def reject(conn: AsyncConnection, proposal_id_: str, reason: str, operator_id: str) -> Proposal:
    reason = _check_reason(reason)
    proposal = await get_proposal(conn, proposal_id_, lock=True)
    _check_open(proposal)
    now = utcnow()
    await _decide(conn, proposal, ProposalStatus.REJECTED, reason, operator_id, now, None)
    await incidents_mod.mark_decided(
        conn, proposal.incident_id, f"rejected proposal {proposal.proposal_id}: {reason}", now
    )
    return await get_proposal(conn, proposal.proposal_id)


async def _decide(
    conn: AsyncConnection,
    proposal: Proposal,
    status: ProposalStatus,
    reason: str,
    operator_id: str,
    now: datetime,
    version: int | None,
) -> None:
    await conn.execute(
        update(proposals)
        .where(proposals.c.proposal_id == proposal.proposal_id)
        .values(
            status=status.value, decided_at=now, decided_by=operator_id, reason=reason, policy_version=version
        )
    )
