"""What the gateway learns back over Kafka: per-command results (errors feed the breaker), revert outcomes
and the alerts other components raise.

Consumes every `kinshasa.events.<service>` topic (a pattern subscription), `kinshasa.runs` and
`kinshasa.alerts` in the group `kinshasa.gateway`. Each message is handled in one transaction with its
inbox row, so a redelivery has no second effect.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.gateway import store
from kinshasa.gateway.alerts import (
    Alert,
    WebhookSender,
    alert_from_envelope,
    is_alert,
    raised_by_gateway,
    store_alert,
)
from kinshasa.gateway.breaker import Trip, probes_settled, trip
from kinshasa.gateway.errors import RunNotFound
from kinshasa.gateway.incidents import IncidentKind, by_operation, open_incident, run_commands_at
from kinshasa.gateway.policy import PolicyBook
from kinshasa.gateway.quarantine import UNPUBLISHED, discard
from kinshasa.gateway.runs import RunRecord, load_run, run_envelope
from kinshasa.gateway.store import commands, runs
from kinshasa.gateway.uow import GatewayTx, transaction
from kinshasa.kernel.dlq import DLQ_HEADER_PREFIX
from kinshasa.kernel.inbox import Inbox
from kinshasa.kernel.logs import log_context
from kinshasa.schemas.envelope import (
    Actor,
    Envelope,
    EventSuffix,
    RunEventKind,
    deterministic_id,
    split_type,
    utcnow,
)
from kinshasa.topics.catalogue import ALERTS, RUNS, events_topic_pattern, group_id, service_dlq_pattern
from kinshasa.topics.consumer import Record

log = logging.getLogger(__name__)

GROUP = group_id("gateway")
GATEWAY = Actor(kind="system", id="gateway")
COORDINATOR = Actor(kind="system", id="coordinator")


def listened_topics() -> list[str]:
    """Every service's events topic (by pattern, so services registered later are included), run facts,
    alerts, and every service's dead letters (a dead-lettered command of a run is a DEAD_LETTER incident)."""
    return [events_topic_pattern(), RUNS, ALERTS, service_dlq_pattern()]


