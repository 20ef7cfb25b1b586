"""Per-component hash-chained receipts: every cross-component emission leaves a tamper-evident trace.

A receipt is appended in the same transaction as the emission it records, so a committed emission
always has its receipt and a rolled-back one never does. Receipts are idempotent on their source
tuple (where the emission came from: a command's message id, a consumed record's
topic/partition/offset), so a redelivered message re-appends nothing.

Each receipt's hash covers its sequence number, the previous receipt's hash, the component, the
source tuple, the message id and the payload digest, in one canonical encoding (`canonical_bytes`).
`verify` walks the chain and names every missing sequence number (gap), every receipt whose
`prev_hash` does not match its predecessor's hash (broken link) and every receipt whose content no
longer matches its own hash (bad hash). Removing the newest receipts is not detectable from the
chain alone; anchor the head hash elsewhere (an alert, a log line) if that matters.

A component that keeps a chain opens it when it starts (`ReceiptChain.open`: its `receipt_chains` row), so
"keeps a chain but has emitted nothing yet" (length 0, fine) is told apart from "keeps none" (refused by
`verify_chain`, never reported as a valid empty chain). `verify_chain` also checks the chain's source
linkage: every message in the component's outbox has its receipt, with the same payload digest, and
(through the component's own `SourceCheck`) every receipt's source still exists.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    insert,
    inspect,
    select,
    text,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kinshasa.kernel.database import READ_ONLY
from kinshasa.kernel.outbox import outbox
from kinshasa.kernel.tables import kernel_metadata
from kinshasa.schemas.clock import utcnow

GENESIS_HASH = "0" * 64
# Rows read per round trip during verify: bounded memory for chains of millions of receipts.
_VERIFY_BATCH = 1000

SourcePart = str | int
Source = tuple[SourcePart, ...]

receipts = Table(
    "receipts",
    kernel_metadata,
    # (component, seq) rather than seq alone: one chain per component, and a database that holds
    # several components' chains (tests, a shared dev database) still keeps each chain gapless.
    Column("component", String(64), nullable=False),
    Column("seq", BigInteger, nullable=False, autoincrement=False),
    Column("source", Text, nullable=False),
    Column("message_id", String(64), nullable=False),
    Column("payload_digest", String(64), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("component", "seq", name="pk_receipts"),
    UniqueConstraint("component", "source", name="uq_receipts_component_source"),
)


# Which components keep a chain in this database, from their first start on: what tells "keeps a chain
# and has emitted nothing yet" from "keeps none". The receipts table holds receipts only.
receipt_chains = Table(
    "receipt_chains",
    kernel_metadata,
    Column("component", String(64), nullable=False),
    Column("opened_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("component", name="pk_receipt_chains"),
)


class ReceiptError(ValueError):
    """A receipt cannot be appended as asked (bad source tuple or digest)."""


@dataclass(frozen=True)
class Receipt:
    seq: int
    component: str
    source: Source
    message_id: str
    payload_digest: str
    prev_hash: str
    hash: str
    created_at: datetime


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of walking one chain; every list holds exact sequence numbers, ascending."""

    ok: bool
    checked: int
    gaps: list[int] = field(default_factory=list)
    broken_links: list[int] = field(default_factory=list)
    bad_hashes: list[int] = field(default_factory=list)
    head_seq: int = 0
    head_hash: str = GENESIS_HASH

    def problems(self) -> list[str]:
        """One human-readable line per problem, ordered by sequence number."""
        lines = [(seq, f"gap: receipt seq {seq} is missing") for seq in self.gaps]
        lines += [(seq, f"broken link: receipt seq {seq} does not link to the hash of the receipt "
                        "before it") for seq in self.broken_links]
        lines += [(seq, f"bad hash: receipt seq {seq} was altered (its content no longer matches "
                        "its hash)") for seq in self.bad_hashes]
        return [line for _, line in sorted(lines, key=lambda item: item[0])]


