"""The outbox relay: publishes outbox rows to Kafka in batches, in per-key order, with backoff, dead state.

One cycle (`OutboxRelay.run_once`): claim up to `batch_size` pending, due rows; publish them as one
producer batch and wait for every acknowledgement; mark the delivered rows published with one UPDATE;
for each failed row add one attempt, set `next_attempt_at` by exponential backoff (capped at
`max_backoff_s`) and keep the error. A failure is either the broker's (unreachable, timed out, electing a
leader: the row stays pending and is retried for as long as that lasts) or the row's own (too large,
unknown or forbidden topic; `kinshasa.kernel.failures.classify_publish_error`): only the latter, once
`max_attempts` is reached, sets the row `dead` (the dead-letter state, listed by `dead_rows`, requeued by
`SqlOutboxStore.requeue_dead`), with the reason in `last_error`. Delivery is at least once: a relay that
dies after the broker acknowledged but before its UPDATE committed republishes those rows, and consumers
absorb the duplicate with their inbox.

Per-key order. "Key" is the Kafka key (an entity's `service:id`, or a run id); rows without a key have
no order to keep. Two rules hold for the rows of one key, even with several relays on one database:

1. rows are published in `seq` order, and per key `seq` order is commit order (see `outbox.py`: SQLite
   has a single writer; on PostgreSQL `append` holds an advisory lock per key until commit);
2. no row is published while an earlier row of its key is still pending, for instance in backoff.

How the claim keeps them:

* Candidates are pending, due rows that are not behind a row of their key in backoff or dead (those
  keys come from a small CTE over the partial indexes on `next_attempt_at` and on dead rows), oldest
  first. A key whose head is in backoff or dead is therefore skipped entirely; its later rows wait.
* SQLite allows one writer at a time, so run one relay per SQLite database. It reads candidates in a
  short transaction, publishes outside any transaction (so handlers can write meanwhile), and records
  outcomes in a second short transaction. Nothing else claims, so the candidates are the heads of
  their keys' queues.
* PostgreSQL keeps one transaction open from claim to mark, so every lock below lasts until the rows'
  new state is committed:
  1. candidates are selected `FOR UPDATE SKIP LOCKED`: a relay publishes only rows it holds locked,
     so no row is ever in two batches, and rows in another relay's batch are skipped at once;
  2. for each candidate key the relay takes `pg_try_advisory_xact_lock(RELAY_LOCK_NS, hash(key))`;
     rows of keys another relay holds are dropped, and later rounds (up to three) leave those keys
     out, so a hot key being published elsewhere does not starve this relay of other work;
  3. it then re-reads the pending rows of its keys in a fresh snapshot (the candidate query's may
     predate another relay's commit) and keeps, per key, only the run of rows it holds, due, that
     starts at the key's current head (`outbox.publishable_prefixes`).
  Why no two relays ever publish rows of one key at once, out of order: by step 3 a relay publishes a
  run that starts at the oldest pending row of the key as seen after it locked its rows, and that
  head row is one it holds. A row stays pending until the relay holding it commits, so while relay A
  publishes (head h, ...), every other relay's fresh read still finds h pending, does not hold it,
  and takes nothing of the key; after A commits, the next read sees A's outcome (published, or h in
  backoff, which stops the key). Rule 1 means no earlier row can appear later. Step 3 alone is enough
  for this argument; the key lock of step 2 is what lets a relay give up a busy key before it has
  spent a round on it.
* Within a batch the rows of one key go out in `seq` order through the idempotent producer
  (`enable.idempotence`, `acks=all`), which keeps one partition's order across its own retries. That
  covers a key's rows only if they share a partition, so a key's run in a batch also stops where its
  topic changes: the rows for the next topic wait for the next batch, after the earlier ones are
  acknowledged (otherwise a row for topic B could be acknowledged while an earlier one for topic A of
  the same key failed).
* If the producer cannot queue an item it stops there and reports the rest as not sent; those rows
  keep their attempt count and stay due, so one poison message costs no other row an attempt.

Pipelining. `run` keeps up to `pipeline_depth` batches in flight so that claiming and recording
overlap the broker's acknowledgements. On PostgreSQL a new claim excludes every key (and row) of the
batches still in flight, so two batches of one relay never hold the same key either, and each in-flight
batch keeps its own transaction, whose row and key locks make the other batches skip its keys. On SQLite
a new claim excludes only the rows of the batches in flight (and the keys of rows they did not deliver,
once known), so its read overlaps their wait for the broker; the batch then publishes only after every
batch that was in flight when its read began has settled, without the rows of any key those did not
deliver (they stay pending, behind that key), and records its outcome only after theirs were recorded:
if one of theirs was not, its own is not either, and its rows go out again after theirs. A relay that
dies therefore leaves a suffix of its batches pending, republished in order.

Dead rows. A dead row keeps blocking its key (the claim's CTE, and on PostgreSQL the fresh read, which
sees dead rows as never due): per-key order is never broken silently. The key's later rows wait until an
operator requeues the dead one (`dlq_reprocess`, `requeue_dead`), which makes it the key's head again;
other keys flow meanwhile. An unavailable broker never makes a row dead, so an outage only delays.

A row the broker refuses for a reason of its own (too large for its topic) fails every row after it in
its partition that the producer had sent, whether they shared its request or followed in later ones: the
producer keeps librdkafka's gapless guarantee and is rebuilt after it (`kinshasa.topics.producer`). The
rows that shared its request are sent again one by one (`_isolate`), so only the refused row pays an
attempt of its own. The rows the producer still held, of any topic, are purged from its queues (most
never sent; some sent, refused out of sequence and put back); they pay no attempt when another row of
their batch was delivered or refused for a reason of its own, and go out with the next claim. The rest
of a batch being produced then is not sent (`kinshasa.topics.producer`).

What is not guaranteed: a broker that loses one message of a partition but acknowledges the next one
would break the order; that is logged as a warning. Nor does the gapless guarantee cover a message that
fails by timing out (`message.timeout.ms`, librdkafka's 5 minutes by default) while a later one of its
partition is acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncTransaction

from kinshasa.kernel import tracing
from kinshasa.kernel.database import READ_ONLY
from kinshasa.kernel.failures import classify_publish_error, kafka_error_name
from kinshasa.kernel.outbox import (
    ClaimedRow,
    FailedAttempt,
    OutboxStore,
    SqlOutboxStore,
    dead_rows,
    utcnow,
)
from kinshasa.topics.producer import Delivered, Outgoing, PublishError

__all__ = [
    "NOT_SENT_PREFIX",
    "RELAY_BATCH",
    "BatchPublisher",
    "OutboxRelay",
    "PublishOutcome",
    "RelayStats",
    "backoff_delay",
    "dead_reason",
    "dead_rows",
    "default_relay_id",
    "order_breaks",
    "plan_failures",
    "publish_outcomes",
]

log = logging.getLogger(__name__)

_SIZE_ERRORS = frozenset({"MSG_SIZE_TOO_LARGE", "_MSG_SIZE_TOO_LARGE", "INVALID_MSG_SIZE",
                          "RECORD_LIST_TOO_LARGE"})

def _is_size_error(error: str) -> bool:
    return kafka_error_name(error) in _SIZE_ERRORS


# Rows per claim, by database. Each batch waits for every acknowledgement before its rows are marked, and a
# wait costs the broker's acks=all round trip whatever the batch holds (and, when these figures were taken,
# the producer's 5 ms linger):
# `bench_relay` (20,000 messages) measured SQLite at 0.2 of a bare producer's rate with 500 rows a claim
# and 0.3 with 2,000. PostgreSQL stays at 500: its claim holds an advisory lock per key until commit, two
# batches in flight per relay, and the server's lock table is shared by every relay on it (by default
# 64 x max_connections entries), so 2,000 keys a batch would leave a few relays catching up after an outage
# failing with "out of shared memory". A lone write still goes out at once: a claim takes what is pending.
RELAY_BATCH = {"sqlite": 2000, "postgresql": 500}

# How AsyncProducer.send_batch marks items it never produced: an earlier item could not be queued, or the
# producer failed while the batch was being produced.
NOT_SENT_PREFIX = "not sent"
# librdkafka's error for a message purged from a producer's queue (never sent, or sent and put back to be
# sent again): a fatal error purges what the producer holds. When another row of the batch was refused for
# a reason of its own (which is such a fatal error, see `kinshasa.topics.producer`) or delivered, these
# rows pay no attempt for it. When nothing went through at all, the producer itself is failing (its
# idempotent producer id refused, say): they pay one, so the relay backs off instead of spinning.
_PURGED = frozenset({"_PURGE_QUEUE"})


class BatchPublisher(Protocol):
    """What the relay needs of `kinshasa.topics.producer.AsyncProducer`."""

    async def send_batch(self, items: Sequence[Outgoing]) -> list[Delivered]: ...


@dataclass
class RelayStats:
    """What one relay cycle (or, summed, a whole run) did."""

    claimed: int = 0
    published: int = 0
    retrying: int = 0  # failed, scheduled for another attempt
    dead: int = 0  # failed for the last allowed time
    not_sent: int = 0  # left untouched: not produced (see NOT_SENT_PREFIX), purged unsent for another
    # row's failure, or (SQLite) an earlier batch failed a row of its key
    seconds: float = 0.0

    def add(self, other: RelayStats) -> None:
        self.claimed += other.claimed
        self.published += other.published
        self.retrying += other.retrying
        self.dead += other.dead
        self.not_sent += other.not_sent
        self.seconds += other.seconds


@dataclass(frozen=True)
class PublishOutcome:
    """The fate of one item of a batch: delivered, failed (an attempt), or never sent (no attempt)."""

    delivered: bool
    attempted: bool = True
    error: str | None = None


_DELIVERED = PublishOutcome(delivered=True)


def backoff_delay(attempts: int, *, base_s: float, max_s: float, jitter: float = 0.0,
                  rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after the `attempts`-th failed attempt: base * 2^(attempts-1), capped at max_s.

    `jitter` (0..1) shortens the delay by up to that fraction, so rows that failed together (or
    several relays) do not all retry in the same instant; the cap is never exceeded.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1 after a failure, got {attempts}")
    exponent = min(attempts - 1, 62)  # past this the cap applies anyway; avoids float overflow
    delay = min(max_s, base_s * (2.0 ** exponent))
    if jitter:
        delay *= 1.0 - min(max(jitter, 0.0), 1.0) * rand()
    return max(0.0, delay)


def publish_outcomes(count: int, error: BaseException | None) -> list[PublishOutcome]:
    """Per-item outcomes of a `send_batch` of `count` items that returned (error None) or raised `error`."""
    if error is None:
        return [_DELIVERED] * count
    if not isinstance(error, PublishError):
        # The publisher failed as a whole (closed, bug, cancelled deliveries): count it against every row.
        text = f"{type(error).__name__}: {error}"
        return [PublishOutcome(delivered=False, error=text) for _ in range(count)]
    outcomes = [PublishOutcome(delivered=error.delivered[i] is not None) if i < len(error.delivered)
                else PublishOutcome(delivered=False, error="no delivery report") for i in range(count)]
    another_row_explains_a_purge = (any(d is not None for d in error.delivered)
                                    or any(classify_publish_error(f.error) == "own" for f in error.failures))
    for failure in error.failures:
        if 0 <= failure.index < count:
            attempted = not (failure.error.startswith(NOT_SENT_PREFIX)
                             or (another_row_explains_a_purge and kafka_error_name(failure.error) in _PURGED))
            outcomes[failure.index] = PublishOutcome(delivered=False, attempted=attempted,
                                                     error=failure.error)
    return outcomes


def dead_reason(row: ClaimedRow, error: str) -> str:
    """Why a row is dead, in words an operator can act on; the broker's error follows."""
    name = kafka_error_name(error)
    if name in _SIZE_ERRORS:
        size = len(row.value) + len(row.key or b"") + sum(len(k) + len(v) for k, v in row.headers)
        return (f"message of {size} bytes is larger than the broker or producer accepts (message.max.bytes): "
                f"{error}. Shrink the payload (store large data elsewhere and send a reference), then "
                "requeue it with dlq_reprocess; the later messages of its key wait behind it")
    return (f"the broker refused this message ({name}): {error}. Fix the cause (does topic {row.topic} "
            "exist? may this component write to it?), then requeue it with dlq_reprocess; the later "
            "messages of its key wait behind it")


