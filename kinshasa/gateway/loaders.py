"""One GraphQL request's reads, batched per backend and bounded in number and in time (DataLoaders).

A query that lists runs resolves each run's fields separately; asked naively that is one call to the
coordinator and a few database queries per run (the issue's query made 4,000 calls and 8,000 queries).
Here each kind of read is a DataLoader: the loads that resolvers issue in the same loop turn become one
batch, and the same key is loaded once per request. A batch of steps is one `POST /steps` to the
coordinator; a batch of commands, of counts or of breaker velocities is one query. Services' read APIs
have no batch call, so a batch of entity reads is concurrent calls, `concurrency` at a time.

Every call to another component, and every wait for its turn, ends by the request's deadline
(`deadline_s` from the request's start) or answers BACKEND_UNAVAILABLE naming the backend. Database
reads take read-only connections (`DatabaseReads`), `concurrency` at a time per request. And what a batch
sets off is paced (`Pacer`): resolving it at once would hold the event loop for the whole of it.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from strawberry.dataloader import DataLoader

from kinshasa.gateway.commands import Receipt
from kinshasa.gateway.errors import BackendUnavailable
from kinshasa.gateway.policy import LATEST_VERSION, EffectivePolicy, PolicyBook
from kinshasa.gateway.reads import Backends, RevertProgress, StepsPage
from kinshasa.gateway.runs import velocities
from kinshasa.gateway.store import commands
from kinshasa.kernel.database import READ_ONLY
from kinshasa.schemas.envelope import utcnow

T = TypeVar("T")
K = TypeVar("K", bound=tuple[str, ...])
# (service, entity type, id) and (service, entity type, list field, value).
EntityKey = tuple[str, str, str]
ListKey = tuple[str, str, str, str]
# (run id, status or None, limit) of a run's commands; (run id, agent, entry point) of its breaker.
CommandsKey = tuple[str, str | None, int]
BreakerKey = tuple[str, str, str]
# What a receipt shows: not the stored envelope, the bulk of a command row.
RECEIPT_COLUMNS = [commands.c[name] for name in (
    "command_id", "run_id", "command_type", "graphql_name", "entity_id", "status", "release_at",
    "accepted_at", "result", "reason", "applied_at", "compensated_at",
)]
# Runs per call to the coordinator's `POST /steps` (its own cap is the same), and per IN (...) list.
STEPS_BATCH = 200
RUNS_BATCH = 500


class DatabaseReads:
    """Read-only connections to the gateway's own database, at most `limit` at once in this process.

    Read resolvers take these rather than `engine.connect()`: on SQLite every other transaction begins
    IMMEDIATE (the write lock), so reads would queue every agent's write behind them; and `limit` below
    the pool's size keeps connections free for the writes however many reads are waiting.
    """

    def __init__(self, engine: AsyncEngine, limit: int) -> None:
        self.engine = engine
        self._gate = asyncio.Semaphore(limit)

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        async with self._gate, self.engine.connect() as conn:
            await conn.execution_options(**{READ_ONLY: True})
            yield conn


class Pacer:
    """Cuts the work that loaded batches set off into slices of `slice_s` per pass of the event loop.

    When a batch of 200 runs' commands arrives, its 200 waiting resolvers become ready at once, and
    asyncio runs every ready callback before it looks at the sockets again: completing 200 lists in one
    go (and, through the DataLoader's cache, those of every alias asking the same keys) held the loop for
    up to ~100 ms in bench_isolation, and every other request's next step (a write's BEGIN on SQLite's
    thread) waited that long. Resolvers call `pace` after a load. Within the open slice they go
    on; past it they queue, and are let go one at a time, each after the previous one's work, until the
    slice is spent; the next slice opens on the loop's next pass, after the sockets' callbacks. Shared by
    the gateway's requests, so all paced work together gets one slice per pass; nothing waiting costs
    anything per pass.
    """

    def __init__(self, slice_s: float = 0.002) -> None:
        self.slice_s = slice_s
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._slice_end = 0.0
        self._letting_go = False

    async def pace(self) -> None:
        if not self._waiting and time.perf_counter() < self._slice_end:
            return
        # Past the slice (or behind others waiting): a slice opens only on a later pass of the loop.
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        self._waiting.append(turn)
        if not self._letting_go:
            self._letting_go = True
            loop.call_soon(self._open)
        await turn

    def _open(self) -> None:
        self._slice_end = time.perf_counter() + self.slice_s
        self._let_next_go()

    def _let_next_go(self) -> None:
        """Wake the next waiter; called again after its work (call_soon runs after the task's step)."""
        while self._waiting and self._waiting[0].done():
            self._waiting.popleft()  # cancelled while waiting
        loop = asyncio.get_running_loop()
        if not self._waiting:
            self._letting_go = False
        elif time.perf_counter() >= self._slice_end:
            loop.call_soon(self._open)  # the next pass, after the callbacks its poll brings
        else:
            self._waiting.popleft().set_result(None)
            loop.call_soon(self._let_next_go)


class RequestReads:
    """Built per request (by the context, on first use); see the module docstring."""

    def __init__(
        self,
        backends: Backends,
        database: DatabaseReads,
        policies: PolicyBook,
        deadline_s: float,
        concurrency: int,
        call_timeout_s: float,
        started: float | None = None,
        pacer: Pacer | None = None,
    ) -> None:
        self._backends = backends
        self._database = database
        self._pacer = pacer or Pacer()
        self._policies = policies
        self._deadline_s = deadline_s
        self._deadline = (started if started is not None else time.monotonic()) + deadline_s
        self._concurrency = concurrency
        self._call_timeout_s = call_timeout_s
        self._gates: dict[str, asyncio.Semaphore] = {}
        # A request's own share of the database reads: one query cannot take every connection.
        self._db_gate = asyncio.Semaphore(concurrency)
        self._steps: DataLoader[tuple[str, int, int | None], StepsPage] = DataLoader(
            self._load_steps, max_batch_size=STEPS_BATCH
        )
        self._progress: DataLoader[str, RevertProgress] = DataLoader(
            self._load_progress, max_batch_size=STEPS_BATCH
        )
        self._entities: DataLoader[EntityKey, dict[str, Any] | None] = DataLoader(self._load_entities)
        self._versions: DataLoader[EntityKey, list[dict[str, Any]]] = DataLoader(self._load_versions)
        self._lists: DataLoader[ListKey, list[dict[str, Any]]] = DataLoader(self._load_lists)
        self._counts: DataLoader[str, dict[str, int]] = DataLoader(
            self._load_counts, max_batch_size=RUNS_BATCH
        )
        self._commands: DataLoader[CommandsKey, list[Receipt]] = DataLoader(
            self._load_commands, max_batch_size=RUNS_BATCH
        )
        self._breakers: DataLoader[BreakerKey, tuple[EffectivePolicy, int]] = DataLoader(
            self._load_breakers, max_batch_size=RUNS_BATCH
        )

    # --- the gateway's own database ----------------------------------------------------------------------

    @asynccontextmanager
    async def database(self) -> AsyncIterator[AsyncConnection]:
        """A read-only connection to the gateway's database, within this request's share."""
        async with self._db_gate, self._database.connect() as conn:
            yield conn

    async def command_counts(self, run_id: str) -> dict[str, int]:
        """The run's commands by status (as `runs.command_counts`)."""
        return await self._paced(self._counts.load(run_id))

    async def commands(self, run_id: str, status: str | None, limit: int) -> list[Receipt]:
        """The run's first `limit` commands in acceptance order (as `commands.list_commands`)."""
        return await self._paced(self._commands.load((run_id, status, limit)))

    async def breaker(self, run_id: str, agent_id: str, entry_point: str) -> tuple[EffectivePolicy, int]:
        """The policy that applies to the run and its writes inside the policy's velocity window."""
        return await self._paced(self._breakers.load((run_id, agent_id, entry_point)))

    async def _paced(self, loading: Awaitable[T]) -> T:
        result = await loading
        await self._pacer.pace()
        return result

    async def _load_counts(self, run_ids: list[str]) -> list[dict[str, int]]:
        found: dict[str, dict[str, int]] = {run_id: {} for run_id in run_ids}
        async with self.database() as conn:
            rows = await conn.execute(
                select(commands.c.run_id, commands.c.status, func.count())
                .where(commands.c.run_id.in_(sorted(found)))
                .group_by(commands.c.run_id, commands.c.status)
            )
        for run_id, status, count in rows:
            found[run_id][status] = int(count)
        return [found[run_id] for run_id in run_ids]

    async def _load_commands(self, keys: list[CommandsKey]) -> list[list[Receipt]]:
        # One query per (status, limit) asked, usually one: each run's first `limit` by a window function.
        groups: dict[tuple[str | None, int], set[str]] = defaultdict(set)
        for run_id, status, limit in keys:
            groups[(status, limit)].add(run_id)
        found: dict[CommandsKey, list[Receipt]] = defaultdict(list)
        async with self.database() as conn:
            for (status, limit), run_ids in groups.items():
                order = (commands.c.accepted_at, commands.c.command_id)
                rank = func.row_number().over(partition_by=commands.c.run_id, order_by=order).label("rank")
                ranked = select(*RECEIPT_COLUMNS, rank).where(commands.c.run_id.in_(sorted(run_ids)))
                if status is not None:
                    ranked = ranked.where(commands.c.status == status)
                page = ranked.subquery()
                rows = await conn.execute(
                    select(page).where(page.c.rank <= limit).order_by(page.c.run_id, page.c.rank)
                )
                for row in rows.mappings():
                    found[(row["run_id"], status, limit)].append(Receipt.from_row(row))
        return [found[key] for key in keys]

    async def _load_breakers(self, keys: list[BreakerKey]) -> list[tuple[EffectivePolicy, int]]:
        async with self.database() as conn:
            latest = (await conn.execute(select(LATEST_VERSION))).scalar_one()
            policies: dict[tuple[str, str], EffectivePolicy] = {}
            for _, agent_id, entry_point in keys:
                if (agent_id, entry_point) not in policies:
                    policies[(agent_id, entry_point)] = await self._policies.effective(
                        conn, agent_id, entry_point, latest
                    )
            by_window: dict[float, list[str]] = defaultdict(list)
            for run_id, agent_id, entry_point in keys:
                by_window[policies[(agent_id, entry_point)].velocity_window_s].append(run_id)
            now = utcnow()
            counted: dict[tuple[str, float], int] = {}
            for window, run_ids in by_window.items():
                recent = await velocities(conn, run_ids, now - timedelta(seconds=window))
                counted.update({(run_id, window): recent.get(run_id, 0) for run_id in run_ids})
        answers = []
        for run_id, agent_id, entry_point in keys:
            policy = policies[(agent_id, entry_point)]
            answers.append((policy, counted[(run_id, policy.velocity_window_s)]))
        return answers

    # --- other components ----------------------------------------------------------------------------------

    async def steps(self, run_id: str, limit: int, before: int | None) -> StepsPage:
        return await self._paced(self._steps.load((run_id, limit, before)))

    async def revert_progress(self, run_id: str) -> RevertProgress:
        return await self._paced(self._progress.load(run_id))

    async def entity(self, service: str, entity_type: str, entity_id: str) -> dict[str, Any] | None:
        return await self._paced(self._entities.load((service, entity_type, entity_id)))

    async def versions(self, service: str, entity_type: str, entity_id: str) -> list[dict[str, Any]]:
        return await self._paced(self._versions.load((service, entity_type, entity_id)))

    async def listed(self, service: str, entity_type: str, field: str, value: str) -> list[dict[str, Any]]:
        return await self._paced(self._lists.load((service, entity_type, field, value)))

    async def dlq_all(self, limit: int, only: str | None = None) -> list[dict[str, Any]]:
        """Every component's DLQ (or `only` that one's); each that does not answer in time shows its
        error in its entry."""
        remaining = max(self._deadline - time.monotonic(), 0.001)
        return await self._backends.dlq_all(limit, min(self._call_timeout_s, remaining), only)

    async def _load_steps(self, keys: list[tuple[str, int, int | None]]) -> list[StepsPage]:
        return await self._bounded("coordinator", lambda t: self._backends.steps_many(keys, t))

    async def _load_progress(self, keys: list[str]) -> list[RevertProgress]:
        return await self._bounded("coordinator", lambda t: self._backends.progress_many(keys, t))

    async def _load_entities(self, keys: list[EntityKey]) -> list[dict[str, Any] | BaseException | None]:
        return await self._each(keys, lambda k, t: self._backends.entity(k[0], k[1], k[2], t))

    async def _load_versions(self, keys: list[EntityKey]) -> list[list[dict[str, Any]] | BaseException]:
        return await self._each(keys, lambda k, t: self._backends.versions(k[0], k[1], k[2], t))

    async def _load_lists(self, keys: list[ListKey]) -> list[list[dict[str, Any]] | BaseException]:
        return await self._each(keys, lambda k, t: self._backends.listed(k[0], k[1], k[2], k[3], t))

    async def _each(
        self, keys: Sequence[K], call: Callable[[K, float], Awaitable[T]]
    ) -> list[T | BaseException]:
        """One call per key (the key's first part names the backend); a failure is that key's only."""

        async def one(key: K) -> T:
            return await self._bounded(key[0], lambda timeout_s: call(key, timeout_s))

        return list(await asyncio.gather(*(one(k) for k in keys), return_exceptions=True))

    async def _bounded(self, backend: str, call: Callable[[float], Awaitable[T]]) -> T:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise BackendUnavailable(
                f"{backend} was not asked: this request spent its {self._deadline_s:g} s for reading other "
                "components; ask for fewer items (a smaller `first`) and retry",
                backend=backend,
            )
        gate = self._gates.setdefault(backend, asyncio.Semaphore(self._concurrency))
        try:
            async with asyncio.timeout(remaining), gate:
                return await call(min(self._call_timeout_s, max(remaining, 0.001)))
        except TimeoutError as exc:
            raise BackendUnavailable(
                f"{backend} did not answer within this request's {self._deadline_s:g} s for reading other "
                "components; ask for fewer items (a smaller `first`), retry later, and tell an operator if "
                "it persists",
                backend=backend,
            ) from exc
