"""Agent budgets across runs: how many runs an agent has going, how many it starts and writes per hour.

The breaker bounds one run, so an agent that starts a new run for every write never meets it. These
bound the agent over all its runs. They come from the DEFAULT and AGENT policy layers
(`maxConcurrentRuns`, `maxRunsPerHour`, `maxAgentWritesPerHour`; a budget no layer sets is unlimited)
and each is checked and counted in the transaction that starts the run or admits the write, the one that
holds the run's breaker row, while it holds the agent's row in gw_agent_budgets (PostgreSQL FOR UPDATE;
SQLite's BEGIN IMMEDIATE holds the whole database). Two gateway replicas therefore never admit one run
or one write past a budget.

What counts:
- maxConcurrentRuns: the agent's runs in status RUNNING (a tripped, finished or reverted run is not
  running; an operator who closes a tripped run's breaker may take the agent over its budget).
- maxRunsPerHour: runs the agent started in the last hour (a sliding window over gw_runs.started_at).
- maxAgentWritesPerHour: writes admitted to any of the agent's runs, counted per minute; a write counts
  for between 60 and 61 minutes (its minute and the sixty after it), never less than an hour.
A refused request counts for nothing.

A breach is one agent over one budget for one window: the first refusal raises an `agent_budget` alert
and opens it, and every further refusal on that budget in the WINDOW_S after that alert (an hour, for all
three budgets) belongs to the same breach and raises none. An agent hammering past its budget for three
hours raises three alerts, not one per refusal; the alert is raised under the agent's row lock, so two
replicas refusing at once still raise one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from kinshasa.gateway import store
from kinshasa.gateway.alerts import Alert, budget_alert, record_alert
from kinshasa.gateway.errors import AgentBudgetExceeded
from kinshasa.gateway.incidents import IncidentKind, open_incident
from kinshasa.gateway.policy import EffectivePolicy
from kinshasa.gateway.store import agent_budgets, agent_writes, runs
from kinshasa.gateway.uow import Tx

WINDOW_S = 3600.0
_MINUTE_S = 60
# A write in minute m counts while the current minute is at most m + 60.
_WINDOW_MINUTES = 60


class Budget(StrEnum):
    """The budgets, named as the policy fields that set them (and as `extensions.budget` says)."""

    CONCURRENT_RUNS = "maxConcurrentRuns"
    RUNS_PER_HOUR = "maxRunsPerHour"
    WRITES_PER_HOUR = "maxAgentWritesPerHour"


_ALERTED_AT = {
    Budget.CONCURRENT_RUNS: "concurrent_alerted_at",
    Budget.RUNS_PER_HOUR: "runs_alerted_at",
    Budget.WRITES_PER_HOUR: "writes_alerted_at",
}


@dataclass(frozen=True)
class Overrun:
    """One refused request: which budget, its limit, what the agent has used, and when it may go on."""

    agent_id: str
    budget: Budget
    limit: int
    count: int
    retry_after_s: int | None

    def refusal(self) -> AgentBudgetExceeded:
        if self.budget is Budget.CONCURRENT_RUNS:
            used = f"has {self.count} runs RUNNING"
            next_step = "finish one with finishRun before starting another"
        elif self.budget is Budget.RUNS_PER_HOUR:
            used = f"started {self.count} runs in the last hour"
            next_step = f"retry in {self.retry_after_s} s"
        else:
            used = f"made {self.count} writes in the last hour over all its runs"
            next_step = f"retry in {self.retry_after_s} s"
        return AgentBudgetExceeded(
            f"agent {self.agent_id} {used}, and its limit ({self.budget.value}) is {self.limit}: "
            f"{next_step}, or ask an operator to raise the budget",
            budget=self.budget.value,
            limit=self.limit,
            count=self.count,
            retryAfterS=self.retry_after_s,
        )


def over(count: int, limit: int | None) -> bool:
    """Would one more take `count` past `limit`? No limit is never over."""
    return limit is not None and count + 1 > limit


def opens_breach(last_alert: datetime | None, now: datetime) -> bool:
    """Does a refusal at `now` begin a new breach (and raise an alert)? See the module docstring."""
    return last_alert is None or (now - last_alert).total_seconds() >= WINDOW_S


def _seconds(delta: float) -> int:
    return max(1, math.ceil(delta))


def minute_of(now: datetime) -> int:
    return int(now.timestamp() // _MINUTE_S)


def writes_retry_after(per_minute: list[tuple[int, int]], limit: int, now: datetime) -> int:
    """Seconds until one more write fits: the oldest minutes age out first. Pure.

    `per_minute` is (minute, writes) of the counted window, in any order.
    """
    left = sum(n for _m, n in per_minute)
    for minute, n in sorted(per_minute):
        left -= n
        if left + 1 <= limit:
            return _seconds((minute + _WINDOW_MINUTES + 1) * _MINUTE_S - now.timestamp())
    return _seconds(WINDOW_S)


@dataclass
class AgentRow:
    """An agent's budget row, locked for the transaction: when each budget last alerted."""

    agent_id: str
    alerted_at: dict[Budget, datetime | None] = field(default_factory=dict)