def plan_failures(rows: Sequence[ClaimedRow], outcomes: Sequence[PublishOutcome], *, now: datetime,
                  max_attempts: int, base_backoff_s: float, max_backoff_s: float, jitter: float = 0.0,
                  rand: Callable[[], float] = random.random) -> list[FailedAttempt]:
    """The new attempt count, retry time and state of every row whose publish was attempted and failed.

    Only a failure of the row's own (`classify_publish_error` says "own") counts toward death, once the
    row's attempts reach `max_attempts`; a broker that is unavailable keeps the row pending, retried at
    most `max_backoff_s` apart, however long the outage lasts. Attempts are counted either way, so an
    own failure after a long outage kills the row at once: it blocks its key, so order still holds.
    """
    planned: list[FailedAttempt] = []
    for row, outcome in zip(rows, outcomes, strict=True):
        if outcome.delivered or not outcome.attempted:
            continue
        attempts = row.attempts + 1
        error = outcome.error or "publish failed"
        dead = attempts >= max_attempts and classify_publish_error(error) == "own"
        # A dead row is never retried on its own; its next_attempt_at records when it died instead.
        delay = 0.0 if dead else backoff_delay(attempts, base_s=base_backoff_s, max_s=max_backoff_s,
                                               jitter=jitter, rand=rand)
        planned.append(FailedAttempt(
            seq=row.seq, attempts=attempts, next_attempt_at=now + timedelta(seconds=delay),
            error=dead_reason(row, error) if dead else error, dead=dead,
        ))
    return planned


