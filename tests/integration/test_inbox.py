"""The inbox absorbs redelivered messages inside the effect's transaction, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, event, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kinshasa.kernel.database import create_engine
from kinshasa.kernel.inbox import Inbox, InboxError, inbox, record
from kinshasa.migrations.install import install_kernel_tables

GROUP = "kinshasa.svc.documents"

domain = MetaData()
effects = Table("effects", domain, Column("id", Integer, primary_key=True, autoincrement=True),
                Column("what", String(100), nullable=False))


pytestmark = pytest.mark.schema(install_kernel_tables, domain)


async def handle(conn: AsyncConnection, message_id: uuid.UUID, what: str) -> bool:
    """A consumer's effect: apply it only the first time the message is seen."""
    if not await Inbox().record(conn, GROUP, message_id):
        return False
    await conn.execute(insert(effects).values(what=what))
    return True


async def all_effects(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return list((await conn.execute(select(effects.c.what).order_by(effects.c.id))).scalars())


async def test_redelivery_has_no_second_effect(engine: AsyncEngine) -> None:
    mid = uuid.uuid4()
    async with engine.begin() as conn:
        assert await handle(conn, mid, "first") is True
    async with engine.begin() as conn:
        assert await handle(conn, mid, "again") is False
    assert await all_effects(engine) == ["first"]


async def test_duplicate_is_absorbed_inside_a_transaction_that_still_commits(engine: AsyncEngine) -> None:
    seen, fresh = uuid.uuid4(), uuid.uuid4()
    async with engine.begin() as conn:
        await handle(conn, seen, "first")
    # One transaction handles a batch holding a redelivered message between two other writes.
    async with engine.begin() as conn:
        await conn.execute(insert(effects).values(what="before"))
        assert await record(conn, GROUP, str(seen)) is False
        # Same transaction keeps working after the duplicate: it was not an error.
        assert await handle(conn, fresh, "after") is True
    assert await all_effects(engine) == ["first", "before", "after"]
    async with engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(inbox))).scalar_one() == 2


async def test_groups_are_independent_and_rollback_forgets(engine: AsyncEngine) -> None:
    mid = uuid.uuid4()
    with pytest.raises(RuntimeError):
        async with engine.begin() as conn:
            assert await handle(conn, mid, "lost") is True
            raise RuntimeError("effect failed")
    async with engine.begin() as conn:
        # The rolled-back attempt left no tracking row, so the retry applies the effect.
        assert await handle(conn, mid, "retried") is True
        assert await Inbox().record(conn, "kinshasa.coordinator", mid) is True
        assert await Inbox().seen(conn, GROUP, mid) is True
    assert await all_effects(engine) == ["retried"]


async def test_bad_ids_name_the_fix(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        with pytest.raises(InboxError, match="envelope's message_id"):
            await record(conn, GROUP, "not-a-uuid")
        with pytest.raises(InboxError, match="consumer group"):
            await record(conn, "", uuid.uuid4())


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_postgres_concurrent_duplicates_apply_once(database_url: str) -> None:
    """Two consumers racing on one message: the second waits for the first and then skips."""
    engine = create_engine(database_url)
    try:
        await install_kernel_tables(engine)
        async with engine.begin() as conn:
            await conn.run_sync(domain.create_all)
        mid = uuid.uuid4()

        async def consumer(what: str) -> bool:
            async with engine.begin() as conn:
                applied = await handle(conn, mid, what)
                await asyncio.sleep(0.1)  # hold the transaction open so the two overlap
                return applied

        results = await asyncio.gather(consumer("a"), consumer("b"))
        assert sorted(results) == [False, True]
        assert len(await all_effects(engine)) == 1
    finally:
        await engine.dispose()


async def test_record_many_claims_only_the_new_ids_once_each(engine: AsyncEngine) -> None:
    seen, a, b = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    async with engine.begin() as conn:
        assert await Inbox().record(conn, GROUP, seen) is True
    async with engine.begin() as conn:
        fresh = await Inbox().record_many(conn, GROUP, [a, seen, str(b), a])
    assert fresh == {a, b}
    async with engine.begin() as conn:
        assert await Inbox().record_many(conn, GROUP, [a, b, seen]) == set()
        assert await Inbox().record_many(conn, "kinshasa.svc.other", [a]) == {a}
    with pytest.raises(InboxError, match="not a UUID"):
        async with engine.begin() as conn:
            await Inbox().record_many(conn, GROUP, [uuid.uuid4(), "nope"])


async def test_a_large_batch_half_seen_returns_the_new_half_and_the_statement_is_compiled_once(
        engine: AsyncEngine) -> None:
    seen = [uuid.uuid4() for _ in range(700)]
    new = [uuid.uuid4() for _ in range(700)]
    async with engine.begin() as conn:
        assert await Inbox().record_many(conn, GROUP, seen) == set(seen)
        assert await Inbox().record(conn, GROUP, uuid.uuid4()) is True  # a lone row: a form of its own
    caching: list[object] = []

    def note(conn: object, cursor: object, statement: str, parameters: object, context: object,
             executemany: bool) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO INBOX"):
            caching.append(getattr(context, "cache_hit", None))

    event.listen(engine.sync_engine, "before_cursor_execute", note)
    try:
        # 1,400 rows: more than one page of SQLAlchemy's multi-row INSERTs (1,000 rows each).
        mixed = [id_ for pair in zip(seen, new, strict=True) for id_ in pair]
        async with engine.begin() as conn:
            assert await Inbox().record_many(conn, GROUP, mixed) == set(new)
        async with engine.begin() as conn:
            assert await Inbox().record(conn, GROUP, uuid.uuid4()) is True
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", note)
    async with engine.connect() as conn:
        count = (await conn.execute(select(func.count()).select_from(inbox))).scalar_one()
    assert count == 1402
    # A statement that holds its rows as values has no cache key and is compiled for every message.
    assert caching and all(hit == engine.dialect.CACHE_HIT for hit in caching), caching