async def lock_agents(conn: AsyncConnection, agent_ids: set[str]) -> dict[str, AgentRow]:
    """Lock the agents' budget rows (in agent-id order, after any run rows), creating missing ones."""
    wanted = sorted(agent_ids)
    rows = await _select_locked(conn, wanted)
    missing = [a for a in wanted if a not in rows]
    if missing:
        # First budgeted request of these agents: create their rows (a replica doing the same at once
        # is absorbed), then lock them.
        maker = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
        await conn.execute(
            maker(agent_budgets).on_conflict_do_nothing(index_elements=["agent_id"]),
            [{"agent_id": a} for a in missing],
        )
        rows.update(await _select_locked(conn, missing))
    return rows


async def _select_locked(conn: AsyncConnection, agent_ids: list[str]) -> dict[str, AgentRow]:
    query = (
        select(agent_budgets)
        .where(agent_budgets.c.agent_id.in_(agent_ids))
        .order_by(agent_budgets.c.agent_id)
        .with_for_update()
    )
    found: dict[str, AgentRow] = {}
    for row in (await conn.execute(query)).mappings():
        found[row["agent_id"]] = AgentRow(
            agent_id=row["agent_id"], alerted_at={b: row[column] for b, column in _ALERTED_AT.items()}
        )
    return found


async def note_breach(
    tx: Tx,
    row: AgentRow,
    overrun: Overrun,
    now: datetime,
    entry_point: str,
    run_id: str,
    webhook: bool,
    policy_version: int | None = None,
) -> Alert | None:
    """Raise the `agent_budget` alert and its AGENT_BUDGET incident if this refusal opens a breach; the
    caller holds the row's lock."""
    if not opens_breach(row.alerted_at.get(overrun.budget), now):
        return None
    await tx.conn.execute(
        update(agent_budgets)
        .where(agent_budgets.c.agent_id == row.agent_id)
        .values({_ALERTED_AT[overrun.budget]: now})
    )
    row.alerted_at[overrun.budget] = now
    alert = budget_alert(
        overrun.agent_id,
        overrun.budget.value,
        overrun.limit,
        overrun.count,
        overrun.retry_after_s,
        WINDOW_S,
        entry_point,
        run_id,
    )
    await record_alert(tx, alert, webhook)
    await open_incident(
        tx.conn,
        IncidentKind.AGENT_BUDGET,
        now,
        run_id=run_id or None,
        agent_id=overrun.agent_id,
        entry_point=entry_point,
        policy_version=policy_version,
        threshold=overrun.budget.value,
        count=overrun.count,
        limit=overrun.limit,
        detail={"retry_after_s": overrun.retry_after_s, "summary": alert.summary},
    )
    return alert


