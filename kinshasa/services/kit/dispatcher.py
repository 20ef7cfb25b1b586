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
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import ValidationError
from pydantic_core import to_jsonable_python
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.kernel import tracing
from kinshasa.kernel.inbox import Inbox
from kinshasa.kernel.logs import log_context
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
from kinshasa.services.kit.store import StepStore, batch_reads, expect_entities
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


class _RefusedWithoutSavepoint(Exception):
    """A handler refused its command in a batch running without savepoints; run the batch with them."""


@dataclass
class _Batch:
    """One transaction's commands: what it claimed and looked up, and the rows it writes at the end."""

    uow: UnitOfWork
    savepoints: bool
    fresh: set[uuid.UUID]  # message ids this transaction claimed in the inbox and has yet to apply
    steps: dict[str, AppliedStep] = field(default_factory=dict)
    compensated: set[str] = field(default_factory=set)
    looked_up: set[str] = field(default_factory=set)
    applied_rows: list[dict[str, Any]] = field(default_factory=list)
    compensation_rows: list[dict[str, Any]] = field(default_factory=list)
    receipts: list[tuple[tuple[str, str], str, str]] = field(default_factory=list)
    emitted: dict[str, str] = field(default_factory=dict)  # event id -> digest of its wire bytes


def _named_forward_id(envelope: Envelope) -> str | None:
    """The forward event id a compensate command names, read loosely for the bulk lookup (the
    payload is validated properly when the command is handled)."""
    if not envelope.type.endswith(f".{COMPENSATE}") or not isinstance(envelope.payload, Mapping):
        return None
    named = envelope.payload.get("forward_event_id")
    return named if isinstance(named, str) else None


def _poison(field: str, problem: str) -> PoisonMessageError:
    return PoisonMessageError([(field, problem)], "command")


