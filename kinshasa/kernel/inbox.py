"""The idempotent inbox: one row per (consumer group, message_id), written in the effect's own transaction.

A consumer calls `Inbox.record(conn, group, message_id)` inside the transaction that applies the
message's effect. True means "first time: apply it"; False means the row already exists, i.e. the
message was processed before (a redelivery) and the effect must be skipped. The row and the effect
commit or roll back together, so a message has its effect exactly once however often Kafka delivers it.

The duplicate is absorbed with `INSERT ... ON CONFLICT DO NOTHING`, not by catching an IntegrityError:
on PostgreSQL an error aborts the whole transaction, and the caller's other work must still commit.
Two transactions recording the same message at once serialise on the primary key: the second waits
and then sees False if the first committed, True if it rolled back.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import Column, DateTime, PrimaryKeyConstraint, String, Table, Uuid, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from kinshasa.kernel.tables import kernel_metadata
from kinshasa.schemas.clock import utcnow

inbox = Table(
    "inbox",
    kernel_metadata,
    Column("consumer_group", String(200), nullable=False),
    Column("message_id", Uuid(as_uuid=True), nullable=False),
    Column("processed_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("consumer_group", "message_id", name="pk_inbox"),
)


# One statement per dialect, built once: the ids recorded now come back (a seen one conflicts, unreturned).
_RECORD_SQLITE = sqlite.insert(inbox).on_conflict_do_nothing().returning(inbox.c.message_id)
_RECORD_POSTGRES = postgresql.insert(inbox).on_conflict_do_nothing().returning(inbox.c.message_id)


class InboxError(ValueError):
    """An inbox call was given an id or group it cannot record."""


def _message_uuid(message_id: uuid.UUID | str) -> uuid.UUID:
    if isinstance(message_id, uuid.UUID):
        return message_id
    try:
        return uuid.UUID(str(message_id))
    except ValueError:
        raise InboxError(f"message_id {message_id!r} is not a UUID: pass the envelope's message_id") from None


class Inbox:
    """Tracking rows that make a consumer's effects idempotent."""

    async def record(self, conn: AsyncConnection, group: str, message_id: uuid.UUID | str) -> bool:
        """Mark `message_id` processed by `group` in the caller's transaction; False if it already was."""
        return _message_uuid(message_id) in await self.record_many(conn, group, [message_id])

    async def record_many(self, conn: AsyncConnection, group: str,
                          message_ids: Iterable[uuid.UUID | str]) -> set[uuid.UUID]:
        """`record` for several messages in one statement; returns the ids recorded now (first time).

        An id listed twice is recorded once: the caller applies its first occurrence only.
        """
        if not group:
            raise InboxError("consumer group is empty: pass the Kafka group id of the consuming component")
        ids = list(dict.fromkeys(_message_uuid(m) for m in message_ids))
        if not ids:
            return set()
        now = utcnow()
        stmt = _RECORD_POSTGRES if conn.dialect.name == "postgresql" else _RECORD_SQLITE
        rows = [{"consumer_group": group, "message_id": m, "processed_at": now} for m in ids]
        # The rows as parameters, not as `values(rows)`: a statement holding its values has no cache key, so
        # it was compiled again for every message. SQLAlchemy sends them as multi-row INSERTs, in pages
        # within each database's bound-parameter limit.
        return set((await conn.execute(stmt, rows)).scalars())

    async def seen(self, conn: AsyncConnection, group: str, message_id: uuid.UUID | str) -> bool:
        """Whether `group` has processed `message_id` (a read; use `record` to claim it)."""
        row = (await conn.execute(
            select(inbox.c.message_id).where(inbox.c.consumer_group == group,
                                             inbox.c.message_id == _message_uuid(message_id))
        )).first()
        return row is not None

    async def prune(self, conn: AsyncConnection, *, processed_before: datetime) -> int:
        """Forget rows older than any redelivery can be (e.g. the topic's retention); returns the count."""
        result = await conn.execute(
            delete(inbox).where(inbox.c.processed_at < processed_before).returning(inbox.c.message_id))
        return len(result.all())


_default = Inbox()


async def record(conn: AsyncConnection, group: str, message_id: uuid.UUID | str) -> bool:
    """`Inbox().record(...)`: True the first time, False for a message already processed by `group`."""
    return await _default.record(conn, group, message_id)
