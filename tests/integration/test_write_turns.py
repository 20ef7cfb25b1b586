"""SQLite write transactions of one process take the write lock in arrival order (kernel/database.py
WriteTurns), each woken when the one before it ends, and a turn is always given back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import greenlet_spawn

from kinshasa.kernel.database import READ_ONLY, WriteTurns, create_engine

metadata = MetaData()
marks = Table("marks", metadata, Column("id", Integer, primary_key=True))


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'turns.sqlite3'}", pool_size=8)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


async def test_writers_begin_in_the_order_they_asked_and_each_waits_for_the_one_before(
        engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    # How many writers have asked for a turn: each writer starts after the one before it has asked (a
    # fixed pause was a race when opening a connection took longer).
    asked = 0
    changed = asyncio.Condition()
    acquire = WriteTurns._acquire

    async def counted(self: WriteTurns, lock: asyncio.Lock) -> bool:
        nonlocal asked
        async with changed:
            asked += 1
            changed.notify_all()
        return await acquire(self, lock)

    monkeypatch.setattr(WriteTurns, "_acquire", counted)
    order: list[int] = []
    first_may_commit = asyncio.Event()
    first_began = asyncio.Event()

    async def first() -> None:
        async with engine.begin() as conn:
            await conn.execute(insert(marks).values(id=0))
            order.append(0)
            first_began.set()
            await first_may_commit.wait()

    async def writer(n: int) -> None:
        async with engine.begin() as conn:
            await conn.execute(insert(marks).values(id=n))
            order.append(n)

    holder = asyncio.create_task(first())
    await first_began.wait()
    waiting = []
    for n in range(1, 6):
        waiting.append(asyncio.create_task(writer(n)))
        async with asyncio.timeout(30), changed:
            await changed.wait_for(lambda n=n: asked > n)  # the holder asked first, then writers 1 to n
    # A read does not wait for a turn: it answers while the first writer still holds the lock.
    async with engine.connect() as conn:
        await conn.execution_options(**{READ_ONLY: True})
        assert (await conn.execute(select(marks.c.id))).all() == []
    assert order == [0]  # nobody wrote past the holder
    first_may_commit.set()
    await asyncio.gather(holder, *waiting)
    assert order == [0, 1, 2, 3, 4, 5]
    async with engine.connect() as conn:
        assert sorted(r[0] for r in await conn.execute(select(marks.c.id))) == [0, 1, 2, 3, 4, 5]


async def test_a_rolled_back_failed_or_cancelled_writer_gives_its_turn_back(engine: AsyncEngine) -> None:
    with pytest.raises(RuntimeError, match="refused"):
        async with engine.begin() as conn:
            await conn.execute(insert(marks).values(id=1))
            raise RuntimeError("refused")

    holding = asyncio.Event()

    async def cancelled() -> None:
        async with engine.begin() as conn:
            await conn.execute(insert(marks).values(id=2))
            holding.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(cancelled())
    await holding.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # A duplicate key fails the statement; the transaction rolls back and the turn comes back too.
    async with engine.begin() as conn:
        await conn.execute(insert(marks).values(id=3))
    with pytest.raises(Exception, match="UNIQUE"):
        async with engine.begin() as conn:
            await conn.execute(insert(marks).values(id=3))
    # Each writer after these got its turn at once (patience is 30 s): nothing is left holding one.
    async with asyncio.timeout(5):
        async with engine.begin() as conn:
            await conn.execute(insert(marks).values(id=4))
    async with engine.connect() as conn:
        assert sorted(r[0] for r in await conn.execute(select(marks.c.id))) == [3, 4]


async def test_a_turn_whose_holder_was_lost_costs_patience_once_then_the_queue_starts_afresh(
        caplog: pytest.LogCaptureFixture) -> None:
    turns = WriteTurns(patience_s=0.2)
    loop = asyncio.get_running_loop()
    lost = asyncio.Lock()
    await lost.acquire()  # a holder that never gives back (the bug this guards against)
    turns._locks[loop] = lost

    class Connection:
        pass

    held = Connection()
    await greenlet_spawn(turns.take, held)
    assert "no write turn within 0.2 s" in caplog.text
    assert turns._locks[loop] is not lost and not turns._locks[loop].locked()
    caplog.clear()
    await greenlet_spawn(turns.take, held)  # the fresh queue: taken at once, no warning
    assert caplog.text == "" and turns._locks[loop].locked()
    turns.give_back(held)
    assert not turns._locks[loop].locked()


async def test_a_turn_given_back_off_the_loops_thread_is_released_on_its_loop() -> None:
    # The garbage collector may close a forgotten connection in another thread: the asyncio lock must
    # still be released, on its own loop, so the next writer gets its turn.
    turns = WriteTurns()

    class Connection:
        pass

    held = Connection()
    await greenlet_spawn(turns.take, held)
    loop = asyncio.get_running_loop()
    lock = turns._locks[loop]
    waiter = asyncio.create_task(lock.acquire())  # the next writer, already waiting
    await asyncio.sleep(0)
    # Debug mode makes the loop refuse a callback scheduled from another thread without call_soon_threadsafe.
    loop.set_debug(True)
    try:
        await asyncio.to_thread(turns.give_back, held)
        async with asyncio.timeout(5):  # the next writer's turn comes: the release reached the loop
            assert await waiter
    finally:
        loop.set_debug(False)
    lock.release()
