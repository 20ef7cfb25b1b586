"""The unit of work: one database transaction whose outgoing messages reach the outbox only if it commits.

    async with UnitOfWork(engine) as uow:
        await uow.conn.execute(insert(documents).values(...))
        uow.emit("kinshasa.events.documents", envelope)
        await uow.commit()

`emit` only buffers; `commit()` appends the buffered messages to the outbox and commits, in the same
transaction as everything done through `uow.conn`. Leaving the block without `commit()` (an exception,
an early return, a forgotten call) rolls everything back, messages included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType
from typing import Self

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncTransaction

from kinshasa.kernel.outbox import HeadersIn, OutboxMessage, OutboxStore, SqlOutboxStore, outbox_message
from kinshasa.topics.producer import EnvelopeLike, envelope_message

log = logging.getLogger(__name__)


class UnitOfWorkError(RuntimeError):
    """A UnitOfWork was used outside its `async with` block or after it ended."""


class UnitOfWork:
    """A transaction on `engine` plus the messages it will publish (cosmicpython's unit of work)."""

    def __init__(self, engine: AsyncEngine, *, outbox: OutboxStore | None = None,
                 on_commit: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.outbox = outbox or SqlOutboxStore()
        # Called after a commit that appended messages, e.g. OutboxRelay.wake, to cut publish latency.
        self.on_commit = on_commit
        self._conn: AsyncConnection | None = None
        self._tx: AsyncTransaction | None = None
        self._messages: list[OutboxMessage] = []
        self._ids: set[object] = set()
        self._done = False
        self.appended = 0

    async def __aenter__(self) -> Self:
        if self._conn is not None or self._done:
            raise UnitOfWorkError("a UnitOfWork is single-use: create a new one for the next transaction")
        conn = await self.engine.connect()
        try:
            self._tx = await conn.begin()
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            if not self._done:
                await self.rollback()
        finally:
            if self._conn is not None:
                await self._conn.close()
                self._conn = None

    @property
    def conn(self) -> AsyncConnection:
        """The connection, inside the unit's transaction: do every domain read and write through it."""
        if self._conn is None or self._done:
            raise UnitOfWorkError("uow.conn is only usable inside `async with UnitOfWork(engine) as uow:` "
                                  "and before commit() or rollback()")
        return self._conn

    @property
    def pending_messages(self) -> tuple[OutboxMessage, ...]:
        """Messages emitted so far and not yet committed."""
        return tuple(self._messages)

    def emit(self, topic: str, envelope: EnvelopeLike) -> bytes:
        """Buffer an envelope for `topic`, keyed by its entity (or run id); it is written at commit().

        Returns the message's wire bytes, e.g. for a receipt's digest, so nobody serializes it twice.
        """
        # The producer's own envelope mapping, so relayed messages carry the same key and headers as
        # messages published directly.
        outgoing = envelope_message(topic, envelope)
        self._add(outbox_message(topic, outgoing.key, outgoing.value, envelope.message_id, outgoing.headers))
        return outgoing.value

    def emit_raw(self, topic: str, key: bytes | str | None, value: bytes | str, message_id: object,
                 headers: HeadersIn = None) -> None:
        """Buffer an already-serialized message (for messages that are not envelopes)."""
        self._add(outbox_message(topic, key, value, str(message_id), headers))

    def _add(self, message: OutboxMessage) -> None:
        if self._conn is None or self._done:
            raise UnitOfWorkError("emit() after the unit of work ended: emit inside the `async with` block, "
                                  "before commit()")
        if message.message_id in self._ids:
            raise ValueError(f"message {message.message_id} was already emitted in this unit of work: each "
                             "message needs its own message_id")
        self._ids.add(message.message_id)
        self._messages.append(message)

    async def commit(self) -> None:
        """Append the emitted messages to the outbox and commit, as one transaction."""
        conn, tx = self.conn, self._tx
        assert tx is not None
        if self._messages:
            self.appended = await self.outbox.append_many(conn, self._messages)
            if self.appended < len(self._messages):
                # Deterministic ids of a retried emission: the first emission already holds them.
                log.info("%d of %d emitted messages were already in the outbox; not appended again",
                         len(self._messages) - self.appended, len(self._messages))
        await tx.commit()
        self._done = True
        self._messages.clear()
        if self.appended and self.on_commit is not None:
            self.on_commit()

    async def rollback(self) -> None:
        """Discard the transaction and every emitted message."""
        self._messages.clear()
        self._done = True
        if self._tx is not None and self._tx.is_active:
            await self._tx.rollback()

