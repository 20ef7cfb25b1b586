"""The command writer: agent writes checked by the breaker and stored (held or published), group-committed."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import uuid
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Integer, Text, and_, bindparam, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kinshasa.gateway import idempotency, store
from kinshasa.gateway.alerts import Alert, WebhookSender
from kinshasa.gateway.breaker import Refused, check_write, refusal, services_after, trip
from kinshasa.gateway.budgets import WriteBudgets, note_breach
from kinshasa.gateway.errors import (
    AgentBudgetExceeded,
    GatewayError,
    Invalid,
    NotFound,
    RunClosed,
    RunNotFound,
)
from kinshasa.gateway.policy import EffectivePolicy, PolicyBook
from kinshasa.gateway.principals import Principal
from kinshasa.gateway.runs import (
    RunRecord,
    check_owner,
    check_run_id,
    load_runs_for_write,
    velocities,
    velocity,
)
from kinshasa.gateway.store import commands, runs
from kinshasa.gateway.uow import GatewayTx, transaction
from kinshasa.kernel import tracing
from kinshasa.schemas.envelope import Actor, EntityRef, Envelope, utcnow
from kinshasa.schemas.operations import OperationSpec
from kinshasa.topics.catalogue import commands_topic

log = logging.getLogger(__name__)

CLOSED_STATUSES = (store.FINISHED, store.REVERTING, store.REVERTED, store.REVERT_FAILED)


@dataclass(frozen=True)
class Receipt:
    """CommandReceipt: what the agent gets back at once, before anything downstream ran."""

    command_id: str
    run_id: str
    operation: str
    mutation: str
    entity_id: str
    status: str
    release_at: datetime | None
    accepted_at: datetime | None = None
    result: str | None = None
    reason: str | None = None
    applied_at: datetime | None = None
    compensated_at: datetime | None = None

    @property
    def rejected_reason(self) -> str | None:
        """Why the service refused it; `reason` also says why an unpublished command was discarded."""
        return self.reason if self.status == store.REJECTED else None

    @classmethod
    def from_row(cls, row: Any) -> Receipt:
        return cls(
            command_id=row["command_id"],
            run_id=row["run_id"],
            operation=row["command_type"],
            mutation=row["graphql_name"],
            entity_id=row["entity_id"],
            status=row["status"],
            release_at=row["release_at"],
            accepted_at=row["accepted_at"],
            result=row["result"],
            reason=row["reason"],
            applied_at=row["applied_at"],
            compensated_at=row["compensated_at"],
        )

    def to_answer(self) -> dict[str, Any]:
        """The receipt as an idempotency key remembers it: what the agent was answered at acceptance."""
        return {
            "command_id": self.command_id,
            "run_id": self.run_id,
            "operation": self.operation,
            "mutation": self.mutation,
            "entity_id": self.entity_id,
            "status": self.status,
            "release_at": self.release_at.isoformat() if self.release_at else None,
            "accepted_at": self.accepted_at.isoformat() if self.accepted_at else None,
        }

    @classmethod
    def from_answer(cls, answer: dict[str, Any]) -> Receipt:
        def stamp(value: Any) -> datetime | None:
            return datetime.fromisoformat(value) if isinstance(value, str) else None

        return cls(
            command_id=str(answer["command_id"]),
            run_id=str(answer["run_id"]),
            operation=str(answer["operation"]),
            mutation=str(answer["mutation"]),
            entity_id=str(answer["entity_id"]),
            status=str(answer["status"]),
            release_at=stamp(answer.get("release_at")),
            accepted_at=stamp(answer.get("accepted_at")),
        )


@dataclass(eq=False)
class _Write:
    """One queued agent write: what was asked, what could be computed before the transaction, its answer."""

    principal: Principal
    spec: OperationSpec
    run_id: str
    command_id: str
    entity_id: str
    payload: dict[str, Any]
    future: asyncio.Future[Receipt]
    idempotency_key: str | None = None
    # The request's digest, when it carries a key: a retry must ask the same to get the same answer.
    request: str = ""
    # The write's span: the command envelope carries it, so the service's handling joins the agent's trace.
    traceparent: str | None = None

    @property
    def keyed(self) -> tuple[str, str] | None:
        return (self.principal.id, self.idempotency_key) if self.idempotency_key is not None else None


@dataclass
class _Batch:
    """What one group-commit transaction decided: an answer per write, alerts to send after the commit."""

    answers: list[tuple[_Write, Receipt | GatewayError]] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    command_rows: list[dict[str, Any]] = field(default_factory=list)
    run_bumps: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Idempotency keys: those already used (from the database), those this batch used, rows to insert.
    remembered: dict[tuple[str, str], idempotency.Remembered] = field(default_factory=dict)
    key_rows: list[dict[str, Any]] = field(default_factory=list)
    budgets: WriteBudgets = field(default_factory=lambda: WriteBudgets({}, utcnow()))


# Prebuilt statements: executed with a list of parameter sets (executemany), compiled once.
_INSERT_COMMANDS = insert(commands)
_BUMP_RUN = (
    update(runs)
    .where(runs.c.run_id == bindparam("b_run_id"))
    .values(
        writes=runs.c.writes + bindparam("b_writes", type_=Integer),
        published=runs.c.published + bindparam("b_published", type_=Integer),
        probes_left=runs.c.probes_left - bindparam("b_probes", type_=Integer),
        services=bindparam("b_services", type_=Text),
        policy_version=bindparam("b_policy_version", type_=Integer),
    )
)


class CommandWriter:
    """Accepts agent writes. The only I/O on this path is the gateway's database.

    Group commit: `submit` queues the write and one drain task per process takes every queued write
    and runs them one after another inside ONE transaction, each checked and counted against its run's
    breaker in arrival order, then commits once and answers each. The breaker stays exact: the run rows
    are locked (PostgreSQL FOR UPDATE, in run-id order; SQLite BEGIN IMMEDIATE) for the whole batch, the
    checks are sequential on the locked counters, and the counters written back are the sum of what was
    admitted. With several replicas on PostgreSQL the row lock serialises the batches of one run. Every
    accepted command is in exactly one transaction, and its command row, its outbox row and the count
    commit together; a write is answered only after that commit. A batch that fails as a whole (a
    database error, not a refusal) is retried one write per transaction, so one bad write fails alone.

    The same transaction checks and counts the agent's maxAgentWritesPerHour (gateway/budgets.py: the
    agents' budget rows are locked after the run rows, in agent-id order) and stores each keyed write's
    idempotency key with its receipt (gateway/idempotency.py). A keyed write whose key is already known is
    answered the first receipt before any other check, and nothing is counted or stored for it.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        policies: PolicyBook,
        webhook: WebhookSender,
        on_commit: Callable[[], None] | None = None,
        max_batch: int = 256,
        on_refusal: Callable[[str], None] | None = None,
    ) -> None:
        self._engine = engine
        # Called with the budget's name for each write refused on an agent budget, once committed.
        self._on_refusal = on_refusal
        self._policies = policies
        self._webhook = webhook
        # Called after a commit that put rows in the outbox, to wake the relay without waiting for its poll.
        self._on_commit = on_commit
        self._max_batch = max_batch
        self._queue: deque[_Write] = deque()
        self._drainer: asyncio.Task[None] | None = None

    async def submit(
        self,
        principal: Principal,
        spec: OperationSpec,
        run_id: str,
        payload: BaseModel,
        idempotency_key: str | None = None,
    ) -> Receipt:
        """Check and count the write against the run's breaker and the agent's write budget, store it,
        commit; answer once committed. With an idempotency key already used, answer what it got then."""
        attributes = {"kinshasa.run_id": run_id}
        with tracing.span(f"write {spec.command_type}", attributes=attributes) as traceparent:
            return await self._submit(principal, spec, run_id, payload, idempotency_key, traceparent)

    async def _submit(self, principal: Principal, spec: OperationSpec, run_id: str, payload: BaseModel,
                      idempotency_key: str | None, traceparent: str | None) -> Receipt:
        check_run_id(run_id)
        # Pure work is done here, before the write waits its turn, so the transaction holds locks briefly.
        dumped = payload.model_dump(mode="json")
        write = _Write(
            principal=principal,
            spec=spec,
            run_id=run_id,
            command_id=str(uuid.uuid4()),
            entity_id=spec.entity_id(payload) or str(uuid.uuid4()),
            payload=dumped,
            future=asyncio.get_running_loop().create_future(),
            idempotency_key=idempotency_key,
            traceparent=traceparent,
            request=idempotency.digest(spec.graphql_name, {"runId": run_id, "input": dumped})
            if idempotency_key is not None
            else "",
        )
        self._queue.append(write)
        if self._drainer is None or self._drainer.done():
            # A context of its own: the drainer outlives the request that started it, and what a batch
            # emits (a trip's facts, an alert) must not join that one request's trace.
            self._drainer = asyncio.create_task(self._drain(), name="gateway-command-writer",
                                                context=contextvars.Context())
        return await write.future

    async def drain(self) -> None:
        """Wait until every queued write is answered (on shutdown, before the engine is disposed)."""
        while self._drainer is not None and not self._drainer.done():
            await asyncio.wait([self._drainer])

    async def _drain(self) -> None:
        """Write batches until the queue is empty, then end (the next submit starts a new drain)."""
        batch: list[_Write] = []
        try:
            while self._queue:
                await self._gather()
                batch = []
                while self._queue and len(batch) < self._max_batch:
                    write = self._queue.popleft()
                    if not write.future.done():  # a caller that gave up (cancelled) is not written
                        batch.append(write)
                if batch:
                    await self._write(batch)
        except BaseException as exc:
            # Cancelled (shutdown) or a bug: nobody may wait forever on a write that will not happen.
            answer = exc if isinstance(exc, Exception) else None
            for write in [*batch, *self._queue]:
                _settle(write, answer)
            self._queue.clear()
            raise

    async def _gather(self) -> None:
        """Let the event loop turn a few times before a batch starts, so writes on their way join it.

        Requests already received are a few awaits away from `submit`; two turns of the loop let them
        join this batch rather than wait for the next transaction, and it waits on (up to a bound) while
        more keep arriving. With 32 clients in the benchmark this makes batches of 32 instead of two
        alternating halves of 16, and each transaction's fixed cost (its BEGIN, its commit, the relay's
        claim and mark) is shared by twice as many writes. An idle writer pays two turns of the loop.
        """
        for turn in range(_GATHER_TURNS):
            waiting = len(self._queue)
            if waiting >= self._max_batch:
                return
            await asyncio.sleep(0)
            if turn >= _GATHER_MIN_TURNS - 1 and len(self._queue) == waiting:
                return

    async def _write(self, writes: list[_Write], raced: bool = False) -> None:
        try:
            batch = await self._transact(writes)
        except asyncio.CancelledError:
            for write in writes:
                _settle(write, None)
            raise
        except Exception as exc:
            if len(writes) == 1:
                if not raced and idempotency.is_key_race(exc):
                    # Another transaction (another replica) took this key first and has committed: this
                    # time the key is found and its answer given.
                    await self._write(writes, raced=True)
                    return
                _settle(writes[0], exc)
                return
            log.warning(
                "a group commit of %d writes failed (%s: %s); retrying them one per transaction",
                len(writes),
                type(exc).__name__,
                exc,
            )
            for write in writes:
                if not write.future.done():
                    await self._write([write])
            return
        for alert in batch.alerts:
            self._webhook.send_later(alert)
        for write, answer in batch.answers:
            if isinstance(answer, AgentBudgetExceeded) and self._on_refusal is not None:
                self._on_refusal(str(answer.details.get("budget")))
            _settle(write, answer)

    async def _transact(self, writes: list[_Write]) -> _Batch:
        """One transaction for every write of the batch, checked and counted in order; committed once."""
        batch = _Batch()
        async with transaction(self._engine, self._on_commit) as tx:
            found, policy_version = await load_runs_for_write(tx.conn, [w.run_id for w in writes])
            start = utcnow()
            policies: dict[str, EffectivePolicy] = {}
            for run in found.values():
                policies[run.run_id] = await self._policies.effective(
                    tx.conn, run.agent_id, run.entry_point, policy_version
                )
            recent = await self._velocities(tx, policies, start)
            batch.remembered = await _remembered(tx.conn, writes, start)
            # Budgets come from the DEFAULT and AGENT layers: one limit per agent whatever the run.
            limits = {
                run.agent_id: limit
                for run in found.values()
                if (limit := policies[run.run_id].max_agent_writes_per_hour) is not None
            }
            batch.budgets = await WriteBudgets.load(tx.conn, limits, start)
            last = start
            for write in writes:
                # Strictly increasing accepted_at, so commands of one batch keep their order wherever
                # they are sorted by acceptance (the releaser publishes held commands in that order).
                now = utcnow()
                now = now if now > last else last + _TICK
                last = now
                try:
                    # What admitting this write emits (its command, a trip it causes) is in its trace.
                    with tracing.continued_from(write.traceparent) if write.traceparent else nullcontext():
                        receipt = await self._admit(tx, batch, write, found, policies, recent, now)
                except GatewayError as refused:
                    batch.answers.append((write, refused))
                else:
                    batch.answers.append((write, receipt))
            await self._flush(tx, batch)
            await tx.commit()
        return batch

    async def _velocities(
        self, tx: GatewayTx, policies: dict[str, EffectivePolicy], now: datetime
    ) -> dict[str, int]:
        by_window: dict[float, list[str]] = {}
        for run_id, policy in policies.items():
            by_window.setdefault(policy.velocity_window_s, []).append(run_id)
        recent: dict[str, int] = {}
        for window, run_ids in by_window.items():
            counts = await velocities(tx.conn, run_ids, now - timedelta(seconds=window))
            recent.update({run_id: counts.get(run_id, 0) for run_id in run_ids})
        return recent

    async def _admit(
        self,
        tx: GatewayTx,
        batch: _Batch,
        write: _Write,
        found: dict[str, RunRecord],
        policies: dict[str, EffectivePolicy],
        recent: dict[str, int],
        now: datetime,
    ) -> Receipt:
        """Check one write against its run as the batch has left it; stage its rows or raise the refusal."""
        run_id, spec = write.run_id, write.spec
        keyed = write.keyed
        if keyed is not None and keyed in batch.remembered:
            # A retry: the first answer, before any check (the run may have closed since, the budget
            # filled up); nothing is created or counted.
            return Receipt.from_answer(batch.remembered[keyed].replay(write.request))
        run = found.get(run_id)
        if run is None:
            raise RunNotFound(f"run {run_id!r} does not exist: start one with startRun and use its id")
        check_owner(run, write.principal)
        if run.status in CLOSED_STATUSES:
            raise RunClosed(f"run {run_id} is {run.status}: it accepts no more writes; start a new run")
        policy = policies[run_id]
        if run.breaker_state == store.CLOSED and recent[run_id] + 1 > policy.max_velocity:
            # The batch's count is taken at its start, so it may still hold writes that have slid out of
            # the window since: near the limit, count exactly at this write's own time. The breaker then
            # decides on the writes accepted in (now - window, now], as a replay of the run does.
            await self._flush(tx, batch)
            since = now - timedelta(seconds=policy.velocity_window_s)
            recent[run_id] = await velocity(tx.conn, run_id, since)
        verdict = check_write(run, policy, spec.service, recent[run_id])
        if not verdict.accept:
            if verdict.trip is None:
                raise refusal(run, recent[run_id])
            # The trip reads and moves the run's held commands: they must include this batch's.
            await self._flush(tx, batch)
            tripped, alert = await trip(
                tx,
                run,
                verdict.trip,
                policy,
                _SYSTEM,
                self._webhook.url is not None,
                at=now,
                refused=Refused(spec.command_type, spec.service),
            )
            found[run_id] = tripped
            batch.alerts.append(alert)
            raise refusal(tripped, recent[run_id])
        overrun = await batch.budgets.check(tx.conn, run.agent_id)
        if overrun is not None:
            breach = await note_breach(
                tx,
                batch.budgets.rows[run.agent_id],
                overrun,
                now,
                run.entry_point,
                run_id,
                self._webhook.url is not None,
                policy.version,
            )
            if breach is not None:
                batch.alerts.append(breach)
            raise overrun.refusal()

        envelope = Envelope(
            message_id=uuid.UUID(write.command_id),
            type=spec.command_type,
            run_id=run_id,
            actor=Actor(kind="agent", id=write.principal.id),
            correlation_id=run_id,
            entity=EntityRef(service=spec.service, type=spec.entity_type, id=write.entity_id),
            occurred_at=now,
            payload=write.payload,
            traceparent=write.traceparent,
        )
        wire = envelope.to_bytes()
        window = policy.window_for(spec.command_type, spec.window_s)
        release_at: datetime | None = None
        if spec.egress or policy.gated(spec.command_type):
            # Egress has no inverse; a gated operation has one, but the operator asked to see it first.
            status = store.AWAITING_APPROVAL
        elif window <= 0 and not run.on_hold:
            status = store.PUBLISHED
        else:
            status = store.HELD
            release_at = now + timedelta(seconds=window)
        batch.command_rows.append(
            {
                "command_id": write.command_id,
                "run_id": run_id,
                "command_type": spec.command_type,
                "graphql_name": spec.graphql_name,
                "service": spec.service,
                "entity_id": write.entity_id,
                "status": status,
                "egress": spec.egress,
                "probe": verdict.probe,
                "manual_hold": run.on_hold and status == store.HELD,
                "release_at": release_at,
                "accepted_at": now,
                "published_at": now if status == store.PUBLISHED else None,
                "envelope": wire.decode(),
            }
        )
        if status == store.PUBLISHED:
            await tx.emit_serialised(commands_topic(spec.service), envelope, wire)

        # Count it on the locked row as the batch sees it, so the next write of this run is checked on it.
        published = status == store.PUBLISHED
        services = services_after(run, spec.service)
        found[run_id] = replace(
            run,
            writes=run.writes + 1,
            services=tuple(json.loads(services)),
            probes_left=run.probes_left - 1 if verdict.probe else run.probes_left,
            published=run.published + 1 if published else run.published,
        )
        recent[run_id] += 1
        bump = batch.run_bumps.setdefault(
            run_id,
            {"b_run_id": run_id, "b_writes": 0, "b_published": 0, "b_probes": 0,
             "b_policy_version": policy.version},
        )
        bump["b_writes"] += 1
        bump["b_published"] += int(published)
        bump["b_probes"] += int(verdict.probe)
        bump["b_services"] = services
        batch.budgets.count(run.agent_id)
        receipt = Receipt(
            command_id=write.command_id,
            run_id=run_id,
            operation=spec.command_type,
            mutation=spec.graphql_name,
            entity_id=write.entity_id,
            status=status,
            release_at=release_at,
            accepted_at=now,
        )
        if keyed is not None:
            answer = receipt.to_answer()
            batch.key_rows.append(idempotency.row(keyed[0], keyed[1], write.request, answer, now))
            # A second use of the key in this same batch is a retry too.
            batch.remembered[keyed] = idempotency.Remembered(write.request, answer)
        return receipt

    @staticmethod
    async def _flush(tx: GatewayTx, batch: _Batch) -> None:
        """Write the staged command rows and run counters (one executemany each)."""
        if batch.command_rows:
            await tx.conn.execute(_INSERT_COMMANDS, batch.command_rows)
            batch.command_rows = []
        if batch.run_bumps:
            await tx.conn.execute(_BUMP_RUN, list(batch.run_bumps.values()))
            batch.run_bumps = {}
        if batch.key_rows:
            await idempotency.remember(tx.conn, batch.key_rows)
            batch.key_rows = []
        await batch.budgets.flush(tx.conn)


