"""The transactional outbox: messages committed with the domain write that caused them, relayed later.

A component never publishes to Kafka from a handler. It appends the message to the `outbox` table in
the same transaction as its domain write (`OutboxStore.append`, or `UnitOfWork.emit` + `commit`), so
the message exists exactly when the write does. `kinshasa.kernel.relay.OutboxRelay` then claims pending
rows, publishes them and marks them published. A row the broker keeps refusing for a reason of its own
(too large, unknown topic: `kinshasa.kernel.failures.classify_publish_error`) ends in the `dead` state,
the component's dead-letter queue (`dead_rows`, `requeue_dead`); an unavailable broker never makes a row
dead. A dead row blocks its key: the key's later rows wait until an operator requeues it.

Ordering. Rows are ordered by `seq`. The relay publishes the rows of one Kafka key in `seq` order (see
the relay's docstring for how), which is only meaningful if, per key, `seq` order is commit order. SQLite
has one writer at a time, so it is. On PostgreSQL a sequence value is taken at INSERT, not at COMMIT, so
two transactions appending for the same key could commit in the opposite order of their `seq`; `append`
therefore takes a transaction-scoped advisory lock per key before inserting, which serialises the
writers of one key until commit. Append at the end of the transaction (as `UnitOfWork.commit` does) so
that lock is held briefly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    ColumnElement,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    Uuid,
    all_,
    any_,
    bindparam,
    delete,
    exists,
    false,
    func,
    literal_column,
    select,
    text,
    type_coerce,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kinshasa.kernel.tables import kernel_metadata
from kinshasa.schemas.clock import as_utc, utcnow

PENDING = "pending"
PUBLISHED = "published"
DEAD = "dead"
STATUSES = (PENDING, PUBLISHED, DEAD)

# Namespaces (first key) of PostgreSQL's two-int advisory locks, so Kinshasa's locks never meet an
# application's. Appenders and relays use different ones: a relay publishing key K must not block a
# handler appending a new row for K.
APPEND_LOCK_NS = 0x4B4E0001
RELAY_LOCK_NS = 0x4B4E0002

# How many candidate rounds a PostgreSQL claim makes when other relays own the oldest keys.
_CLAIM_ROUNDS = 3

outbox = Table(
    "outbox",
    kernel_metadata,
    # BIGINT on PostgreSQL; plain INTEGER on SQLite, where only INTEGER PRIMARY KEY aliases the rowid.
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("message_id", Uuid(as_uuid=True), nullable=False, unique=True),
    Column("topic", String(249), nullable=False),
    # The Kafka key exactly as published; rows of one key are published in seq order.
    Column("key", LargeBinary, nullable=True),
    # The key as text (`service:id`), for operators and the DLQ view; never used for ordering.
    Column("entity_key", String(512), nullable=True),
    Column("value", LargeBinary, nullable=False),
    # [[name, value], ...]: a list, not an object, because Kafka headers are ordered and may repeat.
    Column("headers", JSON, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("status", String(16), nullable=False, server_default=PENDING),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_error", Text, nullable=True),
    Column("published_at", DateTime(timezone=True), nullable=True),
    # The relay that last published or attempted the row: which process to look at when it is stuck.
    Column("relay_id", String(200), nullable=True),
    CheckConstraint(f"status IN ('{PENDING}', '{PUBLISHED}', '{DEAD}')", name="status"),
    # AUTOINCREMENT keeps SQLite from reusing the seq of a pruned row.
    sqlite_autoincrement=True,
    # A queue table: every row is updated once and pruned later. Vacuum and analyze it far more often
    # than PostgreSQL's defaults (20% / 10% of the table) so the partial indexes stay small and plans
    # follow the backlog.
    postgresql_with={"autovacuum_vacuum_scale_factor": "0.02", "autovacuum_analyze_scale_factor": "0.02"},
)

# Partial indexes keep the relay's scans proportional to the backlog, not to the table's history of
# published rows. Queries spell the status as a literal (`_status_is`) so a prepared, generic plan can
# still prove it may use them.
_PENDING_WHERE = text(f"status = '{PENDING}'")
_DEAD_WHERE = text(f"status = '{DEAD}'")
Index("ix_outbox_pending_seq", outbox.c.seq, postgresql_where=_PENDING_WHERE, sqlite_where=_PENDING_WHERE)
Index("ix_outbox_pending_key_seq", outbox.c.key, outbox.c.seq,
      postgresql_where=_PENDING_WHERE, sqlite_where=_PENDING_WHERE)
# Pending rows by retry time: every claim looks up the few in backoff (next_attempt_at > now).
Index("ix_outbox_pending_next_attempt", outbox.c.next_attempt_at,
      postgresql_where=_PENDING_WHERE, sqlite_where=_PENDING_WHERE)
Index("ix_outbox_dead_seq", outbox.c.seq, postgresql_where=_DEAD_WHERE, sqlite_where=_DEAD_WHERE)

HeaderPairs = tuple[tuple[str, str], ...]
HeadersIn = Mapping[str, str | bytes] | Sequence[tuple[str, str | bytes]] | None


class OutboxError(ValueError):
    """An outbox call was given something it cannot store."""


@dataclass(frozen=True)
class OutboxMessage:
    """One message to append: where it goes, its key and its serialized envelope."""

    topic: str
    key: bytes | None
    value: bytes
    message_id: uuid.UUID
    headers: HeaderPairs = ()
    entity_key: str | None = None


@dataclass(frozen=True)
class OutboxRow:
    """One stored outbox row."""

    seq: int
    message_id: uuid.UUID
    topic: str
    key: bytes | None
    entity_key: str | None
    value: bytes
    headers: HeaderPairs
    status: str
    attempts: int
    created_at: datetime
    next_attempt_at: datetime
    last_error: str | None
    published_at: datetime | None
    relay_id: str | None


class ClaimedRow(NamedTuple):
    """What the relay needs of a row it is about to publish (no timestamps: parsing them costs per row).

    A named tuple rather than a dataclass: the relay makes thousands a second, and a tuple is built in a
    third of the time."""

    seq: int
    message_id: uuid.UUID
    topic: str
    key: bytes | None
    entity_key: str | None
    value: bytes
    headers: HeaderPairs
    attempts: int


# The columns of a ClaimedRow, in its field order.
_CLAIM_COLUMNS = [outbox.c.seq, outbox.c.message_id, outbox.c.topic, outbox.c.key, outbox.c.entity_key,
                  outbox.c.value, outbox.c.headers, outbox.c.attempts]
# The same on SQLite, every column as stored (the message id as hex text, the headers as JSON text):
# `_claimed_sqlite` converts them in one step each, where the column types' per-value processing cost
# 3.5 us a row, as much as the query.
_SQLITE_CLAIM_COLUMNS = [type_coerce(c, Text) if c.name in ("message_id", "headers") else c
                         for c in _CLAIM_COLUMNS]


def _claimed(r: Any) -> ClaimedRow:
    seq, message_id, topic, key, entity_key, value, headers, attempts = r
    return ClaimedRow(int(seq), message_id, topic, key, entity_key, bytes(value),
                      tuple((str(k), str(v)) for k, v in (headers or ())), int(attempts))


def _claimed_sqlite(r: Any) -> ClaimedRow:
    seq, message_id, topic, key, entity_key, value, headers, attempts = r
    # `append_many` stores headers as a JSON list of [name, value] text pairs, or JSON null.
    return ClaimedRow(seq, uuid.UUID(hex=message_id), topic, key, entity_key, value,
                      tuple(map(tuple, json.loads(headers) or ())) if headers else (), attempts)


@dataclass(frozen=True)
class FailedAttempt:
    """What the relay records for a row whose publish failed: the new attempt count and when to retry."""

    seq: int
    attempts: int
    next_attempt_at: datetime
    error: str
    dead: bool


@dataclass(frozen=True)
class OutboxBacklog:
    """Metrics of the outbox: unpublished rows, age of the oldest one (None when empty), dead rows."""

    pending: int
    oldest_age_s: float | None
    dead: int


def key_lock_id(key: bytes) -> int:
    """A stable signed 32-bit hash of a Kafka key, the second half of a two-int advisory lock.

    Two keys may share a hash; that only makes them wait for each other, never breaks an order.
    """
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "big", signed=True)


def _status_is(status: str, table: Any = outbox) -> ColumnElement[bool]:
    if status not in STATUSES:
        raise ValueError(f"unknown outbox status {status!r}")
    return table.c.status == literal_column(f"'{status}'")


def normalise_headers(headers: HeadersIn) -> HeaderPairs:
    """Headers as ordered (name, value) text pairs; bytes values must be UTF-8."""
    if headers is None:
        return ()
    pairs: Iterable[tuple[Any, Any]] = headers.items() if isinstance(headers, Mapping) else headers
    out: list[tuple[str, str]] = []
    for name, value in pairs:
        if isinstance(value, bytes):
            try:
                value = value.decode()
            except UnicodeDecodeError:
                raise OutboxError(
                    f"header {name!r} is not UTF-8 text: outbox headers are stored as JSON text; put binary "
                    "data in the envelope payload instead") from None
        if not isinstance(name, str) or not isinstance(value, str):
            raise OutboxError(f"header {name!r}={value!r}: header names and values must be str")
        out.append((name, value))
    return tuple(out)


def outbox_message(topic: str, key: bytes | str | None, value: bytes | str, message_id: uuid.UUID | str,
                   headers: HeadersIn = None, *, entity_key: str | None = None) -> OutboxMessage:
    """Check and normalise what a caller wants to append."""
    if not topic:
        raise OutboxError("topic is empty: pass the catalogue's topic name for this message")
    key_bytes = key.encode() if isinstance(key, str) else key
    value_bytes = value.encode() if isinstance(value, str) else value
    if entity_key is None and key_bytes is not None:
        try:
            entity_key = key_bytes.decode()
        except UnicodeDecodeError:
            entity_key = None
    try:
        mid = message_id if isinstance(message_id, uuid.UUID) else uuid.UUID(str(message_id))
    except ValueError:
        raise OutboxError(f"message_id {message_id!r} is not a UUID: use the envelope's message_id") from None
    return OutboxMessage(topic, key_bytes, value_bytes, mid, normalise_headers(headers), entity_key)


def _json_values(name: str) -> Any:
    """SQLite: the values of the JSON array bound as `name`, as a subquery (`json_each`)."""
    return select(func.json_each(bindparam(name, type_=Text)).table_valued("value").c.value).scalar_subquery()


def _seq_in(dialect: str) -> ColumnElement[bool]:
    """`seq` is one of the list bound as "seqs" (`_seqs_param`)."""
    if dialect == "postgresql":
        return outbox.c.seq == any_(bindparam("seqs", type_=postgresql.ARRAY(BigInteger)))
    return outbox.c.seq.in_(_json_values("seqs"))


def _seqs_param(dialect: str, seqs: Iterable[int]) -> Any:
    """Seqs bound as one parameter, so a statement's text is the same for every batch (it is prepared and
    cached once, where a list of thousands of parameters was a new statement to build every time): an
    array on PostgreSQL, a JSON array on SQLite."""
    if dialect == "postgresql":
        return list(seqs)
    return json.dumps(list(seqs))


def _keys_param(keys: Iterable[bytes]) -> str:
    """SQLite: keys bound as one JSON array of their hex (upper case, as SQLite's `hex()` writes it)."""
    return json.dumps([key.hex().upper() for key in keys])


# The relay's statements, built once and run with parameters: building and cache-keying a statement
# cost more than executing it on a small backlog, and the relay runs them after every commit.
_NOW = bindparam("c_now", type_=outbox.c.next_attempt_at.type)
_KEYS = postgresql.ARRAY(LargeBinary)
_SEQS = postgresql.ARRAY(BigInteger)
_NARROW_COLUMNS = [outbox.c.seq, outbox.c.key, outbox.c.topic,
                   (outbox.c.next_attempt_at <= _NOW).label("due")]


@functools.cache
def _candidates(narrow: bool, *, after: bool, lock: bool) -> Any:
    """Pending, due rows, oldest first, leaving out every row behind a row of its key in backoff or dead.

    Parameters: c_now, c_limit, c_busy (keys to leave out), c_skip (seqs to leave out); c_after (seq
    greater than) if `after`. `narrow` selects seq, key, topic and due; otherwise the ClaimedRow columns.
    `lock` means PostgreSQL: FOR UPDATE SKIP LOCKED, and c_busy and c_skip are arrays; otherwise
    (SQLite) they are JSON arrays.
    """
    # The keys in backoff and where their wait starts, computed once (few rows, through the partial
    # index on next_attempt_at) rather than probed per candidate: a per-row probe walks every earlier
    # row of the key, which is quadratic for a hot key. MATERIALIZED keeps PostgreSQL from inlining it.
    # No GROUP BY: grouping would steer SQLite onto the (key, seq) index, a scan of every pending row.
    # A dead row blocks its key too, until an operator requeues it: the key's later rows must not
    # overtake it. Two arms, each on its partial index (dead rows are few), rather than an OR that
    # would scan the table.
    blocked = (union_all(
        select(outbox.c.key, outbox.c.seq)
        .where(_status_is(PENDING), outbox.c.next_attempt_at > _NOW, outbox.c.key.is_not(None)),
        select(outbox.c.key, outbox.c.seq).where(_status_is(DEAD), outbox.c.key.is_not(None)))
               .cte("blocked")
               .prefix_with("MATERIALIZED"))
    behind_backoff = exists().where(blocked.c.key == outbox.c.key, blocked.c.seq < outbox.c.seq)
    # SQLite reads the whole rows only for the seqs the filter chose: filtering while reading them made
    # a claim of 2,000 rows take 9.5 ms of the database's time instead of 4.2 (measured on 20,000).
    wide_after = not narrow and not lock
    stmt = (select(*(_NARROW_COLUMNS if narrow else [outbox.c.seq] if wide_after else _CLAIM_COLUMNS))
            .where(_status_is(PENDING), outbox.c.next_attempt_at <= _NOW, ~behind_backoff)
            .order_by(outbox.c.seq)
            .limit(bindparam("c_limit", type_=Integer)))
    if after:
        stmt = stmt.where(outbox.c.seq > bindparam("c_after", type_=BigInteger))
    # The keys and seqs to leave out are one parameter each, always present (empty when there are none),
    # so the statement text never changes: it is prepared once per connection, where a list of thousands
    # of parameters was a new statement to build, parse and prepare every claim.
    if lock:
        # PostgreSQL: arrays. The claim plans each execution for its arrays (force_custom_plan), so NOT
        # IN is a hash lookup.
        stmt = stmt.where(
            outbox.c.key.is_(None) | (outbox.c.key != all_(bindparam("c_busy", type_=_KEYS))),
            outbox.c.seq != all_(bindparam("c_skip", type_=_SEQS)))
        return stmt.with_for_update(skip_locked=True, of=outbox)
    # SQLite: the same, each a JSON array (`_keys_param`, `_seqs_param`).
    stmt = stmt.where(outbox.c.key.is_(None) | func.hex(outbox.c.key).not_in(_json_values("c_busy")),
                      outbox.c.seq.not_in(_json_values("c_skip")))
    if wide_after:
        return (select(*_SQLITE_CLAIM_COLUMNS).where(outbox.c.seq.in_(stmt.scalar_subquery()))
                .order_by(outbox.c.seq))
    return stmt


# The owned keys' pending rows up to a seq (the PostgreSQL claim's fresh read), and their dead rows as
# never due, so a row another relay just made dead still stops its key; params c_now, c_keys (an
# array), c_max.
_OWNED_KEY = outbox.c.key == any_(bindparam("c_keys", type_=_KEYS))
_FRESH_HEADS = union_all(
    select(*_NARROW_COLUMNS).where(
        _status_is(PENDING), _OWNED_KEY, outbox.c.seq <= bindparam("c_max", type_=BigInteger)),
    select(outbox.c.seq, outbox.c.key, outbox.c.topic, false().label("due")).where(
        _status_is(DEAD), _OWNED_KEY, outbox.c.seq <= bindparam("c_max", type_=BigInteger)))


@functools.cache
def _rows_by_seq(dialect: str) -> Any:
    """The ClaimedRow columns of the rows whose seqs are bound as "seqs"."""
    return select(*_CLAIM_COLUMNS).where(_seq_in(dialect))


@functools.cache
def _mark_published(dialect: str) -> Any:
    """Rows bound as "seqs" published; params b_now, b_relay."""
    return update(outbox).where(_seq_in(dialect)).values(
        status=PUBLISHED, published_at=bindparam("b_now", type_=outbox.c.published_at.type),
        relay_id=bindparam("b_relay", type_=outbox.c.relay_id.type))


def _row(r: Any) -> OutboxRow:
    return OutboxRow(
        seq=int(r.seq), message_id=r.message_id, topic=r.topic, key=r.key, entity_key=r.entity_key,
        value=bytes(r.value), headers=tuple((str(k), str(v)) for k, v in (r.headers or ())),
        status=r.status, attempts=int(r.attempts), created_at=as_utc(r.created_at),
        next_attempt_at=as_utc(r.next_attempt_at), last_error=r.last_error,
        published_at=as_utc(r.published_at), relay_id=r.relay_id,
    )


def publishable_prefixes(rows_by_seq: Sequence[tuple[int, bytes | None, str, bool]],
                         owned: Collection[int]) -> set[int]:
    """The seqs that may be published now: per key, the run of owned, due rows starting at the key's head.

    `rows_by_seq` is every pending row (seq, key, topic, due) of the keys in question, in seq order. A
    key stops at its first row that is not due (in backoff), not owned (claimed by no one, or by another
    relay), or bound for another topic than the key's first row: one batch must only hold rows of a key
    that share a partition, because the producer keeps order within a partition only, and a row for
    another topic could be acknowledged while an earlier one fails. Rows without a key have no order to
    keep.
    """
    allowed: set[int] = set()
    stopped: set[bytes] = set()
    topic_of: dict[bytes, str] = {}
    for seq, key, topic, due in rows_by_seq:
        ok = due and seq in owned
        if key is None:
            if ok:
                allowed.add(seq)
            continue
        if key in stopped:
            continue
        if ok and topic_of.setdefault(key, topic) == topic:
            allowed.add(seq)
        else:
            stopped.add(key)
    return allowed


class OutboxStore(ABC):
    """Where a component's outgoing messages wait for the relay; calls run in the caller's transaction."""

    @abstractmethod
    async def append_many(self, conn: AsyncConnection, messages: Sequence[OutboxMessage]) -> int:
        """Append messages; a message_id already in the outbox is skipped. Returns how many were added."""

    async def append(self, conn: AsyncConnection, topic: str, key: bytes | str | None, value: bytes | str,
                     message_id: uuid.UUID | str, headers: HeadersIn = None, *,
                     entity_key: str | None = None) -> bool:
        """Append one message inside the caller's transaction; False if its message_id was already there.

        A duplicate message_id is absorbed rather than raised: message ids are deterministic where a
        retried emission must dedupe, so a retry appends nothing and its transaction still commits.
        """
        message = outbox_message(topic, key, value, message_id, headers, entity_key=entity_key)
        return await self.append_many(conn, [message]) == 1

    @abstractmethod
    async def claim(self, conn: AsyncConnection, *, limit: int, now: datetime,
                    exclude_keys: Collection[bytes] = (),
                    exclude_seqs: Collection[int] = ()) -> list[ClaimedRow]:
        """Pending, due rows this caller may publish now, in seq order, respecting per-key order.

        `exclude_keys` / `exclude_seqs` name rows the caller already has in flight (a pipelined relay's
        earlier batch, not yet recorded): none of their keys' rows, nor those rows, are claimed again.
        """

    @abstractmethod
    async def mark_published(self, conn: AsyncConnection, seqs: Sequence[int], *, now: datetime,
                             relay_id: str) -> None:
        """Record that these rows reached the broker."""

    @abstractmethod
    async def record_failures(self, conn: AsyncConnection, failures: Sequence[FailedAttempt], *,
                              relay_id: str) -> None:
        """Record failed publishes: attempt counts, next attempt times, errors, and the dead state."""

    @abstractmethod
    async def backlog(self, conn: AsyncConnection, *, now: datetime | None = None) -> OutboxBacklog:
        """Unpublished rows and the age of the oldest, plus the dead-letter count."""

    @abstractmethod
    async def dead_rows(self, conn: AsyncConnection, *, limit: int = 100,
                        after_seq: int | None = None) -> list[OutboxRow]:
        """Dead rows (refused for a reason of their own), oldest first; page with `after_seq`."""

    @abstractmethod
    async def requeue_dead(self, conn: AsyncConnection, message_ids: Iterable[uuid.UUID | str], *,
                           now: datetime | None = None) -> int:
        """Make dead rows pending again with a fresh attempt budget; returns how many were requeued.

        A requeued row is again the head of its key, so it is published before the rows that waited behind it.
        """

    @abstractmethod
    async def prune_published(self, conn: AsyncConnection, *, published_before: datetime,
                              limit: int | None = None) -> int:
        """Delete rows published before a time, the oldest `limit` of them if given; returns the count."""

    @abstractmethod
    async def get(self, conn: AsyncConnection, message_id: uuid.UUID | str) -> OutboxRow | None:
        """One row by message id."""


class SqlOutboxStore(OutboxStore):
    """The outbox on SQLite or PostgreSQL (SQLAlchemy Core); the dialect is read from each connection."""

    async def append_many(self, conn: AsyncConnection, messages: Sequence[OutboxMessage]) -> int:
        if not messages:
            return 0
        is_pg = conn.dialect.name == "postgresql"
        if is_pg:
            await self._lock_keys_for_append(conn, {m.key for m in messages if m.key is not None})
        now = utcnow()
        rows = [{
            "message_id": m.message_id, "topic": m.topic, "key": m.key, "entity_key": m.entity_key,
            "value": m.value, "headers": [list(h) for h in m.headers] or None, "created_at": now,
            "status": PENDING, "attempts": 0, "next_attempt_at": now,
        } for m in messages]
        insert = postgresql.insert(outbox) if is_pg else sqlite.insert(outbox)
        stmt = insert.on_conflict_do_nothing(index_elements=[outbox.c.message_id]).returning(outbox.c.seq)
        result = await conn.execute(stmt, rows)
        return len(result.all())

    async def _lock_keys_for_append(self, conn: AsyncConnection, keys: set[bytes]) -> None:
        if not keys:
            return
        # Sorted, so two transactions appending for the same keys take the locks in the same order and
        # cannot deadlock on each other; unnest yields the array in order.
        ids = sorted({key_lock_id(k) for k in keys})
        await conn.execute(
            text("SELECT pg_advisory_xact_lock(:ns, k) FROM unnest(CAST(:ids AS integer[])) AS k"),
            {"ns": APPEND_LOCK_NS, "ids": ids},
        )

    # --- claiming -----------------------------------------------------------------------------------

    async def claim(self, conn: AsyncConnection, *, limit: int, now: datetime,
                    exclude_keys: Collection[bytes] = (),
                    exclude_seqs: Collection[int] = ()) -> list[ClaimedRow]:
        if limit <= 0:
            return []
        if conn.dialect.name != "postgresql":
            # SQLite: one relay per database (one writer at a time), so no one else can be claiming.
            stmt = _candidates(False, after=False, lock=False)
            params = {"c_now": now, "c_limit": limit, "c_busy": _keys_param(exclude_keys),
                      "c_skip": _seqs_param("sqlite", exclude_seqs)}
            rows = [_claimed_sqlite(r) for r in (await conn.execute(stmt, params)).all()]
            # Candidates are due and hold each key's pending rows from its head; only cut at topic changes.
            allowed = publishable_prefixes([(r.seq, r.key, r.topic, True) for r in rows],
                                           {r.seq for r in rows})
            return [r for r in rows if r.seq in allowed]
        return await self._claim_postgres(conn, limit=limit, now=now, exclude_keys=exclude_keys,
                                          exclude_seqs=exclude_seqs)

    async def _claim_postgres(self, conn: AsyncConnection, *, limit: int, now: datetime,
                              exclude_keys: Collection[bytes],
                              exclude_seqs: Collection[int]) -> list[ClaimedRow]:
        """Row locks (SKIP LOCKED) so no row is in two batches; key locks to skip keys busy elsewhere; a
        fresh read so each key's rows go out only as a run from its current head.

        See `kinshasa.kernel.relay` for the full argument. Candidates are selected narrow (no value) so
        that even a plan made without table statistics sorts little; values are fetched only for the
        rows that survive.
        """
        # Queue tables defeat the planner: statistics taken when the outbox was nearly empty make a
        # backlog look tiny, and it then bitmap-scans every pending row and sorts them, a cost that
        # grows with the backlog on every claim. The claim wants the ordered walk of the partial index
        # on seq that stops after `limit` rows, so say so for this transaction.
        # Each statement is also planned for its own parameters (the arrays of keys and seqs to leave
        # out), never from a generic plan that cannot hash them.
        await conn.execute(text("SELECT set_config('enable_sort', 'off', true), "
                                "set_config('enable_bitmapscan', 'off', true), "
                                "set_config('plan_cache_mode', 'force_custom_plan', true)"))
        owned_ids: set[int] = set()
        busy_ids: set[int] = set()
        # Keys in flight in this relay's other batches are skipped up front; their advisory locks are
        # held by those batches' transactions, so trying them here would only fail.
        busy_keys: set[bytes] = set(exclude_keys)
        claimed: list[tuple[int, bytes | None, str, bool]] = []
        lock_ids: dict[bytes, int] = {}
        after_seq: int | None = None
        for _ in range(_CLAIM_ROUNDS):
            want = limit - len(claimed)
            if want <= 0:
                break
            stmt = _candidates(True, after=after_seq is not None, lock=True)
            params = {"c_now": now, "c_limit": want, "c_after": after_seq, "c_busy": list(busy_keys),
                      "c_skip": list(exclude_seqs)}
            rows = [(int(seq), key, topic, bool(due)) for seq, key, topic, due in
                    await conn.execute(stmt, params)]
            if not rows:
                break
            after_seq = rows[-1][0]
            for _, key, _, _ in rows:
                if key is not None and key not in lock_ids:
                    lock_ids[key] = key_lock_id(key)
            wanted = {lock_ids[key] for _, key, _, _ in rows if key is not None} - owned_ids - busy_ids
            if wanted:
                got = await conn.execute(
                    text("SELECT k FROM unnest(CAST(:ids AS integer[])) AS k "
                         "WHERE pg_try_advisory_xact_lock(:ns, k)"),
                    {"ns": RELAY_LOCK_NS, "ids": sorted(wanted)},
                )
                acquired = {int(k) for (k,) in got}
                owned_ids |= acquired
                busy_ids |= wanted - acquired
            for row in rows:
                key = row[1]
                if key is None or lock_ids[key] in owned_ids:
                    claimed.append(row)
                else:
                    # Another relay is publishing this key; the row stays locked by us until commit,
                    # unused, and that relay's next batch stops before it (one batch of delay, no harm).
                    busy_keys.add(key)
            if len(rows) < want:
                break
        if not claimed:
            return []
        keys = {key for _, key, _, _ in claimed if key is not None}
        candidates = [row for row in claimed if row[1] is None]
        if keys:
            # Re-read the owned keys now that we hold their locks: the candidate query ran on an older
            # snapshot, and the previous owner may have committed since (published rows, or put an
            # earlier row into backoff). Only a run of our rows from each key's current head may go out.
            fresh = await conn.execute(_FRESH_HEADS, {
                "c_now": now, "c_keys": list(keys), "c_max": max(seq for seq, _, _, _ in claimed)})
            candidates += [(int(seq), key, topic, bool(due)) for seq, key, topic, due in fresh]
            candidates.sort(key=lambda row: row[0])
        allowed = publishable_prefixes(candidates, {seq for seq, _, _, _ in claimed})
        if not allowed:
            return []
        full = await conn.execute(_rows_by_seq(conn.dialect.name),
                                  {"seqs": _seqs_param(conn.dialect.name, sorted(allowed))})
        return sorted((_claimed(r) for r in full), key=lambda r: r.seq)

    # --- recording outcomes -------------------------------------------------------------------------

    async def mark_published(self, conn: AsyncConnection, seqs: Sequence[int], *, now: datetime,
                             relay_id: str) -> None:
        if not seqs:
            return
        # One UPDATE per batch: this statement is most of the relay's database cost per message.
        await conn.execute(_mark_published(conn.dialect.name),
                           {"seqs": _seqs_param(conn.dialect.name, seqs), "b_now": now, "b_relay": relay_id})

    async def record_failures(self, conn: AsyncConnection, failures: Sequence[FailedAttempt], *,
                              relay_id: str) -> None:
        if not failures:
            return
        stmt = (update(outbox)
                .where(outbox.c.seq == bindparam("b_seq"))
                .values(attempts=bindparam("b_attempts"), next_attempt_at=bindparam("b_next"),
                        last_error=bindparam("b_error"), status=bindparam("b_status"), relay_id=relay_id))
        await conn.execute(stmt, [{
            "b_seq": f.seq, "b_attempts": f.attempts, "b_next": f.next_attempt_at,
            # Bounded so one verbose broker error cannot bloat every row of a failing batch.
            "b_error": f.error[:2000], "b_status": DEAD if f.dead else PENDING,
        } for f in failures])

    # --- operator and metrics surface ---------------------------------------------------------------

    async def backlog(self, conn: AsyncConnection, *, now: datetime | None = None) -> OutboxBacklog:
        now = now or utcnow()
        pending, oldest = (await conn.execute(
            select(func.count(), func.min(outbox.c.created_at)).where(_status_is(PENDING))
        )).one()
        dead = (await conn.execute(select(func.count()).where(_status_is(DEAD)))).scalar_one()
        age = max(0.0, (now - as_utc(oldest)).total_seconds()) if oldest is not None else None
        return OutboxBacklog(pending=int(pending), oldest_age_s=age, dead=int(dead))

    async def dead_rows(self, conn: AsyncConnection, *, limit: int = 100,
                        after_seq: int | None = None) -> list[OutboxRow]:
        stmt = select(outbox).where(_status_is(DEAD)).order_by(outbox.c.seq).limit(limit)
        if after_seq is not None:
            stmt = stmt.where(outbox.c.seq > after_seq)
        return [_row(r) for r in await conn.execute(stmt)]

    async def requeue_dead(self, conn: AsyncConnection, message_ids: Iterable[uuid.UUID | str], *,
                           now: datetime | None = None) -> int:
        ids = [m if isinstance(m, uuid.UUID) else uuid.UUID(str(m)) for m in message_ids]
        if not ids:
            return 0
        result = await conn.execute(
            update(outbox)
            .where(_status_is(DEAD), outbox.c.message_id.in_(ids))
            .values(status=PENDING, attempts=0, next_attempt_at=now or utcnow())
            .returning(outbox.c.seq)
        )
        return len(result.all())

    async def prune_published(self, conn: AsyncConnection, *, published_before: datetime,
                              limit: int | None = None) -> int:
        old: ColumnElement[bool] = _status_is(PUBLISHED) & (outbox.c.published_at < published_before)
        if limit is not None:
            # Oldest first by seq (the primary key): old published rows sit at the start of the table.
            old = outbox.c.seq.in_(select(outbox.c.seq).where(old).order_by(outbox.c.seq).limit(limit)
                                   .scalar_subquery())
        result = await conn.execute(delete(outbox).where(old).returning(outbox.c.seq))
        return len(result.all())

    async def get(self, conn: AsyncConnection, message_id: uuid.UUID | str) -> OutboxRow | None:
        mid = message_id if isinstance(message_id, uuid.UUID) else uuid.UUID(str(message_id))
        row = (await conn.execute(select(outbox).where(outbox.c.message_id == mid))).first()
        return _row(row) if row is not None else None


_default_store = SqlOutboxStore()


async def append(conn: AsyncConnection, topic: str, key: bytes | str | None, value: bytes | str,
                 message_id: uuid.UUID | str, headers: HeadersIn = None, *,
                 entity_key: str | None = None) -> bool:
    """Append one message inside the caller's transaction (see `OutboxStore.append`)."""
    return await _default_store.append(conn, topic, key, value, message_id, headers, entity_key=entity_key)


async def dead_rows(conn: AsyncConnection, *, limit: int = 100,
                    after_seq: int | None = None) -> list[OutboxRow]:
    """Rows whose publish attempts are exhausted, oldest first: the outbox's dead letters."""
    return await _default_store.dead_rows(conn, limit=limit, after_seq=after_seq)


async def backlog(conn: AsyncConnection) -> OutboxBacklog:
    """Pending count, oldest pending age and dead count, for metrics."""
    return await _default_store.backlog(conn)


class OutboxStatus:
    """A component's outbox as its admin endpoint reports it (`GET /admin/outbox`): read-only, one query
    pair per call, on the partial indexes, so polling it costs the same however long the table's history."""

    def __init__(self, engine: AsyncEngine, store: OutboxStore | None = None) -> None:
        self.engine = engine
        self.store = store if store is not None else _default_store

    async def backlog(self) -> OutboxBacklog:
        async with self.engine.connect() as conn:
            return await self.store.backlog(conn)