def payload_digest(payload: bytes | str | Mapping[str, Any]) -> str:
    """The sha256 hex digest a receipt stores for a payload; mappings are hashed in canonical JSON."""
    if isinstance(payload, Mapping):
        data = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          default=str).encode("utf-8")
    elif isinstance(payload, str):
        data = payload.encode("utf-8")
    else:
        data = bytes(payload)
    return hashlib.sha256(data).hexdigest()


def _check_source(source: Iterable[Any]) -> Source:
    parts = tuple(source)
    if not parts:
        raise ReceiptError("a receipt's source tuple is empty; pass where the emission came from, "
                           "e.g. ('command', message_id) or ('kafka', topic, partition, offset)")
    for part in parts:
        # bool is an int subclass but would encode as true/false, so it is refused explicitly.
        if isinstance(part, bool) or not isinstance(part, str | int):
            raise ReceiptError(f"source tuple parts must be str or int, got {part!r} "
                               f"({type(part).__name__}); convert it before appending")
    return parts


def encode_source(source: Source) -> str:
    """The canonical text a source tuple is stored (and made unique) as."""
    return json.dumps(list(source), separators=(",", ":"), ensure_ascii=False)


def decode_source(stored: str) -> Source:
    return tuple(json.loads(stored))


def canonical_bytes(seq: int, prev_hash: str, component: str, source: Source, message_id: str,
                    digest: str) -> bytes:
    """The exact bytes a receipt's hash covers.

    A JSON array with fixed field order, no whitespace and UTF-8 text: unambiguous (no field can
    bleed into the next, unlike plain concatenation) and reproducible from any language.
    """
    return json.dumps([seq, prev_hash, component, list(source), message_id, digest],
                      separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def receipt_hash(seq: int, prev_hash: str, component: str, source: Source, message_id: str,
                 digest: str) -> str:
    return hashlib.sha256(canonical_bytes(seq, prev_hash, component, source, message_id,
                                          digest)).hexdigest()


class ChainChecker:
    """Pure chain verification, fed receipts in ascending seq order (any batch size)."""

    def __init__(self) -> None:
        self.checked = 0
        self.gaps: list[int] = []
        self.broken_links: list[int] = []
        self.bad_hashes: list[int] = []
        self._expected_seq = 1
        self._prev_hash = GENESIS_HASH

    def feed(self, receipt: Receipt) -> None:
        self.checked += 1
        if receipt.seq > self._expected_seq:
            self.gaps.extend(range(self._expected_seq, receipt.seq))
        # Compared with the previous *present* receipt: after a deleted row the next one's link
        # points at a hash nobody holds any more, which is exactly the broken link to report.
        if receipt.prev_hash != self._prev_hash:
            self.broken_links.append(receipt.seq)
        expected = receipt_hash(receipt.seq, receipt.prev_hash, receipt.component, receipt.source,
                                receipt.message_id, receipt.payload_digest)
        if expected != receipt.hash:
            self.bad_hashes.append(receipt.seq)
        self._expected_seq = receipt.seq + 1
        self._prev_hash = receipt.hash

    def report(self) -> VerifyReport:
        return VerifyReport(ok=not (self.gaps or self.broken_links or self.bad_hashes),
                            checked=self.checked, gaps=list(self.gaps),
                            broken_links=list(self.broken_links), bad_hashes=list(self.bad_hashes),
                            head_seq=self._expected_seq - 1, head_hash=self._prev_hash)


def check_chain(rows: Iterable[Receipt]) -> VerifyReport:
    checker = ChainChecker()
    for row in rows:
        checker.feed(row)
    return checker.report()


# Sources per IN (...) lookup in append_many.
_LOOKUP_CHUNK = 500


def _lock_key(component: str) -> int:
    # A stable signed 64-bit key per component for pg_advisory_xact_lock.
    return int.from_bytes(hashlib.sha256(f"kinshasa.receipts:{component}".encode()).digest()[:8],
                          "big", signed=True)


def _row_to_receipt(row: Any) -> Receipt:
    created = row.created_at
    if created is not None and created.tzinfo is None:
        # SQLite hands back naive datetimes; they were written in UTC.
        created = created.replace(tzinfo=UTC)
    return Receipt(seq=row.seq, component=row.component, source=decode_source(row.source),
                   message_id=row.message_id, payload_digest=row.payload_digest,
                   prev_hash=row.prev_hash, hash=row.hash, created_at=created)


class ReceiptChain:
    """One component's chain. Stateless: every call works inside the connection it is given."""

    def __init__(self, component: str) -> None:
        if not component:
            raise ReceiptError("a receipt chain needs its component name, e.g. 'gateway'")
        self.component = component

    async def append(self, conn: AsyncConnection, source: Iterable[SourcePart], message_id: str,
                     digest_of_payload: str) -> Receipt:
        """Append a receipt inside the caller's transaction; a repeated source returns the first one.

        The caller commits or rolls back with its own work, so receipt and emission share fate.
        """
        return (await self.append_many(conn, [(source, message_id, digest_of_payload)]))[0]

    async def append_many(self, conn: AsyncConnection,
                          items: Iterable[tuple[Iterable[SourcePart], str, str]]) -> list[Receipt]:
        """`append` for several (source, message_id, digest) items at once, chained in the given order.

        One lookup of the sources already there, one read of the head and one insert, whatever the
        count: the same receipts, seqs and hashes as appending them one by one. A source listed twice,
        or already in the chain, yields the first receipt again and appends nothing.
        """
        checked = []
        for source, message_id, digest_of_payload in items:
            parts = _check_source(source)
            digest = digest_of_payload.lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ReceiptError(f"digest_of_payload must be a sha256 hex digest, got "
                                   f"{digest_of_payload!r}; use kinshasa.kernel.receipts.payload_digest")
            checked.append((parts, encode_source(parts), message_id, digest))
        if not checked:
            return []
        if not conn.in_transaction():
            raise ReceiptError("ReceiptChain.append must run inside the caller's transaction "
                               "(async with engine.begin() as conn: ...)")
        await self._lock(conn)
        known: dict[str, Receipt] = {}
        encoded = list(dict.fromkeys(e for _, e, _, _ in checked))
        wanted = set(encoded)
        # The first lookup also reads the chain's head (the row with the highest seq): one round trip
        # fewer for every transaction, most of which append a handful of receipts. A UNION ALL, not an
        # OR: each half is then an index search (SQLite would scan the component's whole chain for OR).
        ours = receipts.c.component == self.component
        head = select(receipts).where(ours, receipts.c.seq == select(func.max(receipts.c.seq))
                                      .where(ours).scalar_subquery())
        seq, prev_hash = 0, GENESIS_HASH
        for start in range(0, len(encoded), _LOOKUP_CHUNK):
            lookup = select(receipts).where(ours, receipts.c.source.in_(encoded[start:start + _LOOKUP_CHUNK]))
            rows = (await conn.execute(union_all(lookup, head) if start == 0 else lookup)).all()
            for row in rows:
                if row.source in wanted:
                    known[row.source] = _row_to_receipt(row)
                if row.seq > seq:
                    seq, prev_hash = row.seq, row.hash
        result, new_rows = [], []
        now = utcnow()
        for parts, enc, message_id, digest in checked:
            receipt = known.get(enc)
            if receipt is None:
                seq += 1
                receipt = Receipt(seq=seq, component=self.component, source=parts, message_id=message_id,
                                  payload_digest=digest, prev_hash=prev_hash,
                                  hash=receipt_hash(seq, prev_hash, self.component, parts, message_id,
                                                    digest),
                                  created_at=now)
                prev_hash = receipt.hash
                known[enc] = receipt
                new_rows.append({"component": receipt.component, "seq": receipt.seq, "source": enc,
                                 "message_id": receipt.message_id, "payload_digest": receipt.payload_digest,
                                 "prev_hash": receipt.prev_hash, "hash": receipt.hash,
                                 "created_at": receipt.created_at})
            result.append(receipt)
        if new_rows:
            await conn.execute(insert(receipts), new_rows)
        return result

    async def _lock(self, conn: AsyncConnection) -> None:
        # PostgreSQL: a transaction-scoped advisory lock serialises appenders of this chain even
        # when it is empty (a FOR UPDATE on the head row would lock nothing then). It is released
        # at commit, after which the next appender's fresh READ COMMITTED snapshot sees our row.
        # SQLite: every transaction already began with BEGIN IMMEDIATE and holds the write lock.
        if conn.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                               {"key": _lock_key(self.component)})

    async def _by_source(self, conn: AsyncConnection, encoded: str) -> Receipt | None:
        row = (await conn.execute(select(receipts).where(
            receipts.c.component == self.component, receipts.c.source == encoded))).first()
        return _row_to_receipt(row) if row is not None else None

    async def get(self, conn: AsyncConnection, source: Iterable[SourcePart]) -> Receipt | None:
        """The receipt for a source tuple, if one was appended."""
        return await self._by_source(conn, encode_source(_check_source(source)))

    async def head(self, conn: AsyncConnection) -> Receipt | None:
        row = (await conn.execute(select(receipts).where(receipts.c.component == self.component)
                                  .order_by(receipts.c.seq.desc()).limit(1))).first()
        return _row_to_receipt(row) if row is not None else None

    async def open(self, conn: AsyncConnection) -> None:
        """Declare, inside the caller's transaction, that this component keeps a chain; safe to repeat."""
        await self._lock(conn)
        opened = await conn.scalar(select(receipt_chains.c.component).where(
            receipt_chains.c.component == self.component))
        if opened is None:
            await conn.execute(insert(receipt_chains).values(component=self.component,
                                                             opened_at=utcnow()))

    async def kept(self, conn: AsyncConnection) -> bool:
        """True when this database keeps this component's chain: it was opened, or holds its receipts
        (a chain kept before chains were opened)."""
        tables = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
        if receipt_chains.name in tables and await conn.scalar(select(receipt_chains.c.component).where(
                receipt_chains.c.component == self.component)) is not None:
            return True
        return receipts.name in tables and await conn.scalar(select(receipts.c.seq).where(
            receipts.c.component == self.component).limit(1)) is not None

    async def verify(self, conn: AsyncConnection) -> VerifyReport:
        """Walk the whole chain in seq order, in batches, and report every problem by seq."""
        checker = ChainChecker()
        after = 0
        while True:
            rows = (await conn.execute(
                select(receipts).where(receipts.c.component == self.component, receipts.c.seq > after)
                .order_by(receipts.c.seq).limit(_VERIFY_BATCH))).all()
            for row in rows:
                checker.feed(_row_to_receipt(row))
            if len(rows) < _VERIFY_BATCH:
                return checker.report()
            after = rows[-1].seq