def order_breaks(rows: Sequence[ClaimedRow], outcomes: Sequence[PublishOutcome]) -> list[ClaimedRow]:
    """Delivered rows that follow an undelivered row of the same key in the batch, attempted or not (the
    broker or the producer broke the order)."""
    failed_keys: set[bytes] = set()
    broken: list[ClaimedRow] = []
    for row, outcome in zip(rows, outcomes, strict=True):
        if row.key is None:
            continue
        if outcome.delivered:
            if row.key in failed_keys:
                broken.append(row)
        else:
            failed_keys.add(row.key)
    return broken


def default_relay_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(eq=False)
class _Batch:
    """A claimed batch; on PostgreSQL it keeps its connection and transaction (and so its locks) open.

    On SQLite a batch may be claimed while earlier ones are still publishing (`after`): it then publishes
    only once they are settled, without the rows of any key they did not deliver, and records its outcome
    only after theirs.
    """

    rows: list[ClaimedRow]
    conn: AsyncConnection | None = None
    tx: AsyncTransaction | None = None
    after: list[_Batch] = field(default_factory=list)
    # Whether its claim left out the keys of other batches, so rows it did not take may be pending.
    left_keys_out: bool = False
    # The keys with a row the broker did not acknowledge, once every row's fate is known (None until then).
    unsettled: set[bytes] | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    recorded: asyncio.Event = field(default_factory=asyncio.Event)
    # Whether its outcome was committed; a later batch records its own only after every earlier one did.
    recorded_ok: bool = False

    @property
    def keys(self) -> set[bytes]:
        return {r.key for r in self.rows if r.key is not None}

    @property
    def seqs(self) -> set[int]:
        return {r.seq for r in self.rows}

    def settle(self, unsettled: set[bytes] | None = None) -> None:
        """Every row's fate is known: `unsettled` are the keys not delivered (all of them if not given)."""
        if self.unsettled is None:
            self.unsettled = self.keys if unsettled is None else unsettled
        self.settled.set()


