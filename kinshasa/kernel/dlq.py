"""Dead-letter queue: poison messages leave the partition, wait in the component's store, get reprocessed.

A consumer handler wrapped by `guarded_handler` never lets a poison message block its partition. A
message it cannot parse (InvalidMessage, pydantic ValidationError) is dead-lettered at once; a failure
that repeats deterministically (a handler bug, a domain invariant raised) is retried in-process with
backoff, then dead-lettered. A failure of the infrastructure (database locked, busy or unreachable,
broker or Temporal unavailable; `kinshasa.kernel.failures`) is never dead-lettered: the message waits,
its partition behind it, and is retried with capped backoff until it applies, so later messages of
the same entity never overtake it. Dead-lettering means: a `dead_letters` row in
the component's database (payload, headers, error, attempt count; the copy operators reprocess
from) and the same message on the group's `.dlq` topic (with the error in headers, for tooling that
reads the log). Only then does the wrapper return normally, so the consumer stores the offset and
the messages behind the poison one are processed.

If the row cannot be written or the `.dlq` publish fails, the wrapper raises: the consumer does not
store the offset and redelivers, and `record` is idempotent on the source offset, so the retry
updates the same row instead of adding a second one.

`DeadLetterQueue` is the component-level API (`dlq_count`, `dlq_inspect`, `dlq_reprocess`) the
admin endpoint and the gateway's operator mutations call. Reprocessing runs the handler again on the
stored message; the handler's own inbox dedupe makes its effect apply at most once, and rows already
reprocessed are skipped.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.kernel.failures import classify_failure
from kinshasa.kernel.logs import log_context
from kinshasa.kernel.metrics import ComponentMetrics
from kinshasa.kernel.outbox import OutboxRow, OutboxStore, SqlOutboxStore
from kinshasa.kernel.tables import kernel_metadata
from kinshasa.schemas.clock import as_utc, utcnow
from kinshasa.topics.catalogue import dlq_topic
from kinshasa.topics.consumer import Handler, Record, Redeliver
from kinshasa.topics.producer import Delivered, Headers

logger = logging.getLogger(__name__)

Status = Literal["open", "reprocessed", "discarded"]
Reason = Literal["invalid", "handler_failed"]

# Errors are kept whole enough to diagnose, bounded so a pathological message cannot bloat the row.
_ERROR_MAX = 8000
INSPECT_MAX = 1000

dead_letters = Table(
    "dead_letters",
    kernel_metadata,
    # BIGINT on PostgreSQL; INTEGER on SQLite, where only INTEGER PRIMARY KEY aliases the rowid.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    # "group" is an SQL keyword; a plain name keeps hand-written SQL during an incident simple.
    Column("consumer_group", String(255), nullable=False),
    # The envelope's message_id when it could be read, else `topic:partition:offset` (see
    # `message_id_of`), so every entry can be named when reprocessing.
    Column("message_id", String(255), nullable=False),
    Column("source_topic", String(255), nullable=False),
    Column("source_partition", Integer, nullable=False),
    Column("source_offset", BigInteger, nullable=False),
    Column("key", LargeBinary, nullable=True),
    Column("value", LargeBinary, nullable=True),
    # JSON list of [name, value, "utf-8" | "base64"]: headers are ordered and may repeat a name.
    Column("headers", Text, nullable=False, default="[]"),
    Column("reason", String(32), nullable=False),
    Column("error", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("first_failed_at", DateTime(timezone=True), nullable=False),
    Column("last_failed_at", DateTime(timezone=True), nullable=False),
    Column("status", String(16), nullable=False, default="open"),
    Column("resolved_at", DateTime(timezone=True), nullable=True),
    CheckConstraint("status IN ('open', 'reprocessed', 'discarded')", name="status"),
    # One row per consumed record of a group: a redelivered poison message updates its row.
    UniqueConstraint("consumer_group", "source_topic", "source_partition", "source_offset",
                     name="uq_dead_letters_source"),
    Index("ix_dead_letters_message_id", "message_id"),
    Index("ix_dead_letters_status", "status", "id"),
)


class DlqError(RuntimeError):
    """A DLQ operation was asked for something it cannot do (bad limit, no handler for a group)."""


class DlqProducer(Protocol):
    """What the wrapper needs of `kinshasa.topics.producer.AsyncProducer`."""

    async def send(self, topic: str, key: bytes | None, value: bytes,
                   headers: Headers = None) -> Delivered: ...


@dataclass(frozen=True)
class DeadLetter:
    id: int
    group: str
    message_id: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    reason: str
    error: str
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    status: str
    resolved_at: datetime | None = None

    def as_record(self) -> Record:
        """The consumed record again, as the handler first saw it (for reprocessing)."""
        return Record(topic=self.topic, partition=self.partition, offset=self.offset, key=self.key,
                      value=self.value or b"", headers=tuple(self.headers), timestamp=None)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe view for the admin endpoint and GraphQL: bytes as text when they are UTF-8."""
        return {
            "kind": "consumed",
            "id": self.id,
            "group": self.group,
            "message_id": self.message_id,
            "source": {"topic": self.topic, "partition": self.partition, "offset": self.offset},
            "key": _text_or_b64(self.key),
            "value": _text_or_b64(self.value),
            "headers": [[name, _text_or_b64(value)] for name, value in self.headers],
            "reason": self.reason,
            "error": self.error,
            "attempts": self.attempts,
            "first_failed_at": self.first_failed_at.isoformat(),
            "last_failed_at": self.last_failed_at.isoformat(),
            "status": self.status,
            "resolved_at": self.resolved_at.isoformat() if self.resolved_at else None,
        }