async def check_start(
    tx: Tx, agent_id: str, entry_point: str, policy: EffectivePolicy, now: datetime, webhook: bool
) -> tuple[Overrun | None, Alert | None]:
    """May the agent start one more run? Locks its budget row (held until the run row commits)."""
    if not policy.has_run_budget:
        return None, None
    conn = tx.conn
    row = (await lock_agents(conn, {agent_id}))[agent_id]
    overrun: Overrun | None = None
    if policy.max_concurrent_runs is not None:
        running = await _count(conn, runs.c.agent_id == agent_id, runs.c.status == store.RUNNING)
        if over(running, policy.max_concurrent_runs):
            overrun = Overrun(agent_id, Budget.CONCURRENT_RUNS, policy.max_concurrent_runs, running, None)
    if overrun is None and policy.max_runs_per_hour is not None:
        since = now - timedelta(seconds=WINDOW_S)
        started = await _count(conn, runs.c.agent_id == agent_id, runs.c.started_at > since)
        limit = policy.max_runs_per_hour
        if over(started, limit):
            # The run whose leaving the window makes room for one more: the (started - limit + 1)-th oldest.
            oldest = (
                await conn.execute(
                    select(runs.c.started_at)
                    .where(runs.c.agent_id == agent_id, runs.c.started_at > since)
                    .order_by(runs.c.started_at)
                    .offset(started - limit)
                    .limit(1)
                )
            ).scalar_one()
            retry = _seconds((oldest - since).total_seconds())
            overrun = Overrun(agent_id, Budget.RUNS_PER_HOUR, limit, started, retry)
    if overrun is None:
        return None, None
    return overrun, await note_breach(tx, row, overrun, now, entry_point, "", webhook, policy.version)


async def _count(conn: AsyncConnection, *where: Any) -> int:
    return int((await conn.execute(select(func.count()).select_from(runs).where(*where))).scalar_one())


class WriteBudgets:
    """maxAgentWritesPerHour for the agents of one group-commit batch: their rows locked, their writes in
    the window summed once, each admitted write counted in memory and written back at the flush."""

    def __init__(self, limits: dict[str, int], now: datetime) -> None:
        self.limits = limits
        self.now = now
        self.rows: dict[str, AgentRow] = {}
        self.used: dict[str, int] = {}
        self._pending: dict[str, int] = {}

    @classmethod
    async def load(cls, conn: AsyncConnection, limits: dict[str, int], now: datetime) -> WriteBudgets:
        budgets = cls(limits, now)
        if not limits:
            return budgets
        budgets.rows = await lock_agents(conn, set(limits))
        since = minute_of(now) - _WINDOW_MINUTES
        sums = await conn.execute(
            select(agent_writes.c.agent_id, func.sum(agent_writes.c.writes))
            .where(agent_writes.c.agent_id.in_(sorted(limits)), agent_writes.c.minute >= since)
            .group_by(agent_writes.c.agent_id)
        )
        found = {agent: int(total or 0) for agent, total in sums}
        budgets.used = {agent: found.get(agent, 0) for agent in limits}
        return budgets

    async def check(self, conn: AsyncConnection, agent_id: str) -> Overrun | None:
        """The overrun if one more write of the agent would exceed its budget; None if it fits."""
        limit = self.limits.get(agent_id)
        if limit is None or not over(self.used[agent_id], limit):
            return None
        since = minute_of(self.now) - _WINDOW_MINUTES
        rows = await conn.execute(
            select(agent_writes.c.minute, agent_writes.c.writes).where(
                agent_writes.c.agent_id == agent_id, agent_writes.c.minute >= since
            )
        )
        per_minute = [(int(m), int(n)) for m, n in rows]
        pending = self._pending.get(agent_id, 0)
        if pending:
            per_minute.append((minute_of(self.now), pending))
        retry = writes_retry_after(per_minute, limit, self.now)
        return Overrun(agent_id, Budget.WRITES_PER_HOUR, limit, self.used[agent_id], retry)

    def count(self, agent_id: str) -> None:
        if agent_id in self.limits:
            self.used[agent_id] += 1
            self._pending[agent_id] = self._pending.get(agent_id, 0) + 1

    async def flush(self, conn: AsyncConnection) -> None:
        """Add the admitted writes to this minute's row per agent; the rows are still locked."""
        minute = minute_of(self.now)
        for agent_id, n in sorted(self._pending.items()):
            bumped = await conn.execute(
                update(agent_writes)
                .where(agent_writes.c.agent_id == agent_id, agent_writes.c.minute == minute)
                .values(writes=agent_writes.c.writes + n)
            )
            if bumped.rowcount == 0:
                await conn.execute(insert(agent_writes).values(agent_id=agent_id, minute=minute, writes=n))
                # A new minute: the agent's minutes that no longer count go (at most once a minute).
                await conn.execute(
                    agent_writes.delete().where(
                        agent_writes.c.agent_id == agent_id, agent_writes.c.minute < minute - _WINDOW_MINUTES
                    )
                )
        self._pending = {}