class Listener:
    """The Kafka handler: parse, find the run, apply the effect with the inbox row in one transaction."""

    def __init__(
        self,
        engine: AsyncEngine,
        policies: PolicyBook,
        webhook: WebhookSender,
        on_commit: Callable[[], None] | None = None,
        group: str = GROUP,
    ) -> None:
        self._engine = engine
        self._policies = policies
        self._webhook = webhook
        self._on_commit = on_commit
        self._inbox = Inbox()
        self.group = group

    async def handle(self, record: Record) -> None:
        if record.topic.endswith(".dlq"):
            await self._dead_letter(record)
            return
        # An unparsable message raises InvalidMessage: the kernel's DLQ guard dead-letters it.
        await self.handle_envelope(record.envelope())

    async def _dead_letter(self, record: Record) -> None:
        """A service gave up on a message: if it is a command of one of this gateway's runs, an incident.

        Whatever else lands on a dead-letter topic (a message nobody could parse, a foreign stack's) is
        the service's DLQ's business, not an incident of a run.
        """
        try:
            envelope = record.envelope()
        except Exception:
            return
        if envelope.run_id is None or envelope.entity is None:
            return

        def header(name: str) -> str:
            raw = record.header(DLQ_HEADER_PREFIX + name)
            return raw.decode("utf-8", "replace") if raw is not None else ""

        marker = deterministic_id(
            "dead_letter", header("group"), header("dead_letter_id"), str(envelope.message_id)
        )
        async with transaction(self._engine) as tx:
            try:
                run = await load_run(tx.conn, envelope.run_id)
            except RunNotFound:
                return
            if not await self._inbox.record(tx.conn, self.group, marker):
                return
            await open_incident(
                tx.conn,
                IncidentKind.DEAD_LETTER,
                utcnow(),
                run_id=run.run_id,
                agent_id=run.agent_id,
                entry_point=run.entry_point,
                policy_version=run.policy_version,
                services=[envelope.entity.service],
                detail={
                    "message_id": str(envelope.message_id),
                    "operation": envelope.type,
                    "group": header("group"),
                    "reason": header("reason"),
                    "error": header("error")[:500],
                    "attempts": header("attempts"),
                },
            )
            await tx.commit()

    async def handle_envelope(self, envelope: Envelope) -> None:
        with log_context(run_id=envelope.run_id, actor=envelope.actor):
            await self._dispatch(envelope)

    async def _dispatch(self, envelope: Envelope) -> None:
        if is_alert(envelope):
            await self._alert(envelope)
            return
        if envelope.run_id is None:
            return
        service, _operation, suffix = split_type(envelope.type)
        if service == "run":
            kind = RunEventKind.from_type(envelope.type)
            if kind in (RunEventKind.REVERTED, RunEventKind.REVERT_FAILED):
                await self._revert_outcome(envelope, kind)
            return
        if suffix in (EventSuffix.APPLIED, EventSuffix.REJECTED, EventSuffix.COMPENSATED):
            await self._result(envelope, EventSuffix(suffix))

    async def _result(self, envelope: Envelope, suffix: EventSuffix) -> None:
        alert: Alert | None = None
        async with transaction(self._engine, self._on_commit) as tx:
            try:
                run = await load_run(tx.conn, envelope.run_id or "", lock=True)
            except RunNotFound:
                return  # not a run this gateway minted (or a foreign stack sharing the topic)
            if not await self._inbox.record(tx.conn, self.group, envelope.message_id):
                return
            if suffix is EventSuffix.COMPENSATED:
                await tx.conn.execute(
                    update(runs).where(runs.c.run_id == run.run_id).values(compensated=runs.c.compensated + 1)
                )
                await self._compensated(tx, envelope)
                await tx.commit()
                return
            command = await self._command(tx, envelope)
            if command is None:
                await tx.commit()
                return
            if suffix is EventSuffix.APPLIED:
                await self._applied(tx, command["command_id"], envelope)
                await tx.conn.execute(
                    update(runs).where(runs.c.run_id == run.run_id).values(applied=runs.c.applied + 1)
                )
                # The run as loaded (and locked) above: the count just raised is all that changed in it.
                if await probes_settled(tx, run):
                    # Every probe went through: the run has shown it behaves, so it may write again.
                    status = (
                        store.RUNNING
                        if run.status == store.TRIPPED and run.finished_at is None
                        else (store.FINISHED if run.status == store.TRIPPED else run.status)
                    )
                    await tx.conn.execute(
                        update(runs)
                        .where(runs.c.run_id == run.run_id)
                        .values(breaker_state=store.CLOSED, status=status)
                    )
            else:
                reason = str(envelope.payload.get("reason", ""))[:2000] or None
                log.info("command %s (%s) rejected: %s", command["command_id"], envelope.type, reason)
                # The moment the error counts, under the run's lock: what a replay of the run meets.
                counted_at = utcnow()
                await tx.conn.execute(
                    update(commands)
                    .where(
                        commands.c.command_id == command["command_id"], commands.c.status == store.PUBLISHED
                    )
                    .values(
                        result=store.REJECTED, status=store.REJECTED, reason=reason, rejected_at=counted_at
                    )
                )
                await tx.conn.execute(
                    update(runs).where(runs.c.run_id == run.run_id).values(errors=runs.c.errors + 1)
                )
                run = await load_run(tx.conn, run.run_id)
                policy = await self._policies.effective(tx.conn, run.agent_id, run.entry_point)
                cause: Trip | None = None
                if run.breaker_state == store.HALF_OPEN and command["probe"]:
                    cause = Trip("probe", run.errors, policy.max_errors)
                elif (
                    run.breaker_state == store.CLOSED
                    and run.errors > policy.max_errors
                    and not run.reverting_or_done
                ):
                    cause = Trip("errors", run.errors, policy.max_errors)
                if cause is not None:
                    _run, alert = await trip(
                        tx, run, cause, policy, GATEWAY, self._webhook.url is not None, at=counted_at
                    )
            await tx.commit()
        if alert is not None:
            log.warning("breaker tripped: %s", alert.summary)
            self._webhook.send_later(alert)

    async def _alert(self, envelope: Envelope) -> None:
        """Store an alert another component raised, once per message id, and pass it to the webhook."""
        if raised_by_gateway(envelope):
            return
        alert = alert_from_envelope(envelope)
        async with transaction(self._engine) as tx:
            if envelope.run_id is not None:
                try:
                    await load_run(tx.conn, envelope.run_id)
                except RunNotFound:
                    return  # about a run of a foreign stack sharing the topic
            if not await self._inbox.record(tx.conn, self.group, envelope.message_id):
                return
            stored = await store_alert(tx.conn, alert, self._webhook.url is not None)
            await tx.commit()
        if stored:
            log.warning("alert %s from %s: %s", alert.kind, alert.source, alert.summary)
            self._webhook.send_later(alert)

    async def _applied(self, tx: GatewayTx, command_id: str, envelope: Envelope) -> None:
        """A receipt only moves forward: PUBLISHED becomes APPLIED. An applied event arriving late (its
        dead letter reprocessed after the revert's compensated event) fills in when, never the status."""
        stamps = {"applied_at": envelope.occurred_at, "applied_event_id": str(envelope.message_id)}
        moved = await tx.conn.execute(
            update(commands)
            .where(commands.c.command_id == command_id, commands.c.status == store.PUBLISHED)
            .values(result=store.APPLIED, status=store.APPLIED, **stamps)
        )
        if moved.rowcount == 0:
            await tx.conn.execute(
                update(commands)
                .where(
                    commands.c.command_id == command_id,
                    commands.c.status == store.COMPENSATED,
                    commands.c.applied_at.is_(None),
                )
                .values(**stamps)
            )

    async def _compensated(self, tx: GatewayTx, envelope: Envelope) -> None:
        """Mark the command whose applied event a revert undid COMPENSATED (the event names that event).

        Normally the applied event came first and left its id on the command. If it has not been
        consumed (dead-lettered, to be reprocessed), the command is found among the run's published
        commands of the entity by the applied event id the contract derives from each command id.
        """
        forward_event_id = envelope.payload.get("forward_event_id")
        if not isinstance(forward_event_id, str) or not forward_event_id:
            return
        compensated = {"result": store.COMPENSATED, "status": store.COMPENSATED,
                       "compensated_at": envelope.occurred_at}
        moved = await tx.conn.execute(
            update(commands)
            .where(
                commands.c.applied_event_id == forward_event_id,
                commands.c.run_id == envelope.run_id,
                commands.c.status == store.APPLIED,
            )
            .values(**compensated)
        )
        if moved.rowcount or envelope.entity is None:
            return
        published = await tx.conn.execute(
            select(commands.c.command_id).where(
                commands.c.run_id == envelope.run_id,
                commands.c.entity_id == envelope.entity.id,
                commands.c.status == store.PUBLISHED,
            )
        )
        for (command_id,) in published:
            if str(deterministic_id(str(EventSuffix.APPLIED), command_id)) == forward_event_id:
                await tx.conn.execute(
                    update(commands)
                    .where(commands.c.command_id == command_id)
                    .values(applied_event_id=forward_event_id, **compensated)
                )
                return
        log.warning("compensated event %s names applied event %s, which no command of run %s matches",
                    envelope.message_id, forward_event_id, envelope.run_id)

    async def _command(self, tx: GatewayTx, envelope: Envelope) -> Any:
        if envelope.causation_id is None:
            return None
        return (
            (
                await tx.conn.execute(
                    select(commands).where(commands.c.command_id == str(envelope.causation_id))
                )
            )
            .mappings()
            .first()
        )

    @staticmethod
    async def _revert_incident(tx: GatewayTx, run: RunRecord, kind: RunEventKind, envelope: Envelope) -> None:
        """The REVERT or REVERT_FAILED incident of one revert outcome, in the outcome's transaction."""
        out, _waiting = await run_commands_at(tx.conn, run.run_id)
        await open_incident(
            tx.conn,
            IncidentKind.REVERT if kind is RunEventKind.REVERTED else IncidentKind.REVERT_FAILED,
            utcnow(),
            run_id=run.run_id,
            agent_id=run.agent_id,
            entry_point=run.entry_point,
            policy_version=run.policy_version,
            write_index=run.writes,
            escaped=by_operation(list(out)),
            held=0,
            services=list(run.services),
            detail={"reason": run.revert_reason, "outcome": envelope.payload},
        )

    async def _revert_outcome(self, envelope: Envelope, kind: RunEventKind) -> None:
        """The coordinator's outcome closes the run, whatever its status, and nothing of it stays unpublished.

        Normally the run is REVERTING (the doorbell discarded everything unpublished already). A run in
        any other status, RUNNING included, is closed all the same: the ledger says it was undone, so the
        gateway must not accept, release or approve anything more for it; its HELD and AWAITING_APPROVAL
        commands are discarded in this transaction.
        """
        async with transaction(self._engine, self._on_commit) as tx:
            try:
                run = await load_run(tx.conn, envelope.run_id or "", lock=True)
            except RunNotFound:
                return
            if not await self._inbox.record(tx.conn, self.group, envelope.message_id):
                return
            status = store.REVERTED if kind is RunEventKind.REVERTED else store.REVERT_FAILED
            # One incident per outcome: the coordinator may report the same outcome again under a new
            # message id (a joined request gives its workflow another round; the run is already there),
            # and that is no new decision. A retried revert that fails again went through REVERTING first.
            if run.status != status:
                await self._revert_incident(tx, run, kind, envelope)
            discarded = await discard(
                tx, run.run_id, UNPUBLISHED, f"run {status} by the coordinator", COORDINATOR.id
            )
            await tx.conn.execute(
                update(runs)
                .where(runs.c.run_id == run.run_id)
                .values(
                    status=status,
                    breaker_state=store.OPEN,
                    probes_left=0,
                    on_hold=False,
                    revert_reason=run.revert_reason or "the coordinator reported it; no request came here",
                    revert_detail=json.dumps(envelope.payload, sort_keys=True, default=str),
                )
            )
            if discarded:
                await tx.emit(
                    RUNS,
                    run_envelope(
                        run.run_id, RunEventKind.DISCARDED, GATEWAY, {"count": discarded, "reason": status}
                    ),
                )
            await tx.commit()
