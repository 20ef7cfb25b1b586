"""Append-only storage for services: versioned entity tables and the record of applied forward steps.

Nothing here ever updates or deletes a row (the database refuses it, see `kit.install`): an
update is a new version, a delete is a tombstone version, a compensation is a row of its own. The
current state of an entity is the newest version.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    and_,
    bindparam,
    event,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.schema import SchemaItem

# The one clock helper; `utc` is its name in the kit's public API (`kinshasa.services.kit.utc`).
from kinshasa.schemas.clock import as_utc as utc
from kinshasa.schemas.envelope import EntityRef
from kinshasa.services.kit.context import AppliedStep, CommandContext

ID = String(128)
# Ids per IN (...) lookup: well inside SQLite's and PostgreSQL's bound-parameter limits.
_IN_CHUNK = 500
MESSAGE_ID = String(36)
STAMP_COLUMNS = ("run_id", "command_id", "actor", "recorded_at")


# First key of the two-int PostgreSQL advisory locks the kit takes, distinct from the kernel's namespaces.
_INVARIANT_LOCK_NS = 0x4B4E0102


async def serialize_on(conn: AsyncConnection, *parts: str) -> None:
    """Serialise, until commit, every transaction that checks an invariant spanning several entities.

    Commands for one entity arrive in order on one partition, so per-entity checks need no lock. An
    invariant over several entities (no two active links with the same ends) can be checked by two
    replicas at once on PostgreSQL; both take this lock on the same parts first. SQLite needs nothing:
    every transaction there already holds the database's write lock.
    """
    if conn.dialect.name != "postgresql":
        return
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=4).digest()
    await conn.execute(text("SELECT pg_advisory_xact_lock(:ns, :k)"),
                       {"ns": _INVARIANT_LOCK_NS, "k": int.from_bytes(digest, "big", signed=True)})
    # Reads from before the lock may predate a commit it waited for: read again after it.
    reads = conn.info.get(_BATCH_READS)
    if reads is not None:
        reads.forget()


def _stamp_columns() -> list[Column[Any]]:
    return [
        Column("run_id", String(256), nullable=True),
        Column("command_id", MESSAGE_ID, nullable=False),
        Column("actor", String(300), nullable=False),
        Column("recorded_at", DateTime(timezone=True), nullable=False),
    ]


def versioned_table(name: str, metadata: MetaData, key: str, *columns: SchemaItem) -> Table:
    """An append-only table of entity versions: (key, version) plus the domain columns and provenance.

    `columns` are the domain columns (and any extra indexes or constraints) of the entity.

    Every row names the run, command and actor that wrote it, so "everything run X touched" is a query.
    """
    return Table(
        name,
        metadata,
        Column(key, ID, nullable=False),
        Column("version", Integer, nullable=False, autoincrement=False),
        *columns,
        *_stamp_columns(),
        PrimaryKeyConstraint(key, "version", name=f"pk_{name}"),
        Index(f"ix_{name}_run_id", "run_id"),
    )


class _Unread:
    """Marks an `after` argument left out: the current version has not been read by the caller."""


UNREAD = _Unread()


def _row(mapping: Mapping[Any, Any]) -> dict[str, Any]:
    row = dict(mapping)
    if isinstance(row.get("recorded_at"), datetime):
        row["recorded_at"] = utc(row["recorded_at"])
    return row


# Where a command batch's reads of current versions live: in the info of its transaction's connection.
_BATCH_READS = "kinshasa.kit.batch_reads"


class _BatchReads:
    """The current versions read so far in one command batch's transaction, by (table, entity id).

    Every entry is what the database returned inside the transaction, None meaning no version; an
    append keeps the row its INSERT returned, so the version written is what the database stored, never
    a guess. The first read of a table fetches every entity the batch names in one query.
    """

    def __init__(self) -> None:
        self.entity_ids: set[str] = set()
        self.rows: dict[tuple[str, str], dict[str, Any] | None] = {}
        self.fetched: set[str] = set()  # tables whose rows for `entity_ids` are in `rows`

    def forget(self) -> None:
        self.rows.clear()
        self.fetched.clear()


@contextmanager
def batch_reads(conn: AsyncConnection, entity_ids: Iterable[str] = ()) -> Iterator[None]:
    """Within the block, `Versions.current` on `conn` reads each entity once: the first read of a table
    fetches the current version of every id in `entity_ids` (and of those `expect_entities` adds).

    Safe for exactly one transaction's reads: the kit opens it around a command batch. A rolled-back
    savepoint forgets everything read, since what was read inside it may be gone, and so does
    `serialize_on`, since what was read before its lock may be older than what the lock waited for.
    Rows are copied out, nested values too, so a caller that changes one changes nothing cached.
    """
    info = conn.info
    reads = _BatchReads()
    reads.entity_ids.update(entity_ids)
    info[_BATCH_READS] = reads
    sync = conn.sync_connection
    assert sync is not None  # `info` above has already refused a connection that is not open

    def forget(*_: Any) -> None:
        reads.forget()

    event.listen(sync, "rollback_savepoint", forget)
    try:
        yield
    finally:
        event.remove(sync, "rollback_savepoint", forget)
        if info.get(_BATCH_READS) is reads:
            del info[_BATCH_READS]


def expect_entities(conn: AsyncConnection, entity_ids: Iterable[str]) -> None:
    """Add ids to what the open `batch_reads` fetches with a table's first read (no-op outside one)."""
    reads = conn.info.get(_BATCH_READS)
    if reads is not None:
        reads.entity_ids.update(entity_ids)


