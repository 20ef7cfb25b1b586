"""Operator alerts: self-contained, stored for the `alerts` query, on kinshasa.alerts and to a webhook.

The gateway is the stack's alert sink: it stores the alerts it raises itself (breaker trips, agents over
a budget) and, read back from kinshasa.alerts, those other components raise (the coordinator's
`revert_failed`), so one `alerts` query shows them all, each with the `source` that raised it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kinshasa.gateway.store import alerts
from kinshasa.gateway.uow import Tx
from kinshasa.kernel.logs import log_context
from kinshasa.schemas.envelope import Actor, Envelope, new_id, utcnow
from kinshasa.topics.catalogue import ALERTS

log = logging.getLogger(__name__)

ALERT_TYPE = "alert.run_tripped"  # the type of a trip alert; every gateway alert is `alert.<its kind>`
# Every message on kinshasa.alerts has a type `alert.<kind>`.
ALERT_TYPE_PREFIX = "alert."
GATEWAY_SOURCE = "gateway"
GATEWAY_ACTOR = Actor(kind="system", id=GATEWAY_SOURCE)
# Payload keys an alert message repeats from the alert row itself; the rest are the alert's details.
_ROW_KEYS = frozenset({"alert_id", "run_id", "kind", "created_at", "summary", "source"})
_KIND_MAX = 64


@dataclass(frozen=True)
class Alert:
    alert_id: str
    run_id: str
    kind: str
    created_at: datetime
    summary: str
    payload: dict[str, Any] = field(default_factory=dict)
    webhook_status: str | None = None
    # The component that raised it (the actor id of its message): gateway, coordinator, ...
    source: str = GATEWAY_SOURCE

    def to_json(self) -> dict[str, Any]:
        return {
            "alert_id": self.alert_id,
            "run_id": self.run_id,
            "kind": self.kind,
            "created_at": self.created_at.isoformat(),
            "summary": self.summary,
            "source": self.source,
            **self.payload,
        }


def is_alert(envelope: Envelope) -> bool:
    return envelope.type.startswith(ALERT_TYPE_PREFIX)


def raised_by_gateway(envelope: Envelope) -> bool:
    """A gateway's own alert coming back: it was stored in the transaction that emitted it.

    Replicas of one gateway share its database, so any gateway's alert is already there.
    """
    return envelope.actor == GATEWAY_ACTOR


def alert_from_envelope(envelope: Envelope) -> Alert:
    """An alert another component published, as the gateway stores it: its id is the message id."""
    payload = envelope.payload
    kind = payload.get("kind")
    if not isinstance(kind, str) or not kind.strip():
        kind = envelope.type.removeprefix(ALERT_TYPE_PREFIX)
    summary = payload.get("summary")
    source = envelope.actor.id
    if not isinstance(summary, str) or not summary.strip():
        summary = f"{kind} alert from {source}" + (f" about run {envelope.run_id}" if envelope.run_id else "")
    return Alert(
        alert_id=str(envelope.message_id),
        # An alert about no run in particular lists under the empty run id.
        run_id=envelope.run_id or "",
        kind=kind.strip()[:_KIND_MAX],
        created_at=envelope.occurred_at,
        summary=summary,
        payload={k: v for k, v in payload.items() if k not in _ROW_KEYS},
        source=source,
    )


def trip_alert(
    run_id: str,
    agent_id: str,
    entry_point: str,
    threshold: str,
    count: float,
    limit: float,
    reason: str,
    services: list[str],
    counts: dict[str, int],
    auto_revert: bool,
) -> Alert:
    """Everything an operator needs to decide, in one message: no dashboard hunting."""
    held = counts.get("held", 0)
    awaiting = counts.get("awaiting_approval", 0)
    published = counts.get("published", 0)
    head = (
        f"run {run_id} of agent {agent_id} (entry point {entry_point}) tripped its breaker on "
        f"{threshold}: {count:g} against a limit of {limit:g}. Services touched: "
        f"{', '.join(services) or 'none'}. "
    )
    if auto_revert:
        summary = head + (
            f"Auto-revert: {held} held and {awaiting} awaiting-approval command(s) were discarded "
            f"(nothing of those left) and the {published} already propagated are being reverted. "
            "Follow the revert with run(id) { status counts }."
        )
    else:
        summary = head + (
            f"{held} command(s) held in quarantine and {awaiting} awaiting approval (nothing of those "
            f"left); {published} already propagated. Decide with releaseRun, discardRun or revertRun."
        )
    return Alert(
        alert_id=str(new_id()),
        run_id=run_id,
        kind="run_tripped",
        created_at=utcnow(),
        summary=summary,
        payload={
            "agent_id": agent_id,
            "entry_point": entry_point,
            "reason": reason,
            "threshold": {"name": threshold, "count": count, "limit": limit},
            "services_touched": services,
            "held": held,
            "awaiting_approval": awaiting,
            "propagated": published,
            "auto_revert": auto_revert,
        },
    )


def budget_alert(
    agent_id: str,
    budget: str,
    limit: int,
    count: int,
    retry_after_s: float | None,
    window_s: float,
    entry_point: str,
    run_id: str = "",
) -> Alert:
    """An agent refused on one of its budgets across runs: raised once per breach (gateway/budgets.py)."""
    when = (
        f"it can go on in {retry_after_s:.0f} s"
        if retry_after_s is not None
        else "it can go on once it finishes a run"
    )
    summary = (
        f"agent {agent_id} is over its {budget} budget: {count} against a limit of {limit} "
        f"(refused at entry point {entry_point}{f', run {run_id}' if run_id else ''}); {when}. "
        f"Further refusals in the next {window_s / 60:.0f} minutes raise no new alert. Look at its runs "
        "with runs(filter: {agentId}); revertRuns(selector: {agentId}) undoes them, setPolicy changes "
        "the budget."
    )
    return Alert(
        alert_id=str(new_id()),
        run_id=run_id,
        kind=AGENT_BUDGET_KIND,
        created_at=utcnow(),
        summary=summary,
        payload={
            "agent_id": agent_id,
            "entry_point": entry_point,
            "budget": budget,
            "threshold": {"name": budget, "count": count, "limit": limit},
            "retry_after_s": retry_after_s,
            "window_s": window_s,
        },
    )


AGENT_BUDGET_KIND = "agent_budget"


async def store_alert(conn: AsyncConnection, alert: Alert, webhook: bool) -> bool:
    """Insert the alert row unless one with its id exists; False if it did (nothing changed)."""
    exists = (
        await conn.execute(select(alerts.c.alert_id).where(alerts.c.alert_id == alert.alert_id))
    ).first()
    if exists is not None:
        return False
    # The source rides in the payload document (no column of its own): a row without one is the gateway's.
    await conn.execute(
        insert(alerts).values(
            alert_id=alert.alert_id,
            run_id=alert.run_id,
            kind=alert.kind,
            created_at=alert.created_at,
            summary=alert.summary,
            payload=json.dumps({**alert.payload, "source": alert.source}, sort_keys=True, default=str),
            webhook_status="PENDING" if webhook else None,
            webhook_attempts=0,
        )
    )
    return True


async def record_alert(tx: Tx, alert: Alert, webhook: bool) -> None:
    """Store and emit the alert in the caller's transaction, so a trip and its alert are one fact.

    kinshasa.alerts is keyed by run id: an alert about no run (an agent refused a new run over its
    budget) is stored and goes to the webhook, as `catalogue_incompatible` does, but not to the topic.
    """
    await store_alert(tx.conn, alert, webhook)
    if not alert.run_id:
        return
    await tx.emit(
        ALERTS,
        Envelope(
            message_id=new_id(),
            type=f"{ALERT_TYPE_PREFIX}{alert.kind}",
            run_id=alert.run_id,
            actor=GATEWAY_ACTOR,
            correlation_id=alert.run_id,
            occurred_at=alert.created_at,
            payload=alert.to_json(),
        ),
    )


async def list_alerts(
    conn: AsyncConnection,
    run_id: str | None = None,
    limit: int = 100,
    kind: str | None = None,
    since: datetime | None = None,
) -> list[Alert]:
    query = select(alerts).order_by(alerts.c.created_at.desc(), alerts.c.alert_id).limit(limit)
    if since is not None:
        query = query.where(alerts.c.created_at >= since)
    if run_id is not None:
        query = query.where(alerts.c.run_id == run_id)
    if kind is not None:
        query = query.where(alerts.c.kind == kind)
    found: list[Alert] = []
    for r in (await conn.execute(query)).mappings():
        payload = json.loads(r["payload"])
        source = payload.pop("source", GATEWAY_SOURCE)
        found.append(
            Alert(
                alert_id=r["alert_id"],
                run_id=r["run_id"],
                kind=r["kind"],
                created_at=r["created_at"],
                summary=r["summary"],
                payload=payload,
                webhook_status=r["webhook_status"],
                source=str(source),
            )
        )
    return found


class WebhookSender:
    """POSTs alerts to an optional URL after the trip committed: best effort, retried with backoff.

    Never inside the transaction: a slow webhook must not hold the run's breaker row.
    """

    def __init__(
        self, engine: AsyncEngine, url: str | None, attempts: int, backoff_s: float, timeout_s: float
    ) -> None:
        self._engine = engine
        self.url = url
        self._attempts = attempts
        self._backoff = backoff_s
        self._timeout = timeout_s
        self._tasks: set[asyncio.Task[None]] = set()

    def send_later(self, alert: Alert) -> None:
        if self.url is None:
            return
        task = asyncio.create_task(self._deliver(alert))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, alert: Alert) -> None:
        with log_context(run_id=alert.run_id or None):
            await self._deliver_in_context(alert)

    async def _deliver_in_context(self, alert: Alert) -> None:
        assert self.url is not None
        delay = self._backoff
        status = "FAILED"
        attempts = 0
        async with httpx.AsyncClient(timeout=self._timeout) as client:
            for attempts in range(1, self._attempts + 1):
                try:
                    response = await client.post(self.url, json=alert.to_json())
                    if response.status_code < 300:
                        status = "DELIVERED"
                        break
                    log.warning(
                        "alert webhook answered %s for alert %s", response.status_code, alert.alert_id
                    )
                except httpx.HTTPError as exc:
                    log.warning("alert webhook failed for alert %s: %s", alert.alert_id, exc)
                if attempts < self._attempts:
                    await asyncio.sleep(delay)
                    delay *= 2
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    update(alerts)
                    .where(alerts.c.alert_id == alert.alert_id)
                    .values(webhook_status=status, webhook_attempts=attempts)
                )
        except Exception:
            log.exception("could not record webhook delivery of alert %s", alert.alert_id)

    async def drain(self, within_s: float = 10.0) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=within_s)