class CommandDispatcher:
    """Runs one service's declared handlers for the commands of its topic, one transaction per command
    (`handle`) or per batch of commands (`handle_batch`)."""

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
        # Egress handlers act outside the database; they must never be rolled back and run again.
        self.own_transactions = any(op.egress for op in service.operations.values())

    async def handle(self, envelope: Envelope) -> Outcome:
        """Handle one command in its own transaction; raises only for poison messages and infrastructure."""
        return (await self._run([envelope], savepoints=True))[0]

    async def handle_batch(self, envelopes: Sequence[Envelope]) -> list[Outcome]:
        """Handle commands in order in one shared transaction: all of them commit, or none does.

        Each command gets exactly what `handle` gives it (its inbox row, its domain write, its step or
        compensation record, its event and receipt); sharing the transaction saves the per-commit
        cost, and the bookkeeping rows go in with one statement per table. Handlers run without a
        savepoint each: when one refuses its command (a DomainError) the batch is rolled back and run
        again with savepoints, which is what undoes a refused handler's partial writes. A poison
        message or an infrastructure error raises and rolls the whole batch back, so the caller can
        fall back to `handle` one command at a time and dead-letter just the bad one.

        A handler may therefore run more than once before its command commits. A service with an
        egress operation (an effect outside its database) gets one transaction per command instead:
        whatever this returns or raises, the commands before the failing one stay committed.
        """
        if not envelopes:
            return []
        if self.own_transactions:
            # Effects outside the database (an email sent) cannot be rolled back with the batch and run
            # again, so each command commits alone; a redelivered one is absorbed by the inbox.
            return [await self.handle(envelope) for envelope in envelopes]
        try:
            return await self._run(envelopes, savepoints=len(envelopes) == 1)
        except _RefusedWithoutSavepoint:
            return await self._run(envelopes, savepoints=True)

    async def process(self, uow: UnitOfWork, envelope: Envelope) -> Outcome:
        """Everything `handle` does but the commit: the caller commits (or, by not committing, undoes it)."""
        with batch_reads(uow.conn):
            batch = await self._open(uow, [envelope], savepoints=True)
            outcome = await self._process(batch, envelope)
            await self._close(batch)
        return outcome

    async def _run(self, envelopes: Sequence[Envelope], *, savepoints: bool) -> list[Outcome]:
        async with UnitOfWork(self.engine, on_commit=self.on_commit) as uow:
            with batch_reads(uow.conn):
                batch = await self._open(uow, envelopes, savepoints=savepoints)
                outcomes = []
                for envelope in envelopes:
                    # Each command's log lines carry its own run id, actor and message id.
                    with log_context(run_id=envelope.run_id, actor=envelope.actor,
                                     message_id=envelope.message_id), \
                            tracing.span(f"handle {envelope.type}", parent=envelope.traceparent,
                                         kind="consumer", attributes={"kinshasa.service": self.service.name}):
                        outcomes.append(await self._process(batch, envelope))
                await self._close(batch)
            await uow.commit()
        return outcomes

    async def _open(self, uow: UnitOfWork, envelopes: Sequence[Envelope], *, savepoints: bool) -> _Batch:
        """Claim every command in the inbox and read the steps the compensations name, in bulk."""
        conn = uow.conn
        batch = _Batch(uow=uow, savepoints=savepoints,
                       fresh=await self.inbox.record_many(conn, self.group,
                                                          [e.message_id for e in envelopes]))
        await self._look_up(batch, [forward_id for e in envelopes
                                     if (forward_id := _named_forward_id(e)) is not None])
        # The entities the handlers will read: one query per table fetches them all (`batch_reads`).
        expect_entities(conn, [*(e.entity.id for e in envelopes if e.entity is not None),
                               *(step.entity.id for step in batch.steps.values())])
        return batch

    async def _look_up(self, batch: _Batch, forward_ids: list[str]) -> None:
        wanted = [f for f in forward_ids if f not in batch.looked_up]
        if not wanted:
            return
        conn, store = batch.uow.conn, self.service.store
        batch.steps.update(await store.get_many(conn, wanted))
        batch.compensated.update(await store.compensated_among(conn, wanted))
        batch.looked_up.update(wanted)

    async def _close(self, batch: _Batch) -> None:
        """Write what the batch's commands recorded: step and compensation rows, then the receipts."""
        conn = batch.uow.conn
        await self.service.store.insert_rows(conn, applied=batch.applied_rows,
                                             compensations=batch.compensation_rows)
        await self.receipts.append_many(conn, batch.receipts)

    async def _process(self, batch: _Batch, envelope: Envelope) -> Outcome:
        service, operation, suffix = split_type(envelope.type)
        if service != self.service.name:
            raise _poison("type", f"{envelope.type} is not a command of {self.service.name}: it was sent "
                                  f"to the wrong topic; send it to {service}'s commands topic")
        if suffix is not None and suffix != COMPENSATE:
            raise _poison("type", f"{envelope.type} is an event, not a command: events go on events topics")
        if envelope.entity is None:
            raise _poison("entity", "commands must name their entity {service, type, id}: the Kafka key and "
                                    "every event derive from it")
        if envelope.message_id not in batch.fresh:
            log.info("command %s (%s) was already handled; acknowledging without effect",
                     envelope.message_id, envelope.type)
            return Outcome("duplicate")
        batch.fresh.discard(envelope.message_id)  # a second copy in this batch is a duplicate
        command_type = f"{service}.{operation}"
        if suffix == COMPENSATE:
            outcome = await self._compensate(batch, envelope, command_type)
        else:
            outcome = await self._forward(batch, envelope, command_type)
        event = outcome.event
        assert event is not None
        event_id = str(event.message_id)
        # Two compensates of one step in one batch acknowledge with the same event: emitted once (the
        # outbox would absorb the second anyway), and its receipt source repeats, so it is kept once.
        if event_id not in batch.emitted:
            batch.emitted[event_id] = payload_digest(batch.uow.emit(self.events_topic, event))
        batch.receipts.append(((self.events_topic, event_id), event_id, batch.emitted[event_id]))
        log.info("%s -> %s", envelope.type, event.type, extra={"event_id": event_id,
                                                                "entity": envelope.entity.key})
        return outcome

    async def _guarded(self, batch: _Batch, call: Awaitable[Any]) -> Any:
        """Run a handler; with savepoints, a DomainError undoes its writes but keeps the inbox row, so
        the refusal itself is recorded exactly once. Without, the batch must run again with them."""
        if batch.savepoints:
            async with batch.uow.conn.begin_nested():
                return await call
        try:
            return await call
        except DomainError as err:
            raise _RefusedWithoutSavepoint() from err

    # forward

    async def _forward(self, batch: _Batch, envelope: Envelope, command_type: str) -> Outcome:
        op = self.service.get(command_type)
        if op is None:
            known = ", ".join(self.service.operations)
            return self._rejected(envelope, command_type, UNKNOWN_OPERATION,
                                  f"{command_type} is not an operation of {self.service.name}; "
                                  f"known: {known}")
        try:
            payload = op.payload.model_validate(envelope.payload)
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
        snapshot = self.service.snapshot_reader(op.spec.entity_type)
        conn = batch.uow.conn
        try:
            before = await snapshot(conn, entity.id) if snapshot else None
            data = dict(await self._guarded(batch, op.forward(conn, payload, ctx)))
        except DomainError as err:
            return self._rejected(envelope, command_type, err.code, err.reason)
        after = await snapshot(conn, entity.id) if snapshot else None
        # The event tells everyone what changed (before -> after) and whether it can ever be undone; the
        # step row keeps only the domain data the inverse works from.
        body = {**data, "before": to_jsonable_python(before), "after": to_jsonable_python(after)}
        if op.egress:
            body["irreversible"] = True
        event = self._event(envelope, event_type(command_type, APPLIED),
                            deterministic_id(str(APPLIED), str(envelope.message_id)), body)
        event_id = str(event.message_id)
        row = StepStore.applied_row(event_id, ctx, command_type, data)
        batch.applied_rows.append(row)
        # A compensate of this step later in the same batch finds it here, before the row is written.
        batch.steps[event_id] = AppliedStep(event_id=event_id, command_id=row["command_id"],
                                            command_type=command_type, entity=entity, run_id=ctx.run_id,
                                            data=data, applied_at=ctx.received_at)
        batch.looked_up.add(event_id)
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

    async def _compensate(self, batch: _Batch, envelope: Envelope, command_type: str) -> Outcome:
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
        await self._look_up(batch, [forward_id])
        step = batch.steps.get(forward_id)
        if step is None or step.command_type != command_type:
            return self._failed(envelope, command_type, request,
                                f"{self.service.name} has no applied {command_type} step with event id "
                                f"{forward_id}: check the forward event id (only applied steps can be "
                                "undone)")
        ctx = CommandContext(envelope=envelope, entity=step.entity, received_at=self.clock(),
                             settings=self.settings)
        if forward_id in batch.compensated:
            log.info("step %s was already compensated; acknowledging again", forward_id)
            return self._compensated(envelope, command_type, request, step)
        try:
            await self._guarded(batch, op.inverse(batch.uow.conn, step, ctx))
        except DomainError as err:
            return self._failed(envelope, command_type, request, err.reason)
        batch.compensated.add(forward_id)
        batch.compensation_rows.append(StepStore.compensation_row(forward_id, ctx))
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
            # The handle span's, so the event's consumers continue the trace from the handling.
            payload=dict(payload), traceparent=tracing.current_traceparent() or command.traceparent,
        )