def _text_or_b64(data: bytes | None) -> str | dict[str, str] | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def _as_bytes(value: str | bytes | None) -> bytes:
    if value is None:
        return b""
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def normalise_headers(headers: Any) -> list[tuple[str, bytes]]:
    """Kafka headers in any of the shapes clients hand out, as an ordered list of (name, bytes)."""
    if not headers:
        return []
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(name), _as_bytes(value)) for name, value in pairs]


def encode_headers(headers: Iterable[tuple[str, bytes]]) -> str:
    encoded = []
    for name, value in headers:
        try:
            encoded.append([name, value.decode("utf-8"), "utf-8"])
        except UnicodeDecodeError:
            encoded.append([name, base64.b64encode(value).decode("ascii"), "base64"])
    return json.dumps(encoded, ensure_ascii=False)


def decode_headers(stored: str | None) -> list[tuple[str, bytes]]:
    out = []
    for name, value, encoding in json.loads(stored or "[]"):
        out.append((name, base64.b64decode(value) if encoding == "base64" else value.encode("utf-8")))
    return out


def message_id_of(record: Record) -> str:
    """The envelope's message_id, read without trusting the message: header, then body, then offset.

    A message that cannot be parsed still needs a name an operator can pass to `dlq_reprocess`.
    """
    header = record.header("message_id")
    if header:
        return header.decode("utf-8", errors="replace")[:255]
    if record.value:
        try:
            body = json.loads(record.value)
        except (ValueError, UnicodeDecodeError):
            body = None
        if isinstance(body, dict) and isinstance(body.get("message_id"), str) and body["message_id"]:
            return str(body["message_id"])[:255]
    return f"{record.topic}:{record.partition}:{record.offset}"


def _operation_of(record: Record) -> str:
    header = record.header("type")
    return header.decode("utf-8", errors="replace") if header else record.topic


def describe_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _ERROR_MAX else text[: _ERROR_MAX - 15] + " ...[truncated]"


def _row_to_letter(row: Any) -> DeadLetter:
    first, last = as_utc(row.first_failed_at), as_utc(row.last_failed_at)
    assert first is not None and last is not None
    return DeadLetter(
        id=row.id, group=row.consumer_group, message_id=row.message_id, topic=row.source_topic,
        partition=row.source_partition, offset=row.source_offset, key=row.key, value=row.value,
        headers=decode_headers(row.headers), reason=row.reason, error=row.error, attempts=row.attempts,
        first_failed_at=first, last_failed_at=last, status=row.status,
        resolved_at=as_utc(row.resolved_at))


