"""The stack's durability surface: every component's outbox backlog and dead letters, and their alert.

Each component's admin endpoint answers `GET /admin/outbox` (`kinshasa.kernel.admin_api`): its unpublished
outbox rows, the age of the oldest, its dead outbox rows and its DLQ size. Here the gateway reads them
all, its own in-process, for the operator query `outboxStatus`, and `DurabilityWatcher` polls them to
raise a `dlq_threshold` alert when a component's DLQ count reaches `dlq_alert_threshold` or its oldest
pending outbox row is older than `outbox_age_alert_s`.

One alert per crossing. A component is either over its thresholds or not; the alert is raised when it
goes over, and is armed again only once a poll sees it back under. That state lives in the gateway's
database (`gw_durability_alarms`), not in a process, so replicas polling the same components and a
gateway restarting while a component is still over raise nothing twice: going over is a compare-and-set
(`over` false -> true) that one transaction wins, and only the winner stores and emits the alert, in
that same transaction. The row keeps the crossing's number and its alert's id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import strawberry
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kinshasa.gateway.alerts import GATEWAY_ACTOR, GATEWAY_SOURCE, Alert, WebhookSender, store_alert
from kinshasa.gateway.errors import BackendUnavailable
from kinshasa.gateway.store import durability_alarms, install_gateway_tables
from kinshasa.gateway.uow import transaction
from kinshasa.kernel.database import READ_ONLY
from kinshasa.kernel.outbox import SqlOutboxStore
from kinshasa.schemas.envelope import EntityRef, Envelope, new_id, utcnow
from kinshasa.topics.catalogue import ALERTS

if TYPE_CHECKING:
    from kinshasa.gateway.context import GatewayContext
    from kinshasa.gateway.reads import Backends
    from kinshasa.gateway.settings import GatewayConfig
    from kinshasa.kernel.dlq import DeadLetterQueue

log = logging.getLogger(__name__)

DLQ_THRESHOLD_KIND = "dlq_threshold"
# kinshasa.alerts is keyed by run id, and this alert is about no run: it is keyed by the component
# instead (`kinshasa:<component>`), so one component's crossings stay in order on the topic.
ALERT_ENTITY_SERVICE = "kinshasa"
ALERT_ENTITY_TYPE = "component"

Connect = Callable[[], AbstractAsyncContextManager[AsyncConnection]]


# --- what each component reports ---------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentDurability:
    """One component's numbers, or why there are none (`error`: it did not answer)."""

    component: str
    pending: int | None = None
    oldest_pending_age_s: float | None = None
    dead: int | None = None
    dlq_count: int | None = None
    error: str | None = None

    @property
    def answered(self) -> bool:
        return self.error is None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _age(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
    return float(value) if ok else None


def from_admin(component: str, body: Any) -> ComponentDurability:
    """A component's `GET /admin/outbox` answer; one this gateway cannot read is reported as an error."""
    if not isinstance(body, dict) or _count(body.get("pending")) is None or _count(body.get("dead")) is None:
        return ComponentDurability(
            component,
            error=f"{component} answered an outbox status this gateway cannot read: are the gateway and "
            f"{component} the same version?",
        )
    return ComponentDurability(
        component,
        pending=_count(body.get("pending")),
        oldest_pending_age_s=_age(body.get("oldest_pending_age_s")),
        dead=_count(body.get("dead")),
        dlq_count=_count(body.get("dlq_count")),
    )


async def remote_status(backends: Backends, component: str, timeout_s: float) -> ComponentDurability:
    """`GET /admin/outbox` of one component; one that does not answer comes back with its error."""
    try:
        body = await backends.outbox(component, timeout_s)
    except BackendUnavailable as exc:
        return ComponentDurability(component, error=exc.message)
    return from_admin(component, body)


async def local_status(component: str, connect: Connect, dlq: DeadLetterQueue | None) -> ComponentDurability:
    """The gateway's own numbers, read in-process (its admin endpoint is the same process)."""
    async with connect() as conn:
        backlog = await SqlOutboxStore().backlog(conn)
        await conn.rollback()
    return ComponentDurability(
        component,
        pending=backlog.pending,
        oldest_pending_age_s=backlog.oldest_age_s,
        dead=backlog.dead,
        dlq_count=await dlq.dlq_count() if dlq is not None else None,
    )


async def read_all(
    backends: Backends,
    timeout_s: float,
    local: Callable[[], Any] | None = None,
    local_name: str = GATEWAY_SOURCE,
) -> list[ComponentDurability]:
    """Every component's numbers, the gateway's first, the rest concurrently and in name order.

    `local` reads the gateway's own; a component listed under the gateway's name is then not asked over
    HTTP (that would be this same process, or a replica sharing its database).
    """
    remote = [c for c in backends.components if local is None or c != local_name]
    found: list[ComponentDurability] = [await local()] if local is not None else []
    found += await asyncio.gather(*(remote_status(backends, c, timeout_s) for c in remote))
    return found


# --- the operator query ----------------------------------------------------------------------------


@strawberry.type(
    description="One component's durability numbers: its outbox backlog and its dead letters. A component "
    "that did not answer has null numbers and says why in `error`, as in the dlq query."
)
class OutboxComponent:
    component: str
    pending: int | None = strawberry.field(description="outbox messages committed but not yet published")
    oldest_pending_age_s: float | None = strawberry.field(
        description="age in seconds of the oldest of them; null when none is pending"
    )
    dead: int | None = strawberry.field(
        description="outbox messages whose publish attempts ran out (listed and requeued with dlq and "
        "reprocessDlq)"
    )
    dlq_count: int | None = strawberry.field(
        description="the component's whole DLQ: consumed messages given up on plus dead outbox messages"
    )
    error: str | None = strawberry.field(description="why the numbers are missing")

    @classmethod
    def of(cls, d: ComponentDurability) -> OutboxComponent:
        return cls(
            component=d.component,
            pending=d.pending,
            oldest_pending_age_s=d.oldest_pending_age_s,
            dead=d.dead,
            dlq_count=d.dlq_count,
            error=d.error,
        )


async def outbox_status(info: strawberry.Info) -> list[OutboxComponent]:
    """Resolver of `outboxStatus` (operators only: gateway/graphql/queries.py attaches the permission)."""
    context: GatewayContext = info.context
    services = context.services
    settings = services.settings
    # Within the request's deadline for reading other components, like every backend read.
    remaining = settings.backend_deadline_s - (time.monotonic() - context.started)
    timeout_s = max(min(settings.http_timeout_s, remaining), 0.001)

    async def local() -> ComponentDurability:
        return await local_status(GATEWAY_SOURCE, context.reads.database, services.local_dlq)

    found = await read_all(services.backends, timeout_s, local if services.local_dlq is not None else None)
    return [OutboxComponent.of(d) for d in found]


# --- the threshold alert ---------------------------------------------------------------------------


# The alarm rows live with the gateway's other tables (gateway/store.py).
alarms = durability_alarms


async def install_durability_tables(engine: AsyncEngine) -> None:
    """`gw_durability_alarms` is one of the gateway's tables: this migrates the gateway's database, which
    is a no-op when `install_gateway_tables` already ran."""
    await install_gateway_tables(engine)


@dataclass(frozen=True)
class Limits:
    """When a component is over: `dlq_count` dead letters or more, or a pending row older than `age_s`."""

    dlq_count: int
    age_s: float


@dataclass(frozen=True)
class Breach:
    """The threshold a reading is over, as an alert's `threshold` names it."""

    name: Literal["dlq_count", "outbox_age_s"]
    count: float
    limit: float


def assess(reading: ComponentDurability, limits: Limits) -> Breach | None:
    """The threshold the reading is over (dead letters first: they wait for an operator), or None.

    A reading without an answer is over nothing: a component that cannot be asked is not known to be
    under either, so the caller leaves its state alone.
    """
    if reading.dlq_count is not None and reading.dlq_count >= limits.dlq_count:
        return Breach("dlq_count", reading.dlq_count, limits.dlq_count)
    age = reading.oldest_pending_age_s
    if age is not None and age > limits.age_s:
        return Breach("outbox_age_s", round(age, 1), limits.age_s)
    return None


Transition = Literal["raise", "rearm", "stay"]


def transition(was_over: bool, over: bool) -> Transition:
    """What a poll does with a component's state: raise on going over, re-arm on coming back under."""
    if over and not was_over:
        return "raise"
    if was_over and not over:
        return "rearm"
    return "stay"


def dlq_threshold_alert(
    reading: ComponentDurability, breach: Breach, crossing: int, limits: Limits, now: datetime,
    alert_id: str,
) -> Alert:
    """Everything an operator needs: which component, how many dead letters, how stale its outbox."""
    c = reading.component
    dlq = reading.dlq_count or 0
    age = reading.oldest_pending_age_s
    if breach.name == "dlq_count":
        head = (
            f"{c} has {dlq} dead letter(s) waiting for an operator (alert threshold {limits.dlq_count}). "
            f"Inspect them with the dlq query, fix their cause, then reprocessDlq(component: \"{c}\", "
            "messageIds: [...])."
        )
    else:
        head = (
            f"{c}'s oldest unpublished outbox message is {age or 0:.0f} s old (limit {limits.age_s:g} s) "
            f"with {reading.pending or 0} waiting: its relay is not publishing. Check that {c} is running "
            "and reaches Kafka; its log names the publish error."
        )
    others = f" Its outbox: {reading.pending or 0} pending" + (
        f", the oldest {age:.0f} s old" if age is not None else ""
    ) + f"; {dlq} in its DLQ."
    tail = f" No new {DLQ_THRESHOLD_KIND} alert for {c} until it is back under its thresholds."
    return Alert(
        alert_id=alert_id,
        run_id="",
        kind=DLQ_THRESHOLD_KIND,
        created_at=now,
        summary=head + others + tail,
        payload={
            "component": c,
            "dlq_count": reading.dlq_count,
            "oldest_pending_age_s": age,
            "pending": reading.pending,
            "threshold": {"name": breach.name, "count": breach.count, "limit": breach.limit},
            "crossing": crossing,
        },
    )


def alert_envelope(alert: Alert, component: str) -> Envelope:
    return Envelope(
        message_id=uuid.UUID(alert.alert_id),
        type=f"alert.{alert.kind}",
        actor=GATEWAY_ACTOR,
        entity=EntityRef(service=ALERT_ENTITY_SERVICE, type=ALERT_ENTITY_TYPE, id=component),
        occurred_at=alert.created_at,
        payload=alert.to_json(),
    )


def gateway_watcher(
    settings: GatewayConfig,
    engine: AsyncEngine,
    backends: Backends,
    connect: Connect,
    dlq: DeadLetterQueue | None,
    webhook: WebhookSender,
    on_commit: Callable[[], None] | None,
) -> DurabilityWatcher:
    """The gateway's watcher: its own numbers in-process, every other component's over HTTP."""

    async def local() -> ComponentDurability:
        return await local_status(GATEWAY_SOURCE, connect, dlq)

    async def read() -> list[ComponentDurability]:
        return await read_all(backends, settings.http_timeout_s, local)

    limits = Limits(dlq_count=settings.dlq_alert_threshold, age_s=settings.outbox_age_alert_s)
    return DurabilityWatcher(engine, read, limits, settings.dlq_alert_interval_s, webhook, on_commit)


class DurabilityWatcher:
    """Polls every component's numbers each `interval_s` and raises `dlq_threshold` once per crossing.

    `polls` counts finished polls (a test's signal that polls happened); `raised` the alerts this process
    raised. Each poll reads the alarm states without a write lock; only a poll that changes one writes.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        read: Callable[[], Any],
        limits: Limits,
        interval_s: float,
        webhook: WebhookSender | None = None,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self._engine = engine
        self._read = read
        self.limits = limits
        self._interval = interval_s
        self._webhook = webhook
        self._on_commit = on_commit
        self.polls = 0
        self.raised: list[Alert] = []
        self._poll_event = asyncio.Event()
        # Components that did not answer the last poll: said once when they stop, once when they are back.
        self._silent: set[str] = set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("durability poll failed; trying again in %.0f s", self._interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)

    async def wait_polls(self, count: int, timeout_s: float) -> None:
        """Until `count` more polls have finished (for tests and the CLI)."""
        target = self.polls + count
        async with asyncio.timeout(timeout_s):
            while self.polls < target:
                self._poll_event.clear()
                await self._poll_event.wait()

    async def poll_once(self) -> list[Alert]:
        """One poll of every component; returns the alerts it raised."""
        readings: Sequence[ComponentDurability] = await self._read()
        async with self._read_only() as conn:
            rows = await conn.execute(select(alarms.c.component, alarms.c.over))
            states = {component: bool(over) for component, over in rows}
            await conn.rollback()
        raised: list[Alert] = []
        for reading in readings:
            if not reading.answered:
                if reading.component not in self._silent:
                    self._silent.add(reading.component)
                    log.warning("durability poll: %s did not answer (%s); its alert state is kept until "
                                "it does", reading.component, reading.error)
                continue
            if reading.component in self._silent:
                self._silent.discard(reading.component)
                log.info("durability poll: %s answers again", reading.component)
            breach = assess(reading, self.limits)
            step = transition(states.get(reading.component, False), breach is not None)
            if step == "raise" and breach is not None:
                alert = await self._go_over(reading, breach)
                if alert is not None:
                    raised.append(alert)
            elif step == "rearm":
                await self._come_back(reading.component)
        for alert in raised:
            log.warning("alert %s: %s", alert.kind, alert.summary)
            if self._webhook is not None:
                self._webhook.send_later(alert)
        self.raised += raised
        self.polls += 1
        self._poll_event.set()
        return raised

    @asynccontextmanager
    async def _read_only(self) -> AsyncIterator[AsyncConnection]:
        async with self._engine.connect() as conn:
            await conn.execution_options(**{READ_ONLY: True})
            yield conn

    async def _go_over(self, reading: ComponentDurability, breach: Breach) -> Alert | None:
        """Turn the component's state over and raise its alert, in one transaction; None if another
        replica (or an earlier poll of this one) turned it first."""
        component = reading.component
        now = utcnow()
        # Random, not derived from the crossing: stacks sharing a Kafka cluster must not emit one id twice.
        # The compare-and-set below makes one replica's id the crossing's.
        alert_id = str(new_id())
        async with transaction(self._engine, self._on_commit) as tx:
            maker = pg_insert if tx.conn.dialect.name == "postgresql" else sqlite_insert
            await tx.conn.execute(
                maker(alarms).on_conflict_do_nothing(index_elements=["component"]),
                [{"component": component, "over": False, "crossings": 0, "changed_at": now}],
            )
            won = (
                await tx.conn.execute(
                    update(alarms)
                    .where(alarms.c.component == component, alarms.c.over.is_(False))
                    .values(over=True, crossings=alarms.c.crossings + 1, alert_id=alert_id, changed_at=now)
                    .returning(alarms.c.crossings)
                )
            ).first()
            if won is None:
                return None
            alert = dlq_threshold_alert(reading, breach, int(won[0]), self.limits, now, alert_id)
            webhook = self._webhook is not None and self._webhook.url is not None
            await store_alert(tx.conn, alert, webhook)
            await tx.emit(ALERTS, alert_envelope(alert, component))
            await tx.commit()
        return alert

    async def _come_back(self, component: str) -> None:
        async with transaction(self._engine, self._on_commit) as tx:
            result = await tx.conn.execute(
                update(alarms)
                .where(alarms.c.component == component, alarms.c.over.is_(True))
                .values(over=False, changed_at=utcnow())
            )
            await tx.commit()
        if result.rowcount:
            log.info("%s is back under its durability thresholds: its %s alert is armed again", component,
                     DLQ_THRESHOLD_KIND)