async def open_chain(engine: AsyncEngine, component: str) -> None:
    """At a component's start, after the kernel tables exist: it keeps a chain from now on."""
    async with engine.begin() as conn:
        await ReceiptChain(component).open(conn)


# --- verifying a component's whole chain: the chain itself and its source linkage ---------------------

SourceCheck = Callable[[AsyncConnection, Sequence[Receipt]], Awaitable[list[str]]]
"""A component's check that the sources its receipts name still exist: one problem line per receipt
whose source is gone, for a batch of receipts (called once per verify batch, so it can look them up in
bulk)."""


class NoChainError(Exception):
    """The component keeps no receipt chain in this database: there is nothing to call valid."""


@dataclass(frozen=True)
class ChainReport:
    """What `kinshasa receipts verify` and the `receipts` operator query say about one component."""

    component: str
    length: int
    verified: bool
    problems: list[str]
    head_seq: int = 0
    head_hash: str = GENESIS_HASH

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "length": self.length, "verified": self.verified,
                "problems": list(self.problems), "head_seq": self.head_seq, "head_hash": self.head_hash}


def no_chain_message(component: str) -> str:
    return (f"{component} keeps no receipt chain in this database (it never opened one): its emissions "
            "leave no trace to verify; start the component once with this version, or check that this "
            "is its database")


