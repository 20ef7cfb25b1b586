"""One gateway transaction: the kernel's unit of work (state change, outbox rows, receipts: one commit)."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kinshasa.kernel import tracing
from kinshasa.kernel.receipts import ReceiptChain, Source, payload_digest
from kinshasa.kernel.unit_of_work import UnitOfWork
from kinshasa.schemas.envelope import Envelope
from kinshasa.topics.catalogue import PREFIX

# The gateway's own receipt chain: one receipt per message it emits, whatever the path (agent write,
# release, approval, revert request, discard, alert).
RECEIPTS = ReceiptChain("gateway")
_COMMANDS_TOPICS = f"{PREFIX}.commands."


def receipt_source(topic: str, envelope: Envelope) -> Source:
    """Where an emission came from: a command is its run and command id (the commands table's row);
    anything else its topic, its run and its own message id."""
    # A message about no run (a component's durability alert) has no run id: "" says so.
    run_id = envelope.run_id or ""
    if topic.startswith(_COMMANDS_TOPICS):
        return ("command", run_id, str(envelope.message_id))
    return (topic, run_id, str(envelope.message_id))


class Tx(Protocol):
    """What gateway logic needs of a transaction: its connection and an outbox to emit into."""

    @property
    def conn(self) -> AsyncConnection: ...

    async def emit(self, topic: str, envelope: Envelope) -> None: ...

    async def emit_serialised(self, topic: str, envelope: Envelope, wire: bytes) -> None: ...


@dataclass(frozen=True)
class Serialised:
    """An envelope with its wire form computed once; the producer's own mapping reads the rest."""

    envelope: Envelope
    wire: bytes

    @property
    def message_id(self) -> UUID:
        return self.envelope.message_id

    @property
    def type(self) -> str:
        return self.envelope.type

    @property
    def traceparent(self) -> str | None:
        return self.envelope.traceparent

    def kafka_key(self) -> bytes:
        return self.envelope.kafka_key()

    def to_bytes(self) -> bytes:
        return self.wire


class GatewayTx:
    """Adapts the kernel UnitOfWork to `Tx`; emitted envelopes are published by the relay after commit.

    Every emission also gets its receipt in the gateway's chain, appended at `commit()` in one statement
    for the whole transaction (a group commit of 256 writes appends 256 receipts at once).
    """

    def __init__(self, uow: Any) -> None:
        self._uow = uow
        self.emitted = 0
        self._receipts: list[tuple[Source, str, str]] = []

    @property
    def conn(self) -> AsyncConnection:
        conn: AsyncConnection = self._uow.conn
        return conn

    async def emit(self, topic: str, envelope: Envelope) -> None:
        if envelope.traceparent is None and (traceparent := tracing.current_traceparent()) is not None:
            # Run facts (a revert request among them) join the trace of the request that caused them.
            envelope = envelope.model_copy(update={"traceparent": traceparent})
        result = self._uow.emit(topic, envelope)
        if inspect.isawaitable(result):
            result = await result
        self._note(topic, envelope, result if isinstance(result, bytes) else envelope.to_bytes())

    async def emit_serialised(self, topic: str, envelope: Envelope, wire: bytes) -> None:
        """Emit an envelope whose `to_bytes()` the caller already has (the command row stores it too)."""
        result = self._uow.emit(topic, Serialised(envelope, wire))
        if inspect.isawaitable(result):
            await result
        self._note(topic, envelope, wire)

    def _note(self, topic: str, envelope: Envelope, wire: bytes) -> None:
        self._receipts.append((receipt_source(topic, envelope), str(envelope.message_id),
                               payload_digest(wire)))
        self.emitted += 1

    async def commit(self) -> None:
        if self._receipts:
            await RECEIPTS.append_many(self.conn, self._receipts)
            self._receipts = []
        await self._uow.commit()


@asynccontextmanager
async def transaction(
    engine: AsyncEngine, on_commit: Callable[[], None] | None = None
) -> AsyncIterator[GatewayTx]:
    """Yield a transaction that rolls back unless `commit()` is called; `on_commit` wakes the relay."""
    async with UnitOfWork(engine, on_commit=on_commit) as uow:
        yield GatewayTx(uow)
