"""The outbox store and the unit of work on real SQLite and PostgreSQL databases."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.kernel.database import create_engine
from kinshasa.kernel.outbox import (
    DEAD,
    PENDING,
    PUBLISHED,
    FailedAttempt,
    OutboxStore,
    SqlOutboxStore,
    append,
    dead_rows,
    outbox,
    utcnow,
)
from kinshasa.kernel.unit_of_work import UnitOfWork, UnitOfWorkError
from kinshasa.migrations.install import install_kernel_tables
from kinshasa.schemas.envelope import Actor, EntityRef, Envelope

TOPIC = "kinshasa.events.documents"

domain = MetaData()
documents = Table("documents", domain, Column("id", Integer, primary_key=True),
                  Column("title", String(200), nullable=False))


pytestmark = pytest.mark.schema(install_kernel_tables, domain)


def envelope(entity_id: str = "d1", *, message_id: uuid.UUID | None = None) -> Envelope:
    return Envelope(message_id=message_id or uuid.uuid4(), type="documents.rename.applied", run_id="run-1",
                    actor=Actor(kind="service", id="documents"),
                    entity=EntityRef(service="documents", type="document", id=entity_id),
                    occurred_at=utcnow(), payload={"old_title": "a", "new_title": "b"})


async def count(engine: AsyncEngine, table: Table) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


class TestUnitOfWork:
    async def test_domain_write_and_outbox_row_commit_together(self, engine: AsyncEngine) -> None:
        env = envelope()
        async with UnitOfWork(engine) as uow:
            await uow.conn.execute(insert(documents).values(id=1, title="hello"))
            uow.emit(TOPIC, env)
            await uow.commit()
        assert await count(engine, documents) == 1
        async with engine.connect() as conn:
            row = await SqlOutboxStore().get(conn, env.message_id)
        assert row is not None
        assert (row.topic, row.key, row.entity_key, row.status) == (TOPIC, b"documents:d1", "documents:d1",
                                                                    PENDING)
        assert Envelope.from_bytes(row.value) == env
        assert ("message_id", str(env.message_id)) in row.headers
        assert ("type", env.type) in row.headers

    async def test_failure_before_commit_leaves_neither(self, engine: AsyncEngine) -> None:
        with pytest.raises(RuntimeError, match="handler crashed"):
            async with UnitOfWork(engine) as uow:
                await uow.conn.execute(insert(documents).values(id=1, title="hello"))
                uow.emit(TOPIC, envelope())
                raise RuntimeError("handler crashed after the domain write")
        assert await count(engine, documents) == 0
        assert await count(engine, outbox) == 0

    async def test_leaving_without_commit_rolls_back(self, engine: AsyncEngine) -> None:
        async with UnitOfWork(engine) as uow:
            await uow.conn.execute(insert(documents).values(id=1, title="hello"))
            uow.emit(TOPIC, envelope())
        assert await count(engine, documents) == 0
        assert await count(engine, outbox) == 0

    async def test_ended_unit_refuses_more_work(self, engine: AsyncEngine) -> None:
        async with UnitOfWork(engine) as uow:
            await uow.commit()
            with pytest.raises(UnitOfWorkError, match="emit inside"):
                uow.emit(TOPIC, envelope())
            with pytest.raises(UnitOfWorkError):
                _ = uow.conn

    async def test_same_message_twice_in_one_unit_is_refused(self, engine: AsyncEngine) -> None:
        env = envelope()
        async with UnitOfWork(engine) as uow:
            uow.emit(TOPIC, env)
            with pytest.raises(ValueError, match="already emitted"):
                uow.emit(TOPIC, env)

    async def test_retried_emission_appends_nothing_and_still_commits(self, engine: AsyncEngine) -> None:
        env = envelope()
        async with UnitOfWork(engine) as uow:
            uow.emit(TOPIC, env)
            await uow.commit()
        woken: list[bool] = []
        async with UnitOfWork(engine, on_commit=lambda: woken.append(True)) as uow:
            await uow.conn.execute(insert(documents).values(id=2, title="retry"))
            uow.emit(TOPIC, env)
            await uow.commit()
        assert uow.appended == 0 and woken == []
        assert await count(engine, outbox) == 1
        assert await count(engine, documents) == 1


class TestSqlOutboxStore:
    """The OutboxStore contract; the `database_url` fixture runs each test on SQLite and PostgreSQL."""

    @pytest.fixture
    def store(self) -> OutboxStore:
        return SqlOutboxStore()

    async def test_append_in_callers_transaction_and_duplicate_is_absorbed(
            self, engine: AsyncEngine, store: OutboxStore) -> None:
        mid = uuid.uuid4()
        async with engine.begin() as conn:
            assert await store.append(conn, TOPIC, "documents:d1", b"{}", mid, {"type": "x"}) is True
            # The duplicate does not abort the transaction: the next statement still runs.
            assert await append(conn, TOPIC, "documents:d1", b"{}", str(mid)) is False
            await conn.execute(insert(documents).values(id=1, title="kept"))
        assert await count(engine, outbox) == 1
        assert await count(engine, documents) == 1

    async def test_backlog_counts_pending_and_ages_the_oldest(self, engine: AsyncEngine,
                                                              store: OutboxStore) -> None:
        async with engine.connect() as conn:
            empty = await store.backlog(conn)
        assert (empty.pending, empty.oldest_age_s, empty.dead) == (0, None, 0)
        async with engine.begin() as conn:
            for i in range(3):
                await store.append(conn, TOPIC, f"k{i}", b"v", uuid.uuid4())
        async with engine.connect() as conn:
            later = await store.backlog(conn, now=utcnow() + timedelta(seconds=60))
        assert later.pending == 3
        assert later.oldest_age_s is not None and 59 < later.oldest_age_s < 70

    async def test_claim_keeps_a_key_behind_its_row_in_backoff(self, engine: AsyncEngine,
                                                               store: OutboxStore) -> None:
        async with engine.begin() as conn:
            for i in range(3):
                await store.append(conn, TOPIC, b"A", f"a{i}".encode(), uuid.uuid4())
                await store.append(conn, TOPIC, b"B", f"b{i}".encode(), uuid.uuid4())
            await store.append(conn, TOPIC, None, b"unkeyed", uuid.uuid4())
        now = utcnow()
        async with engine.begin() as conn:
            rows = await store.claim(conn, limit=100, now=now)
            assert [r.value for r in rows] == [b"a0", b"b0", b"a1", b"b1", b"a2", b"b2", b"unkeyed"]
            head_a = rows[0]
            # a0 failed and waits a minute: a1 and a2 must wait behind it.
            await store.record_failures(conn, [FailedAttempt(head_a.seq, 1, now + timedelta(minutes=1),
                                                             "broker said no", dead=False)], relay_id="t")
        async with engine.begin() as conn:
            rows = await store.claim(conn, limit=100, now=now)
        assert [r.value for r in rows] == [b"b0", b"b1", b"b2", b"unkeyed"]
        async with engine.begin() as conn:
            rows = await store.claim(conn, limit=100, now=now + timedelta(minutes=2))
        assert [r.value for r in rows][:3] == [b"a0", b"b0", b"a1"]
        assert rows[0].attempts == 1
        async with engine.connect() as conn:
            stored = await store.get(conn, rows[0].message_id)
        assert stored is not None and stored.last_error == "broker said no"

    async def test_dead_row_is_listed_blocks_its_key_until_requeued(self, engine: AsyncEngine,
                                                                      store: OutboxStore) -> None:
        first, second, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        async with engine.begin() as conn:
            await store.append(conn, "missing.topic", b"K", b"first", first)
            await store.append(conn, TOPIC, b"K", b"second", second)
            await store.append(conn, TOPIC, b"J", b"other", other)
        now = utcnow()
        async with engine.begin() as conn:
            head = (await store.claim(conn, limit=1, now=now))[0]
            await store.record_failures(conn, [FailedAttempt(head.seq, 10, now, "unknown topic", dead=True)],
                                        relay_id="relay-x")
            await store.mark_published(conn, [], now=now, relay_id="relay-x")
        async with engine.begin() as conn:
            claimable = await store.claim(conn, limit=10, now=now)
            dead = await dead_rows(conn)
            backlog = await store.backlog(conn)
        # The key's later row waits behind the dead one; other keys flow.
        assert [r.message_id for r in claimable] == [other]
        assert [(r.message_id, r.status, r.attempts, r.last_error, r.relay_id) for r in dead] == [
            (first, DEAD, 10, "unknown topic", "relay-x")]
        assert (backlog.pending, backlog.dead) == (2, 1)
        async with engine.begin() as conn:
            assert await store.requeue_dead(conn, [str(first), uuid.uuid4()]) == 1
            row = await store.get(conn, first)
            claimable = await store.claim(conn, limit=10, now=utcnow())
        assert row is not None and (row.status, row.attempts) == (PENDING, 0)
        # Requeued, it is its key's head again: it goes out first, the row behind it in the same claim
        # only if it shares its topic (it does not here, so it waits for the next batch).
        assert [r.message_id for r in claimable] == [first, other]

    async def test_published_rows_are_marked_and_pruned(self, engine: AsyncEngine,
                                                        store: OutboxStore) -> None:
        async with engine.begin() as conn:
            for i in range(4):
                await store.append(conn, TOPIC, b"K", str(i).encode(), uuid.uuid4())
        now = utcnow()
        async with engine.begin() as conn:
            rows = await store.claim(conn, limit=3, now=now)
            await store.mark_published(conn, [r.seq for r in rows], now=now, relay_id="r1")
        async with engine.connect() as conn:
            statuses = (await conn.execute(select(outbox.c.status).order_by(outbox.c.seq))).scalars().all()
            assert list(statuses) == [PUBLISHED] * 3 + [PENDING]
            assert (await store.backlog(conn)).pending == 1
        async with engine.begin() as conn:
            assert await store.prune_published(conn, published_before=now + timedelta(seconds=1)) == 3
        assert await count(engine, outbox) == 1


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_postgres_appenders_of_one_key_commit_in_seq_order(database_url: str) -> None:
    """Per key, seq order is commit order: a second appender of the key waits for the first to commit."""
    engine = create_engine(database_url)
    try:
        await install_kernel_tables(engine)
        async with engine.connect() as first:
            tx = await first.begin()
            await append(first, TOPIC, b"K", b"first", uuid.uuid4())

            async def second() -> None:
                async with engine.begin() as conn:
                    await append(conn, TOPIC, b"K", b"second", uuid.uuid4())

            waiting = asyncio.create_task(second())
            other_key = asyncio.create_task(_append_other_key(engine))
            await asyncio.wait_for(other_key, 5)  # another key is not held up
            # The second appender is seen queued for K's advisory lock, so it has not appended yet.
            async with engine.connect() as watcher:
                for _ in range(100):
                    queued = await watcher.scalar(text(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND "
                        "database = (SELECT oid FROM pg_database WHERE datname = current_database())"))
                    if queued:
                        break
                    await asyncio.sleep(0.05)
            assert queued == 1
            assert not waiting.done(), "the second appender of key K should wait for the first to commit"
            await tx.commit()
            await asyncio.wait_for(waiting, 5)
        async with engine.connect() as conn:
            values = (await conn.execute(
                select(outbox.c.value).where(outbox.c.key == b"K").order_by(outbox.c.seq))).scalars().all()
        assert list(values) == [b"first", b"second"]
    finally:
        await engine.dispose()


async def _append_other_key(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await append(conn, TOPIC, b"L", b"other", uuid.uuid4())