async def _outbox_digests(conn: AsyncConnection) -> dict[str, tuple[str, str]]:
    """message id -> (topic, digest of the bytes it publishes), for every row still in the outbox."""
    has_table = await conn.run_sync(lambda sync: inspect(sync).has_table(outbox.name))
    if not has_table:
        return {}
    found: dict[str, tuple[str, str]] = {}
    after = 0
    while True:
        rows = (await conn.execute(
            select(outbox.c.seq, outbox.c.message_id, outbox.c.topic, outbox.c.value)
            .where(outbox.c.seq > after).order_by(outbox.c.seq).limit(_VERIFY_BATCH))).all()
        for row in rows:
            found[str(row.message_id)] = (row.topic, payload_digest(bytes(row.value)))
        if len(rows) < _VERIFY_BATCH:
            return found
        after = rows[-1].seq


async def verify_chain(conn: AsyncConnection, component: str,
                       sources: SourceCheck | None = None) -> ChainReport:
    """Walk the component's chain and check its linkage; raises NoChainError when it keeps none.

    Problems, in this order: the chain's own (gap, broken link, bad hash, by seq), then each outbox
    message without a receipt or whose bytes differ from what its receipt recorded, then each receipt
    whose source `sources` no longer finds. The outbox is read before the chain: a receipt commits with
    its outbox row, so every row read already has its receipt by the time the chain is walked. Outbox
    rows are pruned after publishing, so only the recent emissions are checked that way; `sources`
    checks every receipt against the component's own lasting records.
    """
    chain = ReceiptChain(component)
    if not await chain.kept(conn):
        raise NoChainError(no_chain_message(component))
    emitted = await _outbox_digests(conn)
    checker = ChainChecker()
    linkage: list[str] = []
    source_problems: list[str] = []
    after = 0
    while True:
        rows = (await conn.execute(
            select(receipts).where(receipts.c.component == component, receipts.c.seq > after)
            .order_by(receipts.c.seq).limit(_VERIFY_BATCH))).all()
        batch = [_row_to_receipt(row) for row in rows]
        for receipt in batch:
            checker.feed(receipt)
            sent = emitted.pop(receipt.message_id, None)
            if sent is not None and sent[1] != receipt.payload_digest:
                linkage.append(f"altered emission: outbox message {receipt.message_id} ({sent[0]}) "
                               f"does not match the payload digest of receipt seq {receipt.seq}")
        if sources is not None and batch:
            source_problems += await sources(conn, batch)
        if len(rows) < _VERIFY_BATCH:
            break
        after = rows[-1].seq
    linkage += [f"missing receipt: outbox message {message_id} ({topic}) has no receipt in the "
                f"{component} chain" for message_id, (topic, _) in emitted.items()]
    walked = checker.report()
    problems = walked.problems() + linkage + source_problems
    return ChainReport(component=component, length=walked.checked, verified=not problems,
                       problems=problems, head_seq=walked.head_seq, head_hash=walked.head_hash)


class ChainVerifier:
    """A component's chain verification on its own engine, as its admin endpoint serves it."""

    def __init__(self, engine: AsyncEngine, component: str, sources: SourceCheck | None = None) -> None:
        self.engine = engine
        self.component = component
        self.sources = sources

    async def verify(self) -> ChainReport:
        # A read: on SQLite it walks a WAL snapshot without the write lock, so a long chain neither waits
        # behind the component's writers nor holds them up.
        async with self.engine.connect() as conn:
            await conn.execution_options(**{READ_ONLY: True})
            return await verify_chain(conn, self.component, self.sources)