class OutboxRelay:
    """Publishes a component's outbox to Kafka; run one per SQLite database, any number per PostgreSQL one.

    `run` pipelines up to `pipeline_depth` batches: while one batch waits for the broker, the next is
    claimed, so the database work hides behind the publish. Pipelining keeps per-key order: on PostgreSQL
    a batch never holds a key another of its in-flight batches holds (see `OutboxStore.claim`'s
    exclusions); on SQLite a batch publishes after the ones in flight when it was claimed, without the
    rows of keys they failed (see the module's "Pipelining").
    """

    def __init__(
        self,
        engine: AsyncEngine,
        publisher: BatchPublisher,
        *,
        batch_size: int | None = None,
        max_attempts: int = 10,
        base_backoff_s: float = 0.2,
        max_backoff_s: float = 30.0,
        relay_id: str | None = None,
        jitter: float = 0.1,
        pipeline_depth: int = 2,
        store: OutboxStore | None = None,
        clock: Callable[[], datetime] = utcnow,
        on_publish_failure: Callable[[str, int], None] | None = None,
    ) -> None:
        if batch_size is None:
            batch_size = RELAY_BATCH.get(engine.dialect.name, min(RELAY_BATCH.values()))
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        if base_backoff_s < 0 or max_backoff_s < base_backoff_s:
            raise ValueError("backoff must satisfy 0 <= base_backoff_s <= max_backoff_s, "
                             f"got base {base_backoff_s}, max {max_backoff_s}")
        if pipeline_depth < 1:
            raise ValueError(f"pipeline_depth must be at least 1, got {pipeline_depth}")
        self.engine = engine
        self.publisher = publisher
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.relay_id = relay_id or default_relay_id()
        self.jitter = jitter
        self.pipeline_depth = pipeline_depth
        self.store = store or SqlOutboxStore()
        self.clock = clock
        # e.g. ComponentMetrics.publish_failed(topic, count)
        self.on_publish_failure = on_publish_failure
        self.totals = RelayStats()
        self._wake = asyncio.Event()
        # Set when a batch's publish outcome is known, before it is recorded (SQLite): `run` may claim again.
        self._settled = asyncio.Event()
        # Batches claimed and not yet recorded, by any caller (run, run_once, a drain on shutdown): each
        # claim excludes their rows (and on PostgreSQL their keys; see `_claim`), and claims are serialised
        # so two cannot read the same rows.
        self._inflight: list[_Batch] = []
        self._claim_lock = asyncio.Lock()
        self._postgres = engine.dialect.name == "postgresql"

    def wake(self) -> None:
        """Cut the idle sleep short, e.g. right after a unit of work committed outbox rows."""
        self._wake.set()

    async def run_once(self) -> RelayStats:
        """Claim one batch, publish it, record the outcome; returns what happened (claimed 0 when idle)."""
        started = time.perf_counter()
        batch = await self._claim()
        stats = await self._finish(batch)
        stats.seconds = time.perf_counter() - started
        return stats

    async def _claim(self) -> _Batch:
        async with self._claim_lock:
            exclude_seqs: set[int] = set().union(*(b.seqs for b in self._inflight))
            if self._postgres:
                exclude_keys: set[bytes] = set().union(*(b.keys for b in self._inflight))
            else:
                # SQLite: the keys of batches still publishing are not left out. The new batch publishes
                # after them and drops the rows of any key they failed to deliver (`_publish_and_record`),
                # so per-key order holds while this read overlaps their wait for the broker. The keys a
                # settled batch failed to deliver are left out until its outcome is recorded.
                exclude_keys = set().union(*(b.unsettled for b in self._inflight if b.unsettled is not None))
            # Taken before the read: a batch that ends while the claim runs is still one to go after (its
            # outcome may postdate the read's snapshot).
            earlier = [] if self._postgres else list(self._inflight)
            batch = await self._claim_excluding(exclude_keys, exclude_seqs)
            batch.left_keys_out = bool(exclude_keys)
            if batch.rows:
                batch.after = earlier
                self._inflight.append(batch)
            return batch

    async def _claim_excluding(self, exclude_keys: set[bytes], exclude_seqs: set[int]) -> _Batch:
        if not self._postgres:
            # A read (deferred) transaction: the claim writes nothing on SQLite, and taking the database's
            # only write lock for it would make every writer of the process wait for the relay.
            async with self.engine.connect() as conn:
                await conn.execution_options(**{READ_ONLY: True})
                async with conn.begin():
                    rows = await self.store.claim(conn, limit=self.batch_size, now=self.clock(),
                                                  exclude_keys=exclude_keys, exclude_seqs=exclude_seqs)
            # Publish outside any transaction: on SQLite a transaction holds the database's only write
            # lock, and handlers must be able to commit while the broker acknowledges.
            return _Batch(rows)
        # Claim, publish and mark in one transaction: the row and key locks last until the new states
        # are committed, which is what lets several relays (and pipelined batches) share one database.
        conn = await self.engine.connect()
        try:
            tx = await conn.begin()
            rows = await self.store.claim(conn, limit=self.batch_size, now=self.clock(),
                                          exclude_keys=exclude_keys, exclude_seqs=exclude_seqs)
        except BaseException:
            await conn.close()
            raise
        if not rows:
            await tx.rollback()
            await conn.close()
            return _Batch(rows)
        return _Batch(rows, conn, tx)

    async def _finish(self, batch: _Batch) -> RelayStats:
        """Publish a claimed batch and record the outcome (committing its transaction on PostgreSQL)."""
        try:
            stats = await self._publish_and_record(batch)
            if batch.tx is not None:
                await batch.tx.commit()
            batch.recorded_ok = True
        finally:
            # Failed or cancelled before its outcome was known: a later batch drops all of its keys.
            batch.settle()
            batch.recorded.set()
            batch.after = []  # or every batch would keep the whole chain of earlier ones alive
            await self._release(batch)
        self.totals.add(stats)
        return stats

    async def _release(self, batch: _Batch) -> None:
        batch.settle()
        batch.recorded.set()
        try:
            if batch.conn is not None and not batch.conn.closed:
                await batch.conn.close()  # rolls back if the commit was not reached
        finally:
            if batch in self._inflight:
                self._inflight.remove(batch)

    async def _publish_and_record(self, batch: _Batch) -> RelayStats:
        stats = RelayStats(claimed=len(batch.rows))
        if batch.after:
            # SQLite, claimed while earlier batches published: go after them, without the rows of any key
            # they did not deliver (those rows stay pending and due, with their attempts, behind that key).
            failed: set[bytes] = set()
            for earlier in batch.after:
                await earlier.settled.wait()
                failed |= earlier.unsettled or set()
            if failed:
                batch.rows = [r for r in batch.rows if r.key is None or r.key not in failed]
                stats.not_sent = stats.claimed - len(batch.rows)
        rows = batch.rows
        if not rows:
            return stats
        # Each row's traceparent header becomes its publish span's, so the consumer is that span's child.
        publishing = tracing.Publishing([(r.topic, r.headers) for r in rows])
        items = [Outgoing(r.topic, r.key, r.value, publishing.headers(i, r.headers))
                 for i, r in enumerate(rows)]
        error: BaseException | None = None
        try:
            await self.publisher.send_batch(items)
        except Exception as exc:
            error = exc
        publishing.end(error)
        outcomes = publish_outcomes(len(rows), error)
        if len(rows) > 1 and any(not o.delivered and o.error and _is_size_error(o.error) for o in outcomes):
            outcomes = await self._isolate(rows, outcomes)
        if batch.conn is None:
            # SQLite: a later batch may now publish the later rows of every key delivered here, and a new
            # claim leaves out only the keys that were not (their rows go into backoff, or stay the key's
            # head, when this outcome is recorded). On PostgreSQL this batch's locks last until its commit.
            batch.settle({r.key for r, o in zip(rows, outcomes, strict=True)
                          if r.key is not None and not o.delivered})
            self._settled.set()
        now = self.clock()
        published = [r.seq for r, o in zip(rows, outcomes, strict=True) if o.delivered]
        failures = plan_failures(rows, outcomes, now=now, max_attempts=self.max_attempts,
                                 base_backoff_s=self.base_backoff_s, max_backoff_s=self.max_backoff_s,
                                 jitter=self.jitter)
        if batch.conn is not None:
            await self._record(batch.conn, published, failures, now)
        else:
            # Outcomes are committed in claim order, so a relay that dies leaves a suffix of its batches
            # pending, republished in order.
            for earlier in batch.after:
                await earlier.recorded.wait()
            if not all(earlier.recorded_ok for earlier in batch.after):
                # Its rows stay pending and are published again after the earlier batch's, in order.
                raise RuntimeError("an earlier batch's outcome was not recorded, so this batch's is not "
                                   "either: its rows stay pending and go out again after that batch's")
            async with self.engine.begin() as conn:
                await self._record(conn, published, failures, now)
        stats.published = len(published)
        stats.dead = sum(1 for f in failures if f.dead)
        stats.retrying = len(failures) - stats.dead
        stats.not_sent += sum(1 for o in outcomes if not o.delivered and not o.attempted)
        self._report(rows, outcomes, failures)
        return stats

    async def _isolate(self, rows: list[ClaimedRow], outcomes: list[PublishOutcome]) -> list[PublishOutcome]:
        """Publish again, one by one, the rows of a batch that failed with a size error.

        The broker refuses a whole request when one message in it is too large, so every row sharing it
        gets the same error; only a row that fails alone is known to be too large itself. A row whose
        key already failed here is left unattempted, so it neither goes out of order nor pays an attempt.
        """
        isolated = list(outcomes)
        failed_keys: set[bytes] = set()
        for index, (row, outcome) in enumerate(zip(rows, outcomes, strict=True)):
            if outcome.delivered:
                continue
            if not outcome.attempted or not (outcome.error and _is_size_error(outcome.error)):
                # Not sent, purged, or failed otherwise: its key's later rows must not go out alone.
                if row.key is not None:
                    failed_keys.add(row.key)
                continue
            if row.key is not None and row.key in failed_keys:
                isolated[index] = PublishOutcome(delivered=False, attempted=False, error=outcome.error)
                continue
            try:
                await self.publisher.send_batch([Outgoing(row.topic, row.key, row.value,
                                                          list(row.headers) or None)])
            except Exception as exc:
                [isolated[index]] = publish_outcomes(1, exc)
                if row.key is not None:
                    failed_keys.add(row.key)
            else:
                isolated[index] = PublishOutcome(delivered=True)
        return isolated

    async def _record(self, conn: AsyncConnection, published: list[int], failures: list[FailedAttempt],
                      now: datetime) -> None:
        await self.store.mark_published(conn, published, now=now, relay_id=self.relay_id)
        await self.store.record_failures(conn, failures, relay_id=self.relay_id)

    def _report(self, rows: list[ClaimedRow], outcomes: list[PublishOutcome],
                failures: list[FailedAttempt]) -> None:
        for row in order_breaks(rows, outcomes):
            log.warning("outbox message %s (key %r) was acknowledged after an earlier message of its key "
                        "failed: consumers see it out of order", row.message_id, row.entity_key)
        if not failures:
            return
        by_seq = {r.seq: r for r in rows}
        per_topic: dict[str, int] = {}
        for failure in failures:
            row = by_seq[failure.seq]
            per_topic[row.topic] = per_topic.get(row.topic, 0) + 1
            if failure.dead:
                log.error("outbox message %s to %s (key %r) is dead after %d attempts and holds its key: %s",
                          row.message_id, row.topic, row.entity_key, failure.attempts, failure.error)
        first = failures[0]
        log.warning("outbox relay %s: %d of %d messages failed to publish, retrying with backoff; first: %s",
                    self.relay_id, len(failures), len(rows), first.error)
        if self.on_publish_failure is not None:
            for topic, count in per_topic.items():
                self.on_publish_failure(topic, count)

    async def run(self, stop: asyncio.Event, idle_sleep_s: float = 0.2) -> RelayStats:
        """Relay until `stop` is set, then finish the batches in flight; returns the totals.

        A full batch is followed at once by the next claim, up to `pipeline_depth` batches in flight;
        otherwise the relay idles `idle_sleep_s` (or until `wake()`). Database or publisher errors do
        not end the loop: they are logged and retried with backoff, because a relay that exits silently
        leaves every later message unpublished.
        """
        inflight: dict[asyncio.Task[RelayStats], _Batch] = {}
        errors = 0
        # Whether rows may be waiting that no claim has taken: false after a claim that was not full and
        # left no key out, until the next wake or poll. Rows committed after that claim read the outbox
        # wake the relay (or the poll finds them), so claiming again before waiting would find nothing.
        # Not on PostgreSQL: there a claim also skips keys other relays hold, which this one cannot see
        # being released, so it claims again after every batch as before.
        may_have_more = True
        try:
            while True:
                claimed_full = False
                # A batch that settles from here on wakes the wait below at once.
                self._settled.clear()
                # A batch whose outcome is only being recorded does not count toward the depth (its keys
                # are free, SQLite), but at most as many more may be recording.
                publishing = sum(1 for b in inflight.values() if b.unsettled is None)
                room = publishing < self.pipeline_depth and len(inflight) < 2 * self.pipeline_depth
                if not stop.is_set() and room and may_have_more:
                    try:
                        batch = await self._claim()
                    except Exception:
                        errors += 1
                        log.exception("outbox relay %s: claiming a batch failed (%d in a row); check the "
                                      "database", self.relay_id, errors)
                        await self._after_error(stop, errors)
                        continue
                    errors = 0
                    claimed_full = len(batch.rows) >= self.batch_size
                    # A claim that left keys out (on SQLite those of rows not delivered) may have left
                    # rows behind that a later claim takes.
                    may_have_more = claimed_full or batch.left_keys_out or self._postgres
                    if batch.rows:
                        inflight[asyncio.create_task(self._finish(batch))] = batch
                if claimed_full and publishing + 1 < self.pipeline_depth:
                    continue  # more work is waiting: claim the next batch while this one publishes
                if inflight:
                    settled = asyncio.ensure_future(self._settled.wait())
                    try:
                        done, _ = await asyncio.wait({*inflight, settled},
                                                     return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        settled.cancel()
                    # A batch that settled makes room for the next claim, if `may_have_more` still says
                    # one may find something: claims no longer leave its keys out.
                    for task in [t for t in inflight if t in done]:
                        inflight.pop(task)
                        if task.exception() is not None:
                            errors += 1
                            log.error("outbox relay %s: finishing a batch failed (%d in a row); its rows "
                                      "stay pending and will be published again; check the database",
                                      self.relay_id, errors, exc_info=task.exception())
                            await self._after_error(stop, errors)
                        else:
                            errors = 0
                            if task.result().not_sent:
                                may_have_more = True  # its untouched rows are still due
                    continue
                if stop.is_set():
                    return self.totals
                await self._idle(stop, idle_sleep_s)
                may_have_more = True
        finally:
            # Cancelled: give the in-flight batches' connections back; their rows stay pending.
            for task in inflight:
                task.cancel()
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)
            for batch in inflight.values():
                await self._release(batch)  # a task cancelled before it started never released it

    async def _after_error(self, stop: asyncio.Event, errors: int) -> None:
        # Back off so a database outage is not hammered; `stop` still ends the wait at once.
        await self._idle(stop, backoff_delay(errors, base_s=max(self.base_backoff_s, 0.05),
                                             max_s=self.max_backoff_s))

    async def _idle(self, stop: asyncio.Event, seconds: float) -> None:
        stop_wait = asyncio.ensure_future(stop.wait())
        wake_wait = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({stop_wait, wake_wait}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
            wake_wait.cancel()
        self._wake.clear()