_SYSTEM = Actor(kind="system", id="gateway")
# Loop turns a batch waits for writes on their way: at least the first, at most the second.
_GATHER_MIN_TURNS, _GATHER_TURNS = 2, 8
# accepted_at resolution: UtcDateTime keeps microseconds on both backends.
_TICK = timedelta(microseconds=1)


async def _remembered(
    conn: AsyncConnection, writes: list[_Write], now: datetime
) -> dict[tuple[str, str], idempotency.Remembered]:
    """The live idempotency keys the batch's writes carry, by (principal, key)."""
    keys: dict[str, list[str]] = {}
    for write in writes:
        if write.idempotency_key is not None:
            keys.setdefault(write.principal.id, []).append(write.idempotency_key)
    found: dict[tuple[str, str], idempotency.Remembered] = {}
    for principal_id, wanted in keys.items():
        for key, remembered in (await idempotency.recall(conn, principal_id, wanted, now)).items():
            found[(principal_id, key)] = remembered
    return found


def _settle(write: _Write, answer: Receipt | BaseException | None) -> None:
    """Answer a queued write; None cancels it. A caller that already gave up is left alone."""
    if write.future.done():
        return
    if answer is None:
        write.future.cancel()
    elif isinstance(answer, BaseException):
        write.future.set_exception(answer)
    else:
        write.future.set_result(answer)