class Versions:
    """Reads and appends the versions of one versioned table; the newest version is the current state.

    Inside a command batch (the kit runs handlers in `batch_reads`), `current` reads each entity at
    most once per transaction, and the batch's entities in one query per table. So write versions
    through `append`, which tells that cache: a row inserted into a versioned table any other way
    would not be seen by a later `current` of the same batch.
    """

    def __init__(self, table: Table, key: str) -> None:
        self.table = table
        self.key = key
        self._key_col = table.c[key]
        # Built once: these run for nearly every command, and building a statement costs more than
        # executing its cached compiled form.
        self._current = (select(table).where(self._key_col == bindparam("entity_id"))
                         .order_by(table.c.version.desc()).limit(1))
        newest = (select(self._key_col.label("k"), func.max(table.c.version).label("v"))
                  .where(self._key_col.in_(bindparam("entity_ids", expanding=True)))
                  .group_by(self._key_col).subquery())
        self._current_many = select(table).join(
            newest, and_(self._key_col == newest.c.k, table.c.version == newest.c.v))
        self._insert = insert(table)
        self._insert_returning = insert(table).returning(*table.c)

    async def current(self, conn: AsyncConnection, entity_id: str) -> dict[str, Any] | None:
        """The newest version of `entity_id`, tombstones included, or None if it never existed."""
        reads: _BatchReads | None = conn.info.get(_BATCH_READS)
        if reads is None:
            return await self._read(conn, entity_id)
        name = self.table.fullname
        if name not in reads.fetched:
            reads.fetched.add(name)
            found = await self.current_many(conn, reads.entity_ids)
            for wanted in reads.entity_ids:
                reads.rows[name, wanted] = found.get(wanted)
        if (name, entity_id) not in reads.rows:
            reads.rows[name, entity_id] = await self._read(conn, entity_id)
        row = reads.rows[name, entity_id]
        return None if row is None else {k: copy.deepcopy(v) if isinstance(v, dict | list) else v
                                         for k, v in row.items()}

    async def current_many(self, conn: AsyncConnection,
                           entity_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The newest version of each of `entity_ids` that exists, by id, in one query per 500 ids."""
        wanted = sorted(set(entity_ids))
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(wanted), _IN_CHUNK):
            rows = (await conn.execute(self._current_many,
                                       {"entity_ids": wanted[start:start + _IN_CHUNK]})).mappings()
            for row in rows:
                found[row[self.key]] = _row(row)
        return found

    async def _read(self, conn: AsyncConnection, entity_id: str) -> dict[str, Any] | None:
        row = (await conn.execute(self._current, {"entity_id": entity_id})).mappings().first()
        return None if row is None else _row(row)

    async def history(self, conn: AsyncConnection, entity_id: str) -> list[dict[str, Any]]:
        """Every version of `entity_id`, oldest first."""
        rows = (await conn.execute(
            select(self.table).where(self._key_col == entity_id).order_by(self.table.c.version)
        )).mappings().all()
        return [_row(r) for r in rows]

    async def all_current(self, conn: AsyncConnection, *where: Any) -> list[dict[str, Any]]:
        """The newest version of every entity, ordered by key.

        `where` narrows the entities; it must hold for all versions of an entity or for none (filter on
        columns a new version never changes, such as a link's ends, or on provenance).
        """
        latest = select(self._key_col.label("k"), func.max(self.table.c.version).label("v"))
        if where:
            latest = latest.where(*where)
        sub = latest.group_by(self._key_col).subquery()
        rows = (await conn.execute(
            select(self.table)
            .join(sub, and_(self._key_col == sub.c.k, self.table.c.version == sub.c.v))
            .order_by(self._key_col)
        )).mappings().all()
        return [_row(r) for r in rows]

    async def append(self, conn: AsyncConnection, entity_id: str, ctx: CommandContext,
                     after: Mapping[str, Any] | _Unread | None = UNREAD, **values: Any) -> dict[str, Any]:
        """Write the next version of `entity_id` with `values`; returns the row written.

        `after` is the current version the caller already read in this transaction (None: the entity
        does not exist yet), which saves reading it again. The (key, version) primary key makes two
        concurrent writers of one entity collide instead of both succeeding; the loser's transaction
        fails and its message is retried.
        """
        current = await self.current(conn, entity_id) if isinstance(after, _Unread) else after
        if current is not None and current[self.key] != entity_id:
            raise ValueError(f"`after` is a version of {current[self.key]!r}, not of {entity_id!r}")
        row = {self.key: entity_id, "version": 1 if current is None else current["version"] + 1,
               **values, **ctx.stamp()}
        reads: _BatchReads | None = conn.info.get(_BATCH_READS)
        if reads is None:
            await conn.execute(self._insert, row)
        else:
            # The version as the database stored it (its column types), for the batch's next read.
            written = (await conn.execute(self._insert_returning, row)).mappings().one()
            reads.rows[self.table.fullname, entity_id] = _row(written)
        return row


class StepStore:
    """The service's own record of applied forward steps and of their compensations.

    The coordinator names only a forward event id; this is where the service finds what that step
    did (its domain data) and whether it was already undone. A compensation is a separate row, never
    a flag updated in place; the primary key on `forward_event_id` makes undoing a step twice impossible.
    """

    def __init__(self, service: str, metadata: MetaData) -> None:
        self.service = service
        self.steps = Table(
            f"{service}_applied_steps",
            metadata,
            Column("event_id", MESSAGE_ID, primary_key=True),
            # Unique: a command is applied at most once, whatever the broker redelivers.
            Column("command_id", MESSAGE_ID, nullable=False, unique=True),
            Column("command_type", String(200), nullable=False),
            Column("entity_type", String(256), nullable=False),
            Column("entity_id", String(256), nullable=False),
            Column("run_id", String(256), nullable=True),
            Column("actor", String(300), nullable=False),
            Column("data", JSON, nullable=False),
            Column("applied_at", DateTime(timezone=True), nullable=False),
            Index(f"ix_{service}_applied_steps_run_id", "run_id"),
        )
        self.compensations = Table(
            f"{service}_compensations",
            metadata,
            Column("forward_event_id", MESSAGE_ID, primary_key=True),
            Column("compensate_command_id", MESSAGE_ID, nullable=False),
            Column("run_id", String(256), nullable=True),
            Column("actor", String(300), nullable=False),
            Column("compensated_at", DateTime(timezone=True), nullable=False),
        )

    @property
    def tables(self) -> tuple[Table, Table]:
        return (self.steps, self.compensations)

    @staticmethod
    def applied_row(event_id: str, ctx: CommandContext, command_type: str,
                    data: Mapping[str, Any]) -> dict[str, Any]:
        """The steps row recording that the command of `ctx` applied as event `event_id`."""
        return {"event_id": event_id, "command_id": ctx.command_id, "command_type": command_type,
                "entity_type": ctx.entity.type, "entity_id": ctx.entity.id, "run_id": ctx.run_id,
                "actor": ctx.stamp()["actor"], "data": dict(data), "applied_at": ctx.received_at}

    @staticmethod
    def compensation_row(event_id: str, ctx: CommandContext) -> dict[str, Any]:
        """The compensations row recording that the compensate command of `ctx` undid step `event_id`."""
        return {"forward_event_id": event_id, "compensate_command_id": ctx.command_id,
                "run_id": ctx.run_id, "actor": ctx.stamp()["actor"], "compensated_at": ctx.received_at}

    async def insert_rows(self, conn: AsyncConnection, *, applied: Sequence[Mapping[str, Any]] = (),
                          compensations: Sequence[Mapping[str, Any]] = ()) -> None:
        """Insert step and compensation rows, one statement per table."""
        if applied:
            await conn.execute(insert(self.steps), list(applied))
        if compensations:
            await conn.execute(insert(self.compensations), list(compensations))

    def _step(self, row: Any) -> AppliedStep:
        return AppliedStep(
            event_id=row["event_id"], command_id=row["command_id"], command_type=row["command_type"],
            entity=EntityRef(service=self.service, type=row["entity_type"], id=row["entity_id"]),
            run_id=row["run_id"], data=dict(row["data"]), applied_at=utc(row["applied_at"]),
        )

    async def get_many(self, conn: AsyncConnection, event_ids: Iterable[str]) -> dict[str, AppliedStep]:
        """The applied steps among `event_ids`, by event id (ids with no step are left out)."""
        ids = list(dict.fromkeys(event_ids))
        found: dict[str, AppliedStep] = {}
        for start in range(0, len(ids), _IN_CHUNK):
            rows = (await conn.execute(select(self.steps).where(
                self.steps.c.event_id.in_(ids[start:start + _IN_CHUNK])))).mappings().all()
            found.update((row["event_id"], self._step(row)) for row in rows)
        return found

    async def compensated_among(self, conn: AsyncConnection, event_ids: Iterable[str]) -> set[str]:
        """The step event ids among `event_ids` that have a compensation row."""
        ids = list(dict.fromkeys(event_ids))
        done: set[str] = set()
        column = self.compensations.c.forward_event_id
        for start in range(0, len(ids), _IN_CHUNK):
            done.update((await conn.execute(
                select(column).where(column.in_(ids[start:start + _IN_CHUNK])))).scalars())
        return done

    async def operations_of(self, conn: AsyncConnection, command_ids: Iterable[str]) -> dict[str, str]:
        """The command type each command id applied (`<type>.compensate` for a compensation), by id."""
        ids = [i for i in dict.fromkeys(command_ids) if i]
        found: dict[str, str] = {}
        steps, undone = self.steps, self.compensations
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start:start + _IN_CHUNK]
            for command_id, command_type in (await conn.execute(select(
                    steps.c.command_id, steps.c.command_type).where(steps.c.command_id.in_(chunk)))).all():
                found[command_id] = command_type
            for command_id, command_type in (await conn.execute(
                    select(undone.c.compensate_command_id, steps.c.command_type)
                    .join(steps, steps.c.event_id == undone.c.forward_event_id)
                    .where(undone.c.compensate_command_id.in_(chunk)))).all():
                found[command_id] = f"{command_type}.compensate"
        return found

    async def applied_count(self, conn: AsyncConnection) -> int:
        return int((await conn.execute(select(func.count()).select_from(self.steps))).scalar_one())
