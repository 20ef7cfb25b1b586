"""Backtesting a policy: the recorded runs since a moment replayed under a candidate layer.

`load_history` reads the runs, their commands and their trips from the gateway's database into
`replay.RecordedRun`s; `backtest` replays each under the policy that governed it (what happened) and
under the policy as it would be with the candidate layer (what would have happened), and counts what an
operator weighs: incident runs caught, and caught earlier, escaped writes before and after, and good
runs (finished, never tripped, never reverted) that the candidate would have stopped wrongly.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from kinshasa.gateway import store
from kinshasa.gateway.errors import Invalid
from kinshasa.gateway.policy import (
    EffectivePolicy,
    Layer,
    PolicyDocument,
    PolicyScope,
    PolicyVersion,
    resolve,
)
from kinshasa.gateway.policy import history as policy_history
from kinshasa.gateway.replay import Outcome, RecordedRun, RecordedWrite, RefusedWrite, replay
from kinshasa.gateway.runs import RunRecord
from kinshasa.gateway.store import commands, incidents, runs

T = TypeVar("T")

_CHUNK = 500
# What one replay may hold in memory: every run and command it replays is loaded at once. A `since` far in
# the past over a busy gateway would otherwise read the whole history into the gateway's process. About
# 0.5 KB a recorded write, so the command bound keeps a backtest under ~200 MB.
MAX_RUNS = 20_000
MAX_COMMANDS = 400_000


class TooMuchHistory(Invalid):
    """More recorded runs or commands than one replay may load."""


@dataclass(frozen=True)
class HistoricRun:
    """A recorded run and what it was: an incident run (it tripped or was reverted), a good run, or
    neither (still running)."""

    record: RunRecord
    recorded: RecordedRun
    # The breaker's own trip (not an operator's), if any: what the live gateway decided.
    tripped: bool

    @property
    def incident(self) -> bool:
        return self.tripped or self.record.revert_requested_at is not None

    @property
    def good(self) -> bool:
        r = self.record
        return r.status == store.FINISHED and r.trip_count == 0 and r.revert_requested_at is None


@dataclass(frozen=True)
class PolicyHistory:
    """Every policy version, so a run can be replayed under the policy that governed it."""

    versions: tuple[PolicyVersion, ...]

    def layers_at(self, version: int | None) -> dict[tuple[PolicyScope, str], Layer]:
        found: dict[tuple[PolicyScope, str], Layer] = {}
        for pv in self.versions:
            if version is None or pv.version <= version:
                found[(pv.scope, pv.subject)] = pv.layer
        return found

    @property
    def latest(self) -> int:
        return max((pv.version for pv in self.versions), default=0)


def effective(
    layers: Mapping[tuple[PolicyScope, str], Layer], agent_id: str, entry_point: str, version: int
) -> EffectivePolicy:
    """What `PolicyBook.effective` resolves, from a given set of layers."""
    keys = ((PolicyScope.DEFAULT, ""), (PolicyScope.AGENT, agent_id), (PolicyScope.ENTRY_POINT, entry_point))
    return resolve([layers[k] for k in keys if k in layers], version)


@dataclass
class Candidate:
    """The policy as it would be with one layer replaced."""

    history: PolicyHistory
    scope: PolicyScope
    subject: str
    document: PolicyDocument
    loosen: bool = False
    _cache: dict[tuple[str, str], EffectivePolicy] = field(default_factory=dict, repr=False)

    def policy_for(self, agent_id: str, entry_point: str) -> EffectivePolicy:
        key = (agent_id, entry_point)
        if key not in self._cache:
            layers = self.history.layers_at(None)
            replaces = self.loosen or self.scope is PolicyScope.DEFAULT
            layers[(self.scope, self.subject if self.scope is not PolicyScope.DEFAULT else "")] = Layer(
                self.document, replaces=replaces
            )
            self._cache[key] = effective(layers, agent_id, entry_point, self.history.latest + 1)
        return self._cache[key]


@dataclass
class Governing:
    """The policy that governed each run (its recorded `policyVersion`; the latest for one without)."""

    history: PolicyHistory
    _cache: dict[tuple[int, str, str], EffectivePolicy] = field(default_factory=dict, repr=False)

    def policy_for(self, run: RecordedRun) -> EffectivePolicy:
        version = run.policy_version if run.policy_version is not None else self.history.latest
        key = (version, run.agent_id, run.entry_point)
        if key not in self._cache:
            layers = self.history.layers_at(version)
            self._cache[key] = effective(layers, run.agent_id, run.entry_point, version)
        return self._cache[key]


@dataclass(frozen=True)
class Backtest:
    runs_replayed: int
    incident_runs_replayed: int
    incident_runs_caught: int
    incident_runs_caught_earlier: int
    escaped_writes_before: int
    escaped_writes_after: int
    good_runs_replayed: int
    good_runs_tripped: int

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, raw: Mapping[str, int]) -> Backtest:
        return cls(**{k: int(raw[k]) for k in cls.__dataclass_fields__})


async def load_history(
    conn: AsyncConnection,
    declared: Mapping[str, float | None],
    since: datetime,
    *,
    agent_id: str | None = None,
    entry_point: str | None = None,
    run_ids: Sequence[str] | None = None,
    newest_only: bool = False,
) -> list[HistoricRun]:
    """The runs started since `since` (of one agent or entry point, or named), as replay records them.

    Bounded: at most MAX_RUNS runs and MAX_COMMANDS commands are loaded. Beyond that it raises
    TooMuchHistory (VALIDATION: narrow `since` or the layer), or with `newest_only` keeps the newest runs
    that fit (a proposal learns from the recent past). Memory stays bounded either way: the runs are read
    newest first with a limit, and the commands chunk by chunk until the bound.
    """
    query = select(runs).where(runs.c.started_at >= since)
    if agent_id is not None:
        query = query.where(runs.c.agent_id == agent_id)
    if entry_point is not None:
        query = query.where(runs.c.entry_point == entry_point)
    if run_ids is not None:
        query = query.where(runs.c.run_id.in_(list(run_ids)))
    newest_first = query.order_by(runs.c.started_at.desc(), runs.c.run_id.desc()).limit(MAX_RUNS + 1)
    records = [RunRecord.from_row(r) for r in await conn.execute(newest_first)]
    if len(records) > MAX_RUNS:
        if not newest_only:
            raise _too_much(since, f"more than {MAX_RUNS} runs")
        records = records[:MAX_RUNS]
    loaded = 0
    found: list[HistoricRun] = []
    for start in range(0, len(records), _CHUNK):
        chunk = records[start : start + _CHUNK]
        ids = [r.run_id for r in chunk]
        writes: dict[str, list[RecordedWrite]] = {i: [] for i in ids}
        rows = await conn.execute(
            select(
                commands.c.run_id, commands.c.command_id, commands.c.command_type, commands.c.service,
                commands.c.accepted_at, commands.c.egress, commands.c.release_at, commands.c.published_at,
                commands.c.rejected_at, commands.c.status, commands.c.decided_by,
            )
            .where(commands.c.run_id.in_(ids))
            .order_by(commands.c.accepted_at, commands.c.command_id)
            # One more than fits, so going over is seen without reading all of it.
            .limit(MAX_COMMANDS - loaded + 1)
        )
        chunk_rows = rows.mappings().all()
        if loaded + len(chunk_rows) > MAX_COMMANDS:
            if not newest_only:
                raise _too_much(since, f"more than {MAX_COMMANDS} recorded writes")
            break  # the older runs do not fit: the newest ones already loaded are the history
        loaded += len(chunk_rows)
        for row in chunk_rows:
            writes[row["run_id"]].append(
                RecordedWrite(
                    command_id=row["command_id"],
                    operation=row["command_type"],
                    service=row["service"],
                    accepted_at=row["accepted_at"],
                    egress=bool(row["egress"]),
                    declared_window_s=declared.get(row["command_type"]),
                    release_at=row["release_at"],
                    published_at=row["published_at"],
                    rejected_at=row["rejected_at"],
                    # Held commands carry a release time; a command that waited for approval has none
                    # and was not published at its acceptance.
                    awaited_approval=row["release_at"] is None
                    and (row["published_at"] is None or row["published_at"] > row["accepted_at"]),
                )
            )
        trips: dict[str, dict[str, object]] = {}
        for row in (
            await conn.execute(
                select(incidents.c.run_id, incidents.c.threshold, incidents.c.detail)
                .where(incidents.c.run_id.in_(ids), incidents.c.kind == "TRIP")
                .order_by(incidents.c.opened_at)
            )
        ).mappings():
            trips.setdefault(row["run_id"], {"threshold": row["threshold"], **json.loads(row["detail"])})
        for record in chunk:
            first = trips.get(record.run_id)
            refused = first.get("refused") if first else None
            tripping = (
                RefusedWrite(
                    str(refused["operation"]), str(refused["service"]), datetime.fromisoformat(refused["at"])
                )
                if isinstance(refused, dict)
                else None
            )
            recorded = RecordedRun(
                run_id=record.run_id,
                agent_id=record.agent_id,
                entry_point=record.entry_point,
                writes=tuple(writes[record.run_id]),
                tripping_write=tripping,
                closed_at=_closed_at(record),
                policy_version=record.policy_version,
            )
            breaker_trip = first is not None and first.get("threshold") not in ("operator", "probe")
            found.append(HistoricRun(record, recorded, breaker_trip))
    # Replayed oldest first, as they happened.
    found.sort(key=lambda h: (h.record.started_at, h.record.run_id))
    return found


def _too_much(since: datetime, what: str) -> TooMuchHistory:
    return TooMuchHistory(
        f"{what} were recorded since {since.isoformat()}: a backtest replays at most {MAX_RUNS} runs and "
        f"{MAX_COMMANDS} writes; pass a later `since`, or a narrower layer (scope AGENT or ENTRY_POINT)",
        [("since", "too much history to replay at once")],
    )


def _closed_at(record: RunRecord) -> datetime | None:
    stamps = [t for t in (record.tripped_at, record.revert_requested_at) if t is not None]
    return min(stamps) if stamps else None


def rate_bound(good_runs: int, share: float = 0.01) -> int:
    """How many good runs a proposal may trip: at most `share` of those replayed."""
    return int(good_runs * share + 1e-9)


@dataclass(frozen=True)
class RunComparison:
    run: HistoricRun
    before: Outcome
    after: Outcome


def compare(
    history: Sequence[HistoricRun], governing: Governing, candidate: Candidate
) -> list[RunComparison]:
    """Each run replayed under the policy that governed it and under the candidate."""
    out: list[RunComparison] = []
    for h in history:
        before = replay(h.recorded, governing.policy_for(h.recorded))
        after = replay(h.recorded, candidate.policy_for(h.record.agent_id, h.record.entry_point))
        out.append(RunComparison(h, before, after))
    return out


def summarise(comparisons: Sequence[RunComparison]) -> Backtest:
    incident = [c for c in comparisons if c.run.incident]
    good = [c for c in comparisons if c.run.good]
    return Backtest(
        runs_replayed=len(comparisons),
        incident_runs_replayed=len(incident),
        incident_runs_caught=sum(1 for c in incident if c.after.tripped),
        incident_runs_caught_earlier=sum(1 for c in incident if _earlier(c.before, c.after)),
        escaped_writes_before=sum(len(c.before.escaped) for c in incident),
        escaped_writes_after=sum(len(c.after.escaped) for c in incident),
        good_runs_replayed=len(good),
        good_runs_tripped=sum(1 for c in good if c.after.tripped),
    )


def _earlier(before: Outcome, after: Outcome) -> bool:
    if after.write_index is None:
        return False
    if before.write_index is None:
        return True
    return after.write_index < before.write_index or (
        after.write_index == before.write_index and len(after.escaped) < len(before.escaped)
    )


async def backtest_policy(
    conn: AsyncConnection,
    declared: Mapping[str, float | None],
    scope: PolicyScope,
    subject: str,
    document: PolicyDocument,
    since: datetime,
    loosen: bool = False,
) -> Backtest:
    """`backtestPolicy`: the runs a layer of this scope applies to, since `since`, replayed."""
    versions = await load_policy_history(conn)
    history = await load_history(
        conn,
        declared,
        since,
        agent_id=subject if scope is PolicyScope.AGENT else None,
        entry_point=subject if scope is PolicyScope.ENTRY_POINT else None,
    )
    candidate = Candidate(versions, scope, subject, document, loosen)
    return await off_the_loop(lambda: summarise(compare(history, Governing(versions), candidate)))


async def off_the_loop(work: Callable[[], T]) -> T:
    """Run a replay (pure CPU: seconds for a large history) in a worker thread.

    On the event loop it would stall every agent write of this gateway process for as long as it runs;
    in a thread the loop keeps its turns (the GIL is handed over every few milliseconds).
    """
    return await asyncio.to_thread(work)


async def load_policy_history(conn: AsyncConnection) -> PolicyHistory:
    versions = await policy_history(conn, limit=1_000_000)
    return PolicyHistory(tuple(sorted(versions, key=lambda pv: pv.version)))


def default_since(now: datetime, days: float = 7) -> datetime:
    return now - timedelta(days=days)
