"""Replay of a recorded run through a policy: the breaker and quarantine decisions as a pure function.

A run's record is its command stream: each accepted write (when, which operation of which service,
whether it is egress, its quarantine window, when it left the gateway, when a rejection came back) and,
for a run the breaker stopped on a write, the refused write that tripped it. `replay` walks that stream in
time order under any policy and says where the breaker would have tripped, which writes would have
escaped (published before the trip) and which would have been held. The live gateway decides with the
same rules (`breaker.check_write`, the exact velocity check in `commands.CommandWriter._admit`, the error
check in `listener.Listener._result`), so replaying a run under the policy that governed it reproduces
what the gateway decided; `tests/integration/gateway/test_replay_matches_live.py` proves it.

Time is what the record says. A held command leaves `window` after its acceptance plus the releaser's lag
observed for it (its recorded publish time minus its release time; for a command still held when the
run closed, at least until that moment), so under the governing policy its publish time is exactly the
recorded one and under a candidate its window moves it. An operation that waits for approval (egress, or
an operation gate) leaves when the operator approved it, or never. A rejection arrives as long after the
publish as it did live. Operator actions (HALF_OPEN probes, holdRun) are not replayed: the replay
answers "what would the breaker and the windows alone have done".
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from kinshasa.gateway.breaker import Trip
from kinshasa.gateway.policy import EffectivePolicy


@dataclass(frozen=True)
class RecordedWrite:
    """One accepted write of a run, as the gateway recorded it."""

    command_id: str
    operation: str
    service: str
    accepted_at: datetime
    egress: bool = False
    # The service's declared default window for the operation (None: none declared).
    declared_window_s: float | None = None
    # Recorded under the governing policy: when it was due (None: published at once or awaiting approval),
    # when it was published (None: never), when its rejection reached the gateway (None: not rejected).
    release_at: datetime | None = None
    published_at: datetime | None = None
    rejected_at: datetime | None = None
    # Did it wait for an operator's approval (egress or a gate) when it was recorded?
    awaited_approval: bool = False


@dataclass(frozen=True)
class RefusedWrite:
    """The write the breaker refused when it tripped: part of the record, so a replay meets it too."""

    operation: str
    service: str
    at: datetime


@dataclass(frozen=True)
class RecordedRun:
    run_id: str
    agent_id: str
    entry_point: str
    writes: tuple[RecordedWrite, ...]
    tripping_write: RefusedWrite | None = None
    # When the run stopped releasing (its trip, its revert request): commands unpublished then had waited
    # at least that long, whatever their window.
    closed_at: datetime | None = None
    policy_version: int | None = None


@dataclass(frozen=True)
class Outcome:
    """What the breaker and the windows decide for one run under one policy."""

    trip: Trip | None = None
    tripped_at: datetime | None = None
    # The 1-based index, among the run's write attempts, of the first write the breaker stopped.
    write_index: int | None = None
    escaped: tuple[str, ...] = ()
    held: tuple[str, ...] = ()
    # The operation of each escaped write, in the order of `escaped`.
    escaped_operations: tuple[str, ...] = field(default=(), repr=False)

    @property
    def tripped(self) -> bool:
        return self.trip is not None


def departure(write: RecordedWrite, policy: EffectivePolicy, closed_at: datetime | None) -> datetime | None:
    """When the write leaves the gateway under `policy`: None if it would wait for an approval never given."""
    if write.egress or policy.gated(write.operation):
        # An operator's approval is a recorded decision; one not recorded is never given.
        return write.published_at if write.awaited_approval else None
    window = timedelta(seconds=policy.window_for(write.operation, write.declared_window_s))
    return write.accepted_at + window + _lag(write, closed_at)


def _lag(write: RecordedWrite, closed_at: datetime | None) -> timedelta:
    """How long after its due time the releaser published it (what the record shows of the releaser)."""
    zero = timedelta(0)
    if write.awaited_approval or write.release_at is None:
        return zero
    if write.published_at is not None:
        return max(zero, write.published_at - write.release_at)
    if closed_at is not None:
        return max(zero, closed_at - write.release_at)
    return zero


def replay(
    run: RecordedRun, policy: EffectivePolicy, departure_of: Callable[..., datetime | None] = departure
) -> Outcome:
    """Walk the run's writes and rejections in time order under `policy`; stop at the first trip."""
    window = timedelta(seconds=policy.velocity_window_s)
    attempts: list[tuple[datetime, int, int]] = [(w.accepted_at, 1, i) for i, w in enumerate(run.writes)]
    if run.tripping_write is not None:
        attempts.append((run.tripping_write.at, 1, len(run.writes)))
    leaves = [departure_of(w, policy, run.closed_at) for w in run.writes]
    # Rejections arrive as long after their publish as they did live; they come before a write at the
    # same instant (the gateway counted each under the run's lock, in this order, when it happened).
    for i, w in enumerate(run.writes):
        left = leaves[i]
        if w.rejected_at is not None and w.published_at is not None and left is not None:
            attempts.append((left + (w.rejected_at - w.published_at), 0, i))
    heapq.heapify(attempts)

    accepted: list[int] = []
    admitted: set[int] = set()
    accepted_at: list[datetime] = []
    services: set[str] = set()
    errors = 0
    trip: Trip | None = None
    tripped_at: datetime | None = None
    while attempts:
        at, is_write, i = heapq.heappop(attempts)
        if not is_write:
            if i not in admitted:
                continue
            errors += 1
            if errors > policy.max_errors:
                trip, tripped_at = Trip("errors", errors, policy.max_errors), at
                break
            continue
        write = run.writes[i] if i < len(run.writes) else run.tripping_write
        assert write is not None
        service = write.service
        # Writes are met in time order, so `accepted_at` is sorted: those after `at - window` are its tail.
        recent = len(accepted_at) - bisect.bisect_right(accepted_at, at - window)
        trip = _check(policy, len(accepted), errors, recent, services, service)
        if trip is not None:
            tripped_at = at
            break
        if i >= len(run.writes):
            continue  # the recorded refusal, admitted under this policy: nothing recorded follows it
        accepted.append(i)
        admitted.add(i)
        accepted_at.append(at)
        services.add(service)

    escaped: list[str] = []
    operations: list[str] = []
    held: list[str] = []
    for i in accepted:
        write, left = run.writes[i], leaves[i]
        out = left is not None and (tripped_at is None or left < tripped_at)
        if out:
            escaped.append(write.command_id)
            operations.append(write.operation)
        else:
            held.append(write.command_id)
    return Outcome(
        trip=trip,
        tripped_at=tripped_at,
        write_index=len(accepted) + 1 if trip is not None else None,
        escaped=tuple(escaped),
        held=tuple(held),
        escaped_operations=tuple(operations),
    )


def _check(
    policy: EffectivePolicy, writes: int, errors: int, recent: int, services: set[str], service: str
) -> Trip | None:
    """`breaker.check_write` for a CLOSED breaker, on the replay's counters."""
    if errors > policy.max_errors:
        return Trip("errors", errors, policy.max_errors)
    if writes + 1 > policy.max_writes:
        return Trip("writes", writes + 1, policy.max_writes)
    if recent + 1 > policy.max_velocity:
        return Trip("velocity", recent + 1, policy.max_velocity)
    if service not in services and len(services) + 1 > policy.max_services:
        return Trip("services", len(services) + 1, policy.max_services)
    return None


def escaped_by_operation(outcome: Outcome) -> dict[str, int]:
    counts: dict[str, int] = {}
    for operation in outcome.escaped_operations:
        counts[operation] = counts.get(operation, 0) + 1
    return counts


def first_escaped_index(run: RecordedRun, outcome: Outcome) -> int | None:
    """The 1-based write index of the run's first escaped write under `outcome`."""
    escaped = set(outcome.escaped)
    for i, write in enumerate(run.writes):
        if write.command_id in escaped:
            return i + 1
    return None