class DeadLetterStore(ABC):
    """Where a component keeps the messages its handlers gave up on."""

    @abstractmethod
    async def record(self, *, group: str, record: Record, message_id: str, error: str, attempts: int,
                     reason: Reason) -> DeadLetter:
        """Keep a failed message; a second failure of the same source record updates its row."""

    @abstractmethod
    async def count(self, status: Status = "open") -> int: ...

    @abstractmethod
    async def inspect(self, limit: int = 50, status: Status | None = "open") -> list[DeadLetter]:
        """Oldest first; `status=None` lists every status."""

    @abstractmethod
    async def find(self, message_ids: Sequence[str]) -> list[DeadLetter]:
        """Every row (any status) for these message ids, oldest first."""

    @abstractmethod
    async def mark_reprocessed(self, ids: Sequence[int]) -> int:
        """Close open rows as reprocessed; returns how many changed."""

    @abstractmethod
    async def mark_discarded(self, ids: Sequence[int]) -> int:
        """Close open rows without reprocessing (an operator decided the message is dead)."""

    @abstractmethod
    async def note_failure(self, id: int, error: str) -> None:
        """A reprocess attempt failed: count it and keep its error; the row stays open."""


def _check_limit(limit: int) -> int:
    if not 1 <= limit <= INSPECT_MAX:
        raise DlqError(f"limit must be between 1 and {INSPECT_MAX}, got {limit}; page with a smaller limit")
    return limit