async def get_command(conn: AsyncConnection, command_id: str) -> Any:
    try:
        uuid.UUID(command_id)
    except ValueError:
        raise NotFound(
            f"command {command_id[:80]!r} does not exist: pass a commandId from a CommandReceipt"
        ) from None
    row = (await conn.execute(select(commands).where(commands.c.command_id == command_id))).mappings().first()
    if row is None:
        raise NotFound(f"command {command_id} does not exist: pass a commandId from a CommandReceipt")
    return row


async def list_commands(
    conn: AsyncConnection, run_id: str, status: str | None, limit: int, after: str | None = None
) -> list[Receipt]:
    """The run's commands in acceptance order; `after` (a commandId of the run) starts past that one."""
    query = select(commands).where(commands.c.run_id == run_id)
    if after is not None:
        ours = (commands.c.command_id == after, commands.c.run_id == run_id)
        mark = (await conn.execute(select(commands.c.accepted_at).where(*ours))).first()
        if mark is None:
            raise Invalid(
                "after must be the commandId of the last command of a previous page of this run's commands",
                [("after", "not a command of this run")],
            )
        query = query.where(
            or_(
                commands.c.accepted_at > mark.accepted_at,
                and_(commands.c.accepted_at == mark.accepted_at, commands.c.command_id > after),
            )
        )
    if status is not None:
        query = query.where(commands.c.status == status)
    rows = await conn.execute(query.order_by(commands.c.accepted_at, commands.c.command_id).limit(limit))
    return [Receipt.from_row(r) for r in rows.mappings()]


def stored_payload(row: Any) -> dict[str, Any]:
    return dict(json.loads(row["envelope"])["payload"])
