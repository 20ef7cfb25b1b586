"""The kit's handler path: one command in, one transaction out (inbox row, domain write, step record, event).

`CommandDispatcher.handle(envelope)` is what the Kafka consumer calls for each command, and what tests
call directly against a real database. For a forward command it validates the payload, runs the
declared forward handler inside a savepoint and emits `*.applied` with the handler's domain data, or
`*.rejected` when the payload or an invariant refuses it. For `<operation>.compensate` it looks the
forward step up in the service's own store and runs the declared inverse, emitting `*.compensated`
(again, unchanged, if it was already compensated) or `*.compensation_failed`. Every path writes the
inbox row, the outbox row and the receipt in the same transaction as the domain write, so a
redelivered command has no second effect and no committed effect lacks its event.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kinshasa.kernel.inbox import Inbox
from kinshasa.kernel.receipts import ReceiptChain, payload_digest
from kinshasa.kernel.unit_of_work import UnitOfWork
from kinshasa.schemas.envelope import (
    APPLIED,
    COMPENSATE,
    COMPENSATED,
    COMPENSATION_FAILED,
    REJECTED,
    CompensatePayload,
    EntityRef,
    Envelope,
    RejectedPayload,
    deterministic_id,
    event_type,
    invalid_message,
    split_type,
    utcnow,
)
from kinshasa.services.kit.context import AppliedStep, CommandContext
from kinshasa.services.kit.declarations import Operation, Service
from kinshasa.services.kit.errors import DomainError, PoisonMessageError
from kinshasa.settings import ServiceSettings

log = logging.getLogger(__name__)

OutcomeKind = Literal["applied", "rejected", "compensated", "compensation_failed", "duplicate"]
VALIDATION = "VALIDATION"
UNKNOWN_OPERATION = "UNKNOWN_OPERATION"


@dataclass(frozen=True)
class Outcome:
    """What handling one command did: the event it emitted, or `duplicate` (already handled, nothing done)."""

    kind: OutcomeKind
    event: Envelope | None = None


def _poison(field: str, problem: str) -> PoisonMessageError:
    return PoisonMessageError([(field, problem)], "command")


class CommandDispatcher:
    """Runs one service's declared handlers for the commands of its topic, one transaction per command."""

    def __init__(
        self,
        service: Service,
        engine: AsyncEngine,
        *,
        group: str,
        events_topic: str,
        settings: ServiceSettings | None = None,
        on_commit: Callable[[], None] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        service.verify()
        self.service = service
        self.engine = engine
        self.group = group
        self.events_topic = events_topic
        self.settings = settings if settings is not None else ServiceSettings.for_service(service.name)
        self.on_commit = on_commit
        self.clock = clock
        self.inbox = Inbox()
        self.receipts = ReceiptChain(service.name)

    async def handle(self, envelope: Envelope) -> Outcome:
        """Handle one command in its own transaction; raises only for poison messages and infrastructure."""
        async with UnitOfWork(self.engine, on_commit=self.on_commit) as uow:
            outcome = await self.process(uow, envelope)
            await uow.commit()
        return outcome

    async def process(self, uow: UnitOfWork, envelope: Envelope) -> Outcome:
        """Everything `handle` does but the commit: the caller commits (or, by not committing, undoes it)."""
        conn = uow.conn
        service, operation, suffix = split_type(envelope.type)
        if service != self.service.name:
            raise _poison("type", f"{envelope.type} is not a command of {self.service.name}: it was sent "
                                  f"to the wrong topic; send it to {service}'s commands topic")
        if suffix is not None and suffix != COMPENSATE:
            raise _poison("type", f"{envelope.type} is an event, not a command: events go on events topics")
        if envelope.entity is None:
            raise _poison("entity", "commands must name their entity {service, type, id}: the Kafka key and "
                                    "every event derive from it")
        if not await self.inbox.record(conn, self.group, envelope.message_id):
            log.info("command %s (%s) was already handled; acknowledging without effect",
                     envelope.message_id, envelope.type)
            return Outcome("duplicate")
        command_type = f"{service}.{operation}"
        if suffix == COMPENSATE:
            outcome = await self._compensate(conn, envelope, command_type)
        else:
            outcome = await self._forward(conn, envelope, command_type)
        assert outcome.event is not None
        uow.emit(self.events_topic, outcome.event)
        await self.receipts.append(conn, (self.events_topic, str(outcome.event.message_id)),
                                   str(outcome.event.message_id), payload_digest(outcome.event.to_bytes()))
        log.info("%s -> %s", envelope.type, outcome.event.type,
                 extra={"event_id": str(outcome.event.message_id), "entity": envelope.entity.key})
        return outcome

    # forward

    async def _forward(self, conn: AsyncConnection, envelope: Envelope, command_type: str) -> Outcome:
        op = self.service.get(command_type)
        if op is None:
            known = ", ".join(self.service.operations)
            return self._rejected(envelope, command_type, UNKNOWN_OPERATION,
                                  f"{command_type} is not an operation of {self.service.name}; "
                                  f"known: {known}")
        try:
            payload = op.spec.payload_model.model_validate(envelope.payload)
        except ValidationError as exc:
            return self._rejected(envelope, command_type, VALIDATION,
                                  str(invalid_message(exc, f"{command_type} payload")))
        entity = envelope.entity
        assert entity is not None
        problem = self._entity_problem(op, entity, payload)
        if problem is not None:
            return self._rejected(envelope, command_type, VALIDATION, problem)
        ctx = CommandContext(envelope=envelope, entity=entity, received_at=self.clock(),
                             settings=self.settings)
        try:
            # A savepoint: a domain error undoes the handler's writes but keeps the inbox row, so the
            # rejection itself is recorded exactly once.
            async with conn.begin_nested():
                data = await op.forward(conn, payload, ctx)
        except DomainError as err:
            return self._rejected(envelope, command_type, err.code, err.reason)
        event = self._event(envelope, event_type(command_type, APPLIED),
                            deterministic_id(str(APPLIED), str(envelope.message_id)), dict(data))
        await self.service.store.record_applied(conn, str(event.message_id), ctx, command_type, event.payload)
        return Outcome("applied", event)

    def _entity_problem(self, op: Operation, entity: EntityRef, payload: Any) -> str | None:
        spec = op.spec
        if entity.service != self.service.name or entity.type != spec.entity_type:
            return (f"entity {entity.service}/{entity.type} does not match {spec.command_type}, "
                    f"which acts on {self.service.name}/{spec.entity_type}")
        named = spec.entity_id(payload)
        if named is not None and named != entity.id:
            return (f"entity id {entity.id!r} differs from payload {spec.entity_key}={named!r}: "
                    "the envelope's entity must be the entity the payload names")
        return None

    def _rejected(self, envelope: Envelope, command_type: str, code: str, reason: str) -> Outcome:
        body = RejectedPayload(reason=reason[:2000], code=code).model_dump(mode="json")
        event = self._event(envelope, event_type(command_type, REJECTED),
                            deterministic_id(str(REJECTED), str(envelope.message_id)), body)
        log.info("rejected %s: %s (%s)", envelope.type, reason, code)
        return Outcome("rejected", event)

    # compensate

    async def _compensate(self, conn: AsyncConnection, envelope: Envelope, command_type: str) -> Outcome:
        try:
            request = CompensatePayload.model_validate(envelope.payload)
        except ValidationError as exc:
            # Without a valid forward event id there is nothing to name in a compensation_failed.
            raise invalid_message(exc, f"{envelope.type} payload") from exc
        expected = event_type(command_type, APPLIED)
        if request.forward_type != expected:
            return self._failed(envelope, command_type, request,
                                f"{envelope.type} cannot undo a {request.forward_type}: send "
                                f"{request.forward_type.rsplit('.', 1)[0]}.compensate instead")
        op = self.service.get(command_type)
        if op is None:
            return self._failed(envelope, command_type, request,
                                f"{command_type} is not an operation of {self.service.name}")
        if op.inverse is None:
            return self._failed(envelope, command_type, request,
                                f"{command_type} is egress: what it sent cannot be taken back, so it is "
                                "never compensated; it was gated for approval before it left")
        forward_id = str(request.forward_event_id)
        step = await self.service.store.get(conn, forward_id)
        if step is None or step.command_type != command_type:
            return self._failed(envelope, command_type, request,
                                f"{self.service.name} has no applied {command_type} step with event id "
                                f"{forward_id}: check the forward event id (only applied steps can be "
                                "undone)")
        ctx = CommandContext(envelope=envelope, entity=step.entity, received_at=self.clock(),
                             settings=self.settings)
        if await self.service.store.is_compensated(conn, forward_id):
            log.info("step %s was already compensated; acknowledging again", forward_id)
            return self._compensated(envelope, command_type, request, step)
        try:
            async with conn.begin_nested():
                await op.inverse(conn, step, ctx)
        except DomainError as err:
            return self._failed(envelope, command_type, request, err.reason)
        await self.service.store.record_compensated(conn, forward_id, ctx)
        return self._compensated(envelope, command_type, request, step)

    def _compensated(self, envelope: Envelope, command_type: str, request: CompensatePayload,
                     step: AppliedStep) -> Outcome:
        # Keyed by the forward event, not the compensate command: every re-sent compensate of one step
        # acknowledges with the same message id, so the ledger counts the step once.
        event = self._event(envelope, event_type(command_type, COMPENSATED),
                            deterministic_id(str(COMPENSATED), step.event_id),
                            request.model_dump(mode="json"), entity=step.entity)
        return Outcome("compensated", event)

    def _failed(self, envelope: Envelope, command_type: str, request: CompensatePayload,
                reason: str) -> Outcome:
        body = {**request.model_dump(mode="json"), "reason": reason[:2000]}
        event = self._event(envelope, event_type(command_type, COMPENSATION_FAILED),
                            deterministic_id(str(COMPENSATION_FAILED), str(envelope.message_id)), body)
        log.warning("compensation of %s failed: %s", request.forward_event_id, reason)
        return Outcome("compensation_failed", event)

    # events

    def _event(self, command: Envelope, type_: str, message_id: Any, payload: Mapping[str, Any],
               entity: EntityRef | None = None) -> Envelope:
        """An event about `command`: same run, actor, entity and correlation; caused by the command."""
        return Envelope(
            message_id=message_id, type=type_, run_id=command.run_id, actor=command.actor,
            causation_id=command.message_id, correlation_id=command.correlation_id,
            entity=entity if entity is not None else command.entity, occurred_at=self.clock(),
            payload=dict(payload), traceparent=command.traceparent,
        )