class SqlDeadLetterStore(DeadLetterStore):
    """The `dead_letters` table in the component's own database (SQLite or PostgreSQL)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create_table(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(lambda sync: kernel_metadata.create_all(sync, tables=[dead_letters]))

    async def record(self, *, group: str, record: Record, message_id: str, error: str, attempts: int,
                     reason: Reason) -> DeadLetter:
        now = utcnow()
        source = (dead_letters.c.consumer_group == group, dead_letters.c.source_topic == record.topic,
                  dead_letters.c.source_partition == record.partition,
                  dead_letters.c.source_offset == record.offset)
        # Two tries: a concurrent insert of the same source (a rebalance handing the partition over
        # mid-failure) turns the second writer's insert into the update path.
        for _ in range(2):
            try:
                async with self.engine.begin() as conn:
                    existing = (await conn.execute(select(dead_letters.c.id).where(*source))).first()
                    if existing is not None:
                        await conn.execute(
                            update(dead_letters).where(dead_letters.c.id == existing.id).values(
                                attempts=dead_letters.c.attempts + attempts, error=error, reason=reason,
                                last_failed_at=now, status="open", resolved_at=None))
                        row_id = existing.id
                    else:
                        result = await conn.execute(insert(dead_letters).values(
                            consumer_group=group, message_id=message_id, source_topic=record.topic,
                            source_partition=record.partition, source_offset=record.offset,
                            key=record.key, value=record.value,
                            headers=encode_headers(normalise_headers(record.headers)),
                            reason=reason, error=error, attempts=attempts, first_failed_at=now,
                            last_failed_at=now, status="open"))
                        assert result.inserted_primary_key is not None
                        row_id = result.inserted_primary_key[0]
                    row = (await conn.execute(select(dead_letters).where(dead_letters.c.id == row_id))).one()
                    return _row_to_letter(row)
            except IntegrityError:
                continue
        raise DlqError(f"could not record dead letter for {record.topic}:{record.partition}:{record.offset} "
                       f"in group {group}: the row kept conflicting; check the dead_letters table")

    async def count(self, status: Status = "open") -> int:
        async with self.engine.connect() as conn:
            return int(await conn.scalar(select(func.count()).select_from(dead_letters)
                                         .where(dead_letters.c.status == status)) or 0)

    async def inspect(self, limit: int = 50, status: Status | None = "open") -> list[DeadLetter]:
        query = select(dead_letters).order_by(dead_letters.c.id).limit(_check_limit(limit))
        if status is not None:
            query = query.where(dead_letters.c.status == status)
        async with self.engine.connect() as conn:
            return [_row_to_letter(row) for row in (await conn.execute(query)).all()]

    async def find(self, message_ids: Sequence[str]) -> list[DeadLetter]:
        if not message_ids:
            return []
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(dead_letters).where(
                dead_letters.c.message_id.in_(list(message_ids))).order_by(dead_letters.c.id))).all()
        return [_row_to_letter(row) for row in rows]

    async def _close(self, ids: Sequence[int], status: Status) -> int:
        if not ids:
            return 0
        async with self.engine.begin() as conn:
            result = await conn.execute(update(dead_letters).where(
                dead_letters.c.id.in_(list(ids)), dead_letters.c.status == "open").values(
                status=status, resolved_at=utcnow()))
            return int(result.rowcount or 0)

    async def mark_reprocessed(self, ids: Sequence[int]) -> int:
        return await self._close(ids, "reprocessed")

    async def mark_discarded(self, ids: Sequence[int]) -> int:
        return await self._close(ids, "discarded")

    async def note_failure(self, id: int, error: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(update(dead_letters).where(dead_letters.c.id == id).values(
                attempts=dead_letters.c.attempts + 1, error=error, last_failed_at=utcnow()))


def is_invalid_message(exc: BaseException) -> bool:
    """A message that no retry can fix: it does not parse or does not validate."""
    return classify_failure(exc) == "invalid"


@dataclass(frozen=True)
class DeadLetterPolicy:
    """How a handler is retried before its message is dead-lettered, and how it waits out an outage.

    Poison (see `kinshasa.kernel.failures`): `max_attempts` counts every call, the first included; the
    delay before retry n is `backoff_s * 2**(n-1)`, capped at `max_backoff_s`. The worst case stalls the
    partition for about the sum of those delays, so keep it short: the DLQ, not the partition, is where
    such a message waits for a real fix.

    Retryable (the database, broker or Temporal unavailable): never dead-lettered. Retried with the same
    doubling, capped at `unavailable_max_backoff_s`, for as long as the outage lasts, because the later
    messages of the partition must not overtake this one. One call of the guard waits at most
    `hand_back_s`, then raises `HandlerUnavailable` so the consumer seeks back, polls (keeping its group
    membership well inside `max.poll.interval.ms`, 300 s by default, and noticing a stop request) and
    delivers the message again; the guard remembers where its retries were. A warning is logged at the
    first failure and then at most every `log_every_s`.
    """

    max_attempts: int = 3
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    unavailable_max_backoff_s: float = 30.0
    hand_back_s: float = 10.0
    log_every_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0 or self.unavailable_max_backoff_s < 0:
            raise ValueError("backoff_s, max_backoff_s and unavailable_max_backoff_s must not be negative")
        if self.hand_back_s <= 0 or self.log_every_s < 0:
            raise ValueError("hand_back_s must be positive and log_every_s not negative")

    def delay(self, attempt: int) -> float:
        return min(self.backoff_s * 2 ** min(attempt - 1, 62), self.max_backoff_s)

    def unavailable_delay(self, retries: int) -> float:
        # A floor, so a connection refused at once is not retried in a tight loop.
        base = max(self.backoff_s, 0.05)
        return min(base * 2 ** min(retries - 1, 62), self.unavailable_max_backoff_s)


class HandlerUnavailable(Redeliver):
    """A message still waits for its infrastructure; the guard hands it back to the consumer to redeliver.

    The consumer does not store its offset and seeks back, so nothing behind it in its partition goes
    ahead; it is the consumer's cue to poll (and to stop, if asked) before trying again.
    """


@dataclass
class _Waiting:
    """A message whose handler failed and that has not been handled or dead-lettered yet."""

    since: float
    touched: float
    retries: int = 0  # retryable failures
    failures: int = 0  # poison failures (attempts toward max_attempts)
    next_at: float = 0.0
    unavailable: bool = False  # the last failure was the infrastructure's
    logged_at: float | None = None
    last_error: str = ""


DLQ_HEADER_PREFIX = "kinshasa.dlq."


def dlq_headers(record: Record, group: str, letter: DeadLetter) -> list[tuple[str, bytes]]:
    """The original headers plus why and where from, so a `.dlq` reader needs no database."""
    extra = {
        "error": letter.error[:2000],
        "reason": letter.reason,
        "attempts": str(letter.attempts),
        "group": group,
        "source_topic": record.topic,
        "source_partition": str(record.partition),
        "source_offset": str(record.offset),
        "dead_letter_id": str(letter.id),
        "failed_at": letter.last_failed_at.isoformat(),
    }
    original = [(k, v) for k, v in normalise_headers(record.headers) if not k.startswith(DLQ_HEADER_PREFIX)]
    return original + [(DLQ_HEADER_PREFIX + k, v.encode("utf-8")) for k, v in extra.items()]


def guarded_handler(
    handler: Handler,
    *,
    store: DeadLetterStore,
    producer: DlqProducer,
    group: str,
    max_attempts: int = 3,
    backoff: DeadLetterPolicy | float = 0.2,
    metrics: ComponentMetrics | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Handler:
    """Wrap a consumer handler so a poison message is dead-lettered instead of blocking its partition,
    and a message that met an unavailable database, broker or Temporal waits for it instead.

    `backoff` is the first retry delay in seconds (doubling after), or a full DeadLetterPolicy
    (whose `max_attempts` then wins). The returned handler returns normally once the message is
    handled or safely dead-lettered. It raises if dead-lettering itself failed, or `HandlerUnavailable`
    when it hands a waiting message back to the consumer (see `DeadLetterPolicy`); either way the
    consumer redelivers rather than lose the message. Cancellation is never caught.
    """
    policy = backoff if isinstance(backoff, DeadLetterPolicy) else DeadLetterPolicy(
        max_attempts=max_attempts, backoff_s=backoff)
    topic = dlq_topic(group)
    # Failing messages by source position, oldest first. Only the oldest waits inside the guard; the
    # others hand back at once while their retry is not due, so a batch that met an outage on several
    # partitions keeps the consumer from polling for about one `hand_back_s`, not one per partition.
    waiting: dict[tuple[str, int, int], _Waiting] = {}
    # A position not seen for this long was revoked or handled elsewhere: forget it.
    forget_after = max(10 * policy.hand_back_s, 60.0)

    def unavailable(record: Record, operation: str, state: _Waiting) -> HandlerUnavailable:
        return HandlerUnavailable(
            f"{operation} from {record.topic}:{record.partition}@{record.offset} still waits for its "
            f"infrastructure ({state.retries} failed attempt(s) over {clock() - state.since:.0f}s; last: "
            f"{state.last_error}); handed back to the consumer, which polls and delivers it again")

    async def guarded(record: Record) -> None:
        operation = _operation_of(record)
        message_id = message_id_of(record)
        position = (record.topic, record.partition, record.offset)
        source = f"{record.topic}:{record.partition}:{record.offset}"
        entered = clock()
        hand_back_at = entered + policy.hand_back_s
        for old in [p for p, w in waiting.items() if entered - w.touched > forget_after]:
            del waiting[old]
        state = waiting.get(position)
        with log_context(message_id=message_id):
            while True:
                if state is not None:
                    state.touched = clock()
                    pause = state.next_at - state.touched
                    if pause > 0 and not state.unavailable:
                        await sleep(pause)  # a poison retry: short (max_backoff_s), not worth a hand-back
                    elif pause > 0:
                        oldest = next(p for p, w in waiting.items() if w.unavailable)
                        if oldest != position:
                            raise unavailable(record, operation, state) from None
                        allowed = hand_back_at - state.touched
                        await sleep(max(0.0, min(pause, allowed)))
                        if pause > allowed:
                            raise unavailable(record, operation, state) from None
                started = time.perf_counter()
                try:
                    await handler(record)
                except Exception as exc:
                    elapsed = time.perf_counter() - started
                    kind = classify_failure(exc)
                    now = clock()
                    if state is None:
                        state = waiting.setdefault(position, _Waiting(since=now, touched=now))
                    state.last_error = describe_error(exc)
                    state.unavailable = kind == "retryable"
                    if state.unavailable:
                        if metrics is not None:
                            metrics.observe_handler(operation, elapsed, "retrying")
                        # Poison means failing the same way N times in a row: stray errors met during an
                        # outage do not add up to a dead letter.
                        state.failures = 0
                        state.retries += 1
                        delay = policy.unavailable_delay(state.retries)
                        state.next_at = now + delay
                        if state.logged_at is None or now - state.logged_at >= policy.log_every_s:
                            state.logged_at = now
                            logger.warning(
                                "handler for %s met unavailable infrastructure (attempt %d, waiting %.0fs so "
                                "far), retrying in %.2fs; the partition waits, the message is not "
                                "dead-lettered: %s", operation, state.retries, now - state.since, delay,
                                state.last_error, extra={"source": source})
                        continue
                    if metrics is not None:
                        metrics.observe_handler(operation, elapsed, "error")
                    state.failures += 1
                    if kind == "invalid":
                        reason: Reason = "invalid"
                        failure: Exception = exc
                        break
                    if state.failures >= policy.max_attempts:
                        reason, failure = "handler_failed", exc
                        break
                    delay = policy.delay(state.failures)
                    state.next_at = now + delay
                    logger.warning("handler for %s failed (attempt %d of %d), retrying in %.2fs: %s",
                                   operation, state.failures, policy.max_attempts, delay, state.last_error,
                                   extra={"source": source})
                else:
                    if metrics is not None:
                        metrics.observe_handler(operation, time.perf_counter() - started, "ok")
                    if state is not None:
                        waiting.pop(position, None)
                        if state.retries:
                            logger.warning("handler for %s succeeded after waiting %.0fs for its "
                                           "infrastructure (%d failed attempt(s))", operation,
                                           clock() - state.since, state.retries, extra={"source": source})
                    return
            attempts = state.failures
            letter = await store.record(group=group, record=record, message_id=message_id,
                                        error=describe_error(failure), attempts=attempts, reason=reason)
            await producer.send(topic, record.key, record.value, dlq_headers(record, group, letter))
            waiting.pop(position, None)
            if metrics is not None:
                metrics.dead_lettered(group, reason)
            logger.error("dead-lettered %s from %s:%d@%d after %d attempt(s) (%s): %s; inspect with "
                         "dlq_inspect and reprocess with dlq_reprocess once the cause is fixed",
                         message_id, record.topic, record.partition, record.offset, attempts, reason,
                         letter.error, extra={"dead_letter_id": letter.id, "dlq_topic": topic},
                         exc_info=failure)

    return guarded


@dataclass(frozen=True)
class DeadOutboxMessage:
    """An outgoing message whose publish attempts were exhausted (an outbox row in state `dead`)."""

    row: OutboxRow

    @property
    def message_id(self) -> str:
        return str(self.row.message_id)

    @property
    def failed_at(self) -> datetime:
        return self.row.created_at

    def to_json(self) -> dict[str, Any]:
        row = self.row
        return {
            "kind": "outbox",
            "message_id": str(row.message_id),
            "topic": row.topic,
            "key": _text_or_b64(row.key),
            "entity_key": row.entity_key,
            "value": _text_or_b64(row.value),
            "headers": [[name, value] for name, value in row.headers],
            "error": row.last_error,
            "attempts": row.attempts,
            "created_at": row.created_at.isoformat(),
            "last_failed_at": row.next_attempt_at.isoformat(),
            "status": row.status,
        }


DlqEntry = DeadLetter | DeadOutboxMessage


class OutboxDeadLetters:
    """The outbox's dead rows seen as dead letters: listed with the DLQ, reprocessed by requeueing.

    Requeueing sets the row back to pending; the relay publishes it again and the receiving
    consumer's inbox absorbs it if an earlier attempt did reach the broker after all.
    """

    def __init__(self, engine: AsyncEngine, store: OutboxStore | None = None) -> None:
        self.engine = engine
        self.store = store if store is not None else SqlOutboxStore()

    async def count(self) -> int:
        async with self.engine.connect() as conn:
            return (await self.store.backlog(conn)).dead

    async def inspect(self, limit: int) -> list[DeadOutboxMessage]:
        async with self.engine.connect() as conn:
            return [DeadOutboxMessage(row) for row in await self.store.dead_rows(conn, limit=limit)]

    async def get(self, message_id: str) -> OutboxRow | None:
        try:
            parsed = uuid.UUID(message_id)
        except ValueError:
            return None  # outbox message ids are UUIDs; anything else is a consumed dead letter's id
        async with self.engine.connect() as conn:
            return await self.store.get(conn, parsed)

    async def requeue(self, message_id: str) -> int:
        async with self.engine.begin() as conn:
            return await self.store.requeue_dead(conn, [message_id])


Outcome = Literal["reprocessed", "requeued", "already_reprocessed", "discarded", "failed", "not_found"]


@dataclass(frozen=True)
class ReprocessOutcome:
    message_id: str
    outcome: Outcome
    error: str | None = None
    dead_letter_ids: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"message_id": self.message_id, "outcome": self.outcome, "error": self.error,
                "dead_letter_ids": list(self.dead_letter_ids)}


class DeadLetterQueue:
    """A component's DLQ as operators see it: count, inspect, reprocess.

    It holds two kinds of entry: consumed messages a handler gave up on (`dead_letters`, reprocessed
    by running the handler again) and, when `outbox` is given, outgoing messages the relay could not
    publish (outbox rows in state `dead`, reprocessed by requeueing them for the relay).

    `handlers` is the handler to re-run (the unwrapped one, so a failure is reported instead of
    dead-lettered again), or one per consumer group when the component has several.
    """

    def __init__(self, component: str, store: DeadLetterStore,
                 handlers: Handler | Mapping[str, Handler] | None = None,
                 metrics: ComponentMetrics | None = None,
                 outbox: OutboxDeadLetters | None = None) -> None:
        self.component = component
        self.store = store
        self.handlers = handlers
        self.metrics = metrics
        self.outbox = outbox

    async def dlq_count(self) -> int:
        """Entries waiting for an operator: open dead letters plus dead outbox rows."""
        count = await self.store.count("open")
        if self.outbox is not None:
            count += await self.outbox.count()
        if self.metrics is not None:
            self.metrics.set_dlq_size(count)
        return count

    async def dlq_inspect(self, limit: int = 50) -> list[DlqEntry]:
        """The oldest `limit` entries with payload, error and attempt count, oldest failure first."""
        entries: list[DlqEntry] = list(await self.store.inspect(_check_limit(limit), "open"))
        if self.outbox is not None:
            entries.extend(await self.outbox.inspect(limit))
            entries.sort(key=lambda e: e.first_failed_at if isinstance(e, DeadLetter) else e.failed_at)
        return entries[:limit]

    def _handler_for(self, group: str, override: Handler | None) -> Handler:
        chosen = override if override is not None else self.handlers
        if chosen is None:
            raise DlqError(f"{self.component} has no handler to reprocess with: pass one to dlq_reprocess "
                           "or to DeadLetterQueue(handlers=...)")
        if isinstance(chosen, Mapping):
            if group not in chosen:
                raise DlqError(f"{self.component} has no reprocess handler for consumer group {group}; "
                               f"known groups: {', '.join(sorted(chosen)) or 'none'}")
            return chosen[group]
        return chosen

    async def dlq_reprocess(self, message_ids: Sequence[str],
                            handler: Handler | None = None) -> list[ReprocessOutcome]:
        """Run the handler again on each stored message (or requeue a dead outbox row).

        One outcome per requested id, in request order. Rows already reprocessed are not run again,
        and the handler's inbox makes a concurrent second run a no-op, so the effect applies once.
        """
        wanted = list(dict.fromkeys(message_ids))
        by_id: dict[str, list[DeadLetter]] = {}
        for row in await self.store.find(wanted):
            by_id.setdefault(row.message_id, []).append(row)
        outcomes = []
        for message_id in wanted:
            rows = by_id.get(message_id, [])
            if not rows and self.outbox is not None:
                outcomes.append(await self._requeue_outbox(message_id))
            else:
                outcomes.append(await self._reprocess_one(message_id, rows, handler))
        await self.dlq_count()
        return outcomes

    async def _requeue_outbox(self, message_id: str) -> ReprocessOutcome:
        assert self.outbox is not None
        row = await self.outbox.get(message_id)
        if row is None:
            return self._not_found(message_id)
        if row.status != "dead":
            return ReprocessOutcome(message_id, "already_reprocessed")
        if await self.outbox.requeue(message_id):
            logger.info("requeued dead outbox message %s for the relay", message_id)
            return ReprocessOutcome(message_id, "requeued")
        return ReprocessOutcome(message_id, "already_reprocessed")

    def _not_found(self, message_id: str) -> ReprocessOutcome:
        return ReprocessOutcome(message_id, "not_found",
                                f"no dead letter with message id {message_id} in {self.component}; "
                                "list them with dlq_inspect (GET /admin/dlq)")

    async def _reprocess_one(self, message_id: str, rows: list[DeadLetter],
                             override: Handler | None) -> ReprocessOutcome:
        if not rows:
            return self._not_found(message_id)
        open_rows = [row for row in rows if row.status == "open"]
        ids = tuple(row.id for row in rows)
        if not open_rows:
            outcome: Outcome = ("already_reprocessed" if any(r.status == "reprocessed" for r in rows)
                                else "discarded")
            return ReprocessOutcome(message_id, outcome, None, ids)
        for row in open_rows:
            try:
                handler = self._handler_for(row.group, override)
            except DlqError as exc:
                return ReprocessOutcome(message_id, "failed", str(exc), ids)
            try:
                with log_context(message_id=message_id):
                    await handler(row.as_record())
            except Exception as exc:
                error = describe_error(exc)
                await self.store.note_failure(row.id, error)
                logger.warning("reprocessing dead letter %d (%s) failed: %s", row.id, message_id, error)
                return ReprocessOutcome(message_id, "failed", error, ids)
            await self.store.mark_reprocessed([row.id])
            logger.info("reprocessed dead letter %d (%s)", row.id, message_id)
        return ReprocessOutcome(message_id, "reprocessed", None, ids)
